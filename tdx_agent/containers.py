"""The owner's containers and images, on the VM's Docker engine (through the `docker` SDK).

`ContainerRuntime` is what the agent's HTTP layer calls; it returns the wire models of
`modelyo.api.agent` and raises `modelyo.errors.ContainerError` subclasses, whose `status` and
`code` are the HTTP answer (404 unknown, 409 name taken or wrong state, 413 too large, 422
refused, 500 engine failure).

* Only what this runtime made is visible: containers carry the label `io.modelyo.agent=<id>`,
  and images are those it loaded (remembered in `state_dir`) plus the VM's `builtin_images`.
  Other containers and images on the engine are not the owner's business.
* Image uploads (`docker save` tarballs, optionally gzipped) are spooled to a temporary file
  with constant memory and checked before the engine sees a byte: a tar that ends properly,
  manifest.json, every config and layer it names present, each config matching its digest,
  each layer matching its diff id. A broken or truncated upload loads and tags nothing; if the
  engine still fails, what it loaded in that call is removed and moved tags are put back.
* Each container gets /modelyo/{enc,dec}_{in,out} from `CryptDirs` (tmpfs, its own folders,
  its key id only), no host network, no privilege escalation, and GPUs only on request when the
  VM has them.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import posixpath
import re
import secrets
import struct
import tarfile
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import docker
import docker.errors
import docker.types
import requests
from docker.models.containers import Container
from docker.utils import parse_repository_tag

from modelyo.api.agent import ContainerInfo, ContainerSpec, ImageInfo, WaitResult
from modelyo.api.logframes import STDERR, STDOUT, encode_frame
from modelyo.errors import (
    ContainerConflictError,
    ContainerError,
    ContainerInvalidError,
    ContainerNotFoundError,
    KeyUnavailableError,
    UploadTooLargeError,
)
from modelyo.files import atomic_write_text
from tdx_agent.cryptdirs import TOKEN_RE, CryptDirs

log = logging.getLogger(__name__)

LABEL_AGENT = "io.modelyo.agent"
LABEL_KEY_ID = "io.modelyo.key-id"
LABEL_GPU = "io.modelyo.gpu"
LABEL_IMAGE = "io.modelyo.image"
LABEL_CRYPTDIRS = "io.modelyo.cryptdirs"

KEY_ID_ENV = "MODELYO_KEY_ID"
DEFAULT_STOP_TIMEOUT = 10
_RUNNING = frozenset({"running", "restarting", "paused"})
_CHUNK = 1 << 20
# The engine's multiplexed stream: stream type, 3 zero bytes, big-endian length.
ENGINE_HEADER = struct.Struct(">BxxxL")
_ENGINE_STREAMS = {1: STDOUT, 2: STDERR}
_MAX_MEMBERS = 100_000  # a docker save tar has a handful per layer
_MAX_JSON = 16 << 20  # manifest.json and image configs are kilobytes
_MAX_ETC_FILE = 1 << 20
_DIGEST_IN_NAME = re.compile(r"(?:^|/)([0-9a-f]{64})(?:\.json)?$")
_DIFF_ID = re.compile(r"^sha256:[0-9a-f]{64}$")
_GZIP_MAGIC = b"\x1f\x8b"


# --- checking a docker save tarball (pure: a file in, facts or an error out) -------------------


@dataclass(frozen=True)
class SavedImage:
    """One image of a `docker save` tarball: its id (the config's digest) and tags."""

    image_id: str
    tags: tuple[str, ...]
    layers: int


def _broken(detail: str) -> ContainerInvalidError:
    return ContainerInvalidError(
        f"the upload is not a complete `docker save` tarball: {detail}; nothing was loaded. "
        "Create it with `docker save IMAGE -o IMAGE.tar` and upload it again"
    )


def index_tar(f: BinaryIO, size: int) -> dict[str, tarfile.TarInfo]:
    """The members of the tar in `f` (`size` bytes) by normalised name.

    Refuses a tar whose members run past its end, or that does not end with the two zero
    blocks of a complete archive (truncated, or a corrupt header in the middle).
    """
    f.seek(0)
    try:
        tar = tarfile.open(fileobj=f, mode="r:")  # only headers are read: nothing to close
    except (tarfile.TarError, EOFError) as exc:
        raise _broken(f"it is not a tar archive ({exc})") from None
    members: dict[str, tarfile.TarInfo] = {}
    try:
        for info in tar:
            if len(members) >= _MAX_MEMBERS:
                raise _broken(f"it has more than {_MAX_MEMBERS} members")
            if info.offset_data + info.size > size:
                raise _broken(f"it is truncated inside {info.name!r}")
            members[_norm(info.name)] = info
    except (tarfile.TarError, EOFError) as exc:
        raise _broken(f"its tar structure is damaged ({exc})") from None
    end = tar.offset
    tail = os.pread(f.fileno(), 2 * tarfile.BLOCKSIZE, end)
    if len(tail) < 2 * tarfile.BLOCKSIZE:
        raise _broken(f"it is truncated ({size} bytes, the end-of-archive marker is missing)")
    if tail.strip(b"\0"):
        raise _broken(f"the tar header at byte {end} is corrupt")
    return members


def _norm(name: str) -> str:
    return posixpath.normpath("/" + name).lstrip("/")


def _resolve(members: dict[str, tarfile.TarInfo], name: str) -> tarfile.TarInfo:
    """The regular member `name` refers to, following links inside the tar."""
    key = _norm(name)
    for _hop in range(16):
        info = members.get(key)
        if info is None:
            raise _broken(f"{name!r} is named in manifest.json but missing from the tar")
        if info.isreg():
            return info
        if info.issym():
            key = _norm(posixpath.join(posixpath.dirname(key), info.linkname))
        elif info.islnk():
            key = _norm(info.linkname)
        else:
            raise _broken(f"{name!r} is not a file in the tar")
    raise _broken(f"{name!r} is a loop of links")


def _read_member(f: BinaryIO, info: tarfile.TarInfo, what: str) -> bytes:
    if info.size > _MAX_JSON:
        raise _broken(f"{what} is {info.size} bytes, more than a docker save writes")
    data = os.pread(f.fileno(), info.size, info.offset_data)
    if len(data) != info.size:
        raise _broken(f"{what} is truncated")
    return data


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _broken(f"{what} is not valid JSON ({exc})") from None


class _Section(io.RawIOBase):
    """A read-only window on `size` bytes of a file descriptor from `offset` (pread)."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        self._fd, self._offset, self._left = fd, offset, size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = os.preadv(self._fd, [view[: min(len(view), self._left)]], self._offset)
        self._offset += n
        self._left -= n
        return n


def layer_digest(f: BinaryIO, info: tarfile.TarInfo) -> str:
    """`sha256:<hex>` of a layer's uncompressed tar (its diff id), reading it in pieces."""
    head = os.pread(f.fileno(), 6, info.offset_data)
    raw = _Section(f.fileno(), info.offset_data, info.size)
    stream: Any = raw
    if head.startswith(_GZIP_MAGIC):
        stream = gzip.GzipFile(fileobj=raw)
    elif head.startswith(b"BZh"):
        stream = bz2.BZ2File(raw)
    elif head.startswith(b"\xfd7zXZ\x00"):
        stream = lzma.LZMAFile(raw)
    elif head.startswith(b"\x28\xb5\x2f\xfd"):
        raise ContainerInvalidError(
            f"layer {info.name!r} is zstd-compressed, which this agent does not load; "
            "upload the plain output of `docker save`"
        )
    try:
        return "sha256:" + hashlib.file_digest(stream, "sha256").hexdigest()
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        raise _broken(f"layer {info.name!r} does not decompress ({exc})") from None


def check_save_tarball(f: BinaryIO, size: int) -> list[SavedImage]:
    """Check that `f` holds a complete, intact `docker save` tarball; return its images.

    Every layer is hashed and compared with its diff id in the image config (smallest first,
    so damage in the small top layer of a big image is found at once), and every config with
    the digest in its name. Raises `ContainerInvalidError` saying what is wrong.
    """
    members = index_tar(f, size)
    if "manifest.json" not in members:
        raise _broken("it has no manifest.json (docker save writes one)")
    manifest = _json(_read_member(f, _resolve(members, "manifest.json"), "manifest.json"), "")
    if not isinstance(manifest, list) or not manifest:
        raise _broken("manifest.json does not list any image")
    images: list[SavedImage] = []
    layers: dict[tuple[int, str], tuple[int, tarfile.TarInfo, str]] = {}
    for number, entry in enumerate(manifest, 1):
        where = f"image {number} of manifest.json"
        if not isinstance(entry, dict):
            raise _broken(f"{where} is not an object")
        config_name, layer_names = entry.get("Config"), entry.get("Layers")
        tags = entry.get("RepoTags") or []
        if not isinstance(config_name, str) or not isinstance(layer_names, list):
            raise _broken(f"{where} lacks Config or Layers")
        if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
            raise _broken(f"{where} has malformed RepoTags")
        config_bytes = _read_member(f, _resolve(members, config_name), config_name)
        digest = hashlib.sha256(config_bytes).hexdigest()
        named = _DIGEST_IN_NAME.search(config_name)
        if named is not None and named.group(1) != digest:
            raise _broken(f"the image config {config_name!r} does not match its digest (damaged)")
        config = _json(config_bytes, f"the image config {config_name!r}")
        rootfs = config.get("rootfs") if isinstance(config, dict) else None
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(diff_ids, list) or not all(
            isinstance(d, str) and _DIFF_ID.match(d) for d in diff_ids
        ):
            raise _broken(f"the image config {config_name!r} has no valid rootfs.diff_ids")
        if len(diff_ids) != len(layer_names):
            raise _broken(f"{where} names {len(layer_names)} layers but its config {len(diff_ids)}")
        for layer_name, diff_id in zip(layer_names, diff_ids, strict=True):
            if not isinstance(layer_name, str):
                raise _broken(f"{where} has a malformed layer name")
            info = _resolve(members, layer_name)
            layers[(info.offset_data, diff_id)] = (info.size, info, diff_id)
        images.append(SavedImage("sha256:" + digest, tuple(tags), len(layer_names)))
    for _size, info, diff_id in sorted(layers.values(), key=lambda item: item[0]):
        actual = layer_digest(f, info)
        if actual != diff_id:
            raise _broken(
                f"layer {info.name!r} is damaged (its content hashes to {actual[:19]}…, "
                f"the image config expects {diff_id[:19]}…)"
            )
    return images


# --- spooling uploads ---------------------------------------------------------------------------


class _Spool:
    """Writes an upload to a file with constant memory, inflating it if it is gzipped, and
    refusing more than `max_bytes` received or written."""

    def __init__(self, out: BinaryIO, max_bytes: int, what: str) -> None:
        self.out, self.max_bytes, self.what = out, max_bytes, what
        self.received = 0
        self.written = 0
        self._head = b""
        self._inflater: Any = None
        self._started = False

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.received += len(chunk)
        self._check(self.received)
        if not self._started:
            self._head += chunk
            if len(self._head) < 2:
                return
            chunk, self._head, self._started = self._head, b"", True
            if chunk.startswith(_GZIP_MAGIC):
                self._inflater = zlib.decompressobj(31)
        if self._inflater is None:
            self._write(chunk)
        else:
            self._inflate(chunk)

    def _inflate(self, data: bytes) -> None:
        while data:
            self._write(self._inflater.decompress(data, _CHUNK))  # bounded: no zip bomb in RAM
            data = self._inflater.unconsumed_tail
            if self._inflater.eof:
                rest = self._inflater.unused_data
                if rest and not rest.startswith(_GZIP_MAGIC):
                    raise _broken("there are stray bytes after the end of the gzip stream")
                if rest:  # concatenated gzip members, as `gzip` allows
                    self._inflater = zlib.decompressobj(31)
                data = data or rest

    def finish(self) -> int:
        """Flush; return the size of the spooled tar."""
        if not self._started:
            self._write(self._head)
        elif self._inflater is not None:
            self._write(self._inflater.flush())
            if not self._inflater.eof:
                raise _broken("the gzip stream is truncated")
        self.out.flush()
        return self.written

    def _write(self, data: bytes) -> None:
        self.written += len(data)
        self._check(self.written)
        try:
            self.out.write(data)
        except OSError as exc:
            raise ContainerError(
                f"cannot store the {self.what} upload: {exc.strerror}; free disk space in the "
                "VM (delete unused containers and images) and upload it again"
            ) from None

    def _check(self, count: int) -> None:
        if count > self.max_bytes:
            raise UploadTooLargeError(
                f"the {self.what} is larger than this agent's limit of "
                f"{self.max_bytes / 2**20:.0f} MiB (uncompressed); raise the limit in the "
                "agent's configuration, or make it smaller (e.g. share a base image)"
            )


# --- users of an image ------------------------------------------------------------------------


def resolve_user(user: str, passwd: str = "", group: str = "") -> tuple[int, int]:
    """The numeric (uid, gid) that Docker runs `user` ("name", "uid", "name:group", ...) as,
    given the image's /etc/passwd and /etc/group text. Empty means root."""
    if not user:
        return 0, 0
    name, _, group_name = user.partition(":")
    entries = [line.split(":") for line in passwd.splitlines() if line.count(":") >= 3]
    found = next((e for e in entries if e[0] == name or (name.isdigit() and e[2] == name)), None)
    if name.isdigit():
        uid = int(name)
    elif found is not None and found[2].isdigit():
        uid = int(found[2])
    else:
        raise ContainerInvalidError(
            f"the image runs as user {name!r}, which its /etc/passwd does not list; set USER in "
            "the Dockerfile to a listed user or to a numeric uid[:gid]"
        )
    if not group_name:
        return uid, int(found[3]) if found is not None and found[3].isdigit() else 0
    if group_name.isdigit():
        return uid, int(group_name)
    for line in group.splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[0] == group_name and fields[2].isdigit():
            return uid, int(fields[2])
    raise ContainerInvalidError(
        f"the image runs as group {group_name!r}, which its /etc/group does not list; set USER "
        "in the Dockerfile to a listed group or to a numeric gid"
    )


def detect_gpus() -> int:
    """How many NVIDIA GPUs the VM exposes (/dev/nvidia0, /dev/nvidia1, ...)."""
    return sum(1 for p in Path("/dev").glob("nvidia*") if p.name[6:].isdigit())


# --- the runtime --------------------------------------------------------------------------------


def _explain(exc: docker.errors.APIError) -> str:
    text = exc.explanation or str(exc)
    return text.decode(errors="replace") if isinstance(text, bytes) else str(text)


@contextlib.contextmanager
def _engine(what: str) -> Iterator[None]:
    """Turn Docker SDK failures into `ContainerError`s that say what was being done."""
    try:
        yield
    except ContainerError:
        raise
    except docker.errors.NotFound as exc:
        raise ContainerNotFoundError(f"{what}: {_explain(exc)}") from None
    except docker.errors.APIError as exc:
        if exc.status_code == 409:
            raise ContainerConflictError(f"{what}: {_explain(exc)}") from None
        raise ContainerError(f"{what}: the Docker engine refused: {_explain(exc)}") from None
    except (requests.RequestException, docker.errors.DockerException) as exc:
        raise ContainerError(
            f"{what}: the Docker engine does not answer ({exc}); check that dockerd runs in "
            "the VM (`docker info`)"
        ) from None


class ContainerRuntime:
    """The owner's images and containers on one Docker engine.

    `cryptdirs` serves the containers' /modelyo folders; `allowed_key_ids` are the key ids this
    VM may use (a collection, or a callable returning one, e.g. from the CA's policy). `gpus`
    is the number of GPUs the VM has (a callable, or None to count /dev/nvidiaN). `agent_id`
    labels this runtime's containers; `state_dir` remembers which images it loaded across
    restarts (in memory only if None); `builtin_images` are images the VM ships that the owner
    may use too (e.g. "modelyo/python:3.11"); uploads are spooled in `spool_dir` (the system
    temporary folder if None). Containers get `network` ("bridge" or "none"; never the host's).
    """

    def __init__(
        self,
        client: docker.DockerClient,
        cryptdirs: CryptDirs,
        *,
        allowed_key_ids: Collection[str] | Callable[[], Collection[str]],
        gpus: int | Callable[[], int] | None = None,
        agent_id: str = "default",
        state_dir: str | os.PathLike[str] | None = None,
        builtin_images: Collection[str] = (),
        spool_dir: str | os.PathLike[str] | None = None,
        network: str = "bridge",
    ) -> None:
        if network not in ("bridge", "none"):
            raise ValueError(f"network is 'bridge' or 'none', not {network!r}")
        self._client = client
        self._dirs = cryptdirs
        self._allowed = allowed_key_ids
        self._gpus = gpus
        self.agent_id = agent_id
        self._state_file = Path(state_dir, "images.json") if state_dir is not None else None
        self._builtin = tuple(builtin_images)
        self._spool_dir = spool_dir
        self._network = network
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._loaded: set[str] = self._read_state()
        self._recover()

    # --- images ---

    def load(self, chunks: Iterable[bytes], max_bytes: int) -> list[ImageInfo]:
        """Load a `docker save` tarball (optionally gzipped) arriving as `chunks`; return the
        images it held. Nothing is loaded or tagged unless the whole upload is intact."""
        with tempfile.TemporaryFile(dir=self._spool_dir, prefix="modelyo-load-") as spool:
            writer = _Spool(spool, max_bytes, "image")  # type: ignore[arg-type]
            for chunk in chunks:
                writer.feed(chunk)
            size = writer.finish()
            saved = check_save_tarball(spool, size)  # type: ignore[arg-type]
            with self._load_lock:
                self._engine_load(spool, saved)  # type: ignore[arg-type]
        with self._lock:
            self._loaded.update(image.image_id for image in saved)
            self._write_state()
        return [self._image_info(image.image_id) for image in saved]

    def images(self) -> list[ImageInfo]:
        """The images the owner may use: those loaded here and the VM's built-in ones."""
        infos = []
        for image_id in sorted(self._visible_ids()):
            with contextlib.suppress(ContainerNotFoundError):
                infos.append(self._image_info(image_id))
        return sorted(infos, key=lambda i: (i.tags[:1] or [i.id], i.id))

    def _engine_load(self, spool: BinaryIO, saved: list[SavedImage]) -> None:
        """Hand the checked tarball to the engine; undo what it did if it fails."""
        tags_before = {tag: self._image_id_or_none(tag) for image in saved for tag in image.tags}
        present_before = {i.image_id for i in saved if self._image_id_or_none(i.image_id)}
        problem = ""
        try:
            spool.seek(0)
            # Not quiet: the engine's progress messages keep the connection busy while it
            # registers big layers, so the client's read timeout does not cut it off.
            for message in self._client.api.load_image(spool, quiet=False):
                if isinstance(message, dict) and message.get("error"):
                    problem = str(message["error"]).strip()
        except docker.errors.APIError as exc:
            problem = _explain(exc)
        except (requests.RequestException, docker.errors.DockerException) as exc:
            problem = f"the Docker engine does not answer ({exc})"
        if not problem:
            missing = [i.image_id for i in saved if self._image_id_or_none(i.image_id) is None]
            if missing:
                problem = f"the engine did not report {', '.join(missing)} as loaded"
        if problem:
            self._undo_load(saved, tags_before, present_before)
            raise ContainerInvalidError(
                f"the Docker engine refused the image: {problem}; nothing was loaded. Check "
                "that it was saved with `docker save` for this VM's architecture"
            )

    def _undo_load(
        self, saved: list[SavedImage], tags_before: dict[str, str | None], present: set[str]
    ) -> None:
        for tag, before in tags_before.items():
            now = self._image_id_or_none(tag)
            try:
                if before is None and now is not None:
                    self._client.images.remove(tag, noprune=False)
                elif before is not None and now != before:
                    repo, version = parse_repository_tag(tag)
                    self._client.api.tag(before, repo, version or "latest", force=True)
            except docker.errors.DockerException as exc:
                log.warning("undoing the failed load: cannot restore tag %s: %s", tag, exc)
        for image in saved:
            if image.image_id not in present and self._image_id_or_none(image.image_id):
                try:
                    self._client.images.remove(image.image_id, force=True)
                except docker.errors.DockerException as exc:
                    log.warning("undoing the failed load: cannot remove %s: %s", image, exc)

    def _image_id_or_none(self, ref: str) -> str | None:
        try:
            with _engine(f"looking up image {ref}"):
                return self._client.images.get(ref).id
        except ContainerNotFoundError:
            return None

    def _image_info(self, image_id: str) -> ImageInfo:
        with _engine(f"looking up image {image_id}"):
            image = self._client.images.get(image_id)
        return ImageInfo(id=image.id, tags=sorted(image.tags), size=int(image.attrs["Size"]))

    def _visible_ids(self) -> set[str]:
        with self._lock:
            ids = set(self._loaded)
        for ref in self._builtin:
            if (image_id := self._image_id_or_none(ref)) is not None:
                ids.add(image_id)
        return ids

    def _visible_image(self, ref: str) -> str:
        image_id = self._image_id_or_none(ref)
        if image_id is None or image_id not in self._visible_ids():
            raise ContainerNotFoundError(
                f"no image {ref!r} here; load it first (`modelyo docker load -f IMAGE.tar`), "
                "`modelyo docker images` lists the images you can use"
            )
        return image_id

    def _read_state(self) -> set[str]:
        if self._state_file is None or not self._state_file.exists():
            return set()
        try:
            data = json.loads(self._state_file.read_text())
            return {str(i) for i in data["images"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ContainerError(
                f"the agent's image list {self._state_file} is unreadable ({exc}); restore it "
                "or delete it (loaded images are then hidden until loaded again)"
            ) from None

    def _write_state(self) -> None:
        if self._state_file is None:
            return
        self._state_file.parent.mkdir(parents=True, exist_ok=True)
        document = {"images": sorted(self._loaded)}
        atomic_write_text(self._state_file, json.dumps(document, indent=1), mode=0o600)

    # --- containers ---

    def create(self, spec: ContainerSpec) -> ContainerInfo:
        """Create a container (not started) with its /modelyo folders and key id."""
        allowed = self._allowed() if callable(self._allowed) else self._allowed
        if spec.key_id not in allowed:
            shown = ", ".join(sorted(allowed)) or "none"
            raise ContainerInvalidError(
                f"key id {spec.key_id!r} is not allowed for this VM (allowed: {shown}); use an "
                "allowed key id, or have the CA's policy allow this one for the VM"
            )
        # The CA is the authority and its policy may have changed since this VM registered:
        # ask it now (the answer is cached), so a refused key id stops here and not inside
        # the running container.
        try:
            self._dirs.check_key(spec.key_id)
        except KeyUnavailableError as exc:
            raise ContainerInvalidError(
                f"key id {spec.key_id!r} is not released to this VM: {exc}"
            ) from None
        if spec.gpu and self._gpu_count() == 0:
            raise ContainerInvalidError(
                "this VM has no GPU; create the container without a GPU request, or use a VM "
                "with GPUs"
            )
        image_id = self._visible_image(spec.image)
        if self._find(spec.name) is not None:
            raise self._name_taken(spec.name)
        token = secrets.token_hex(8)
        dirs = self._dirs.open(token, spec.key_id)
        try:
            labels = {
                LABEL_AGENT: self.agent_id,
                LABEL_KEY_ID: spec.key_id,
                LABEL_GPU: "true" if spec.gpu else "false",
                LABEL_IMAGE: spec.image,
                LABEL_CRYPTDIRS: token,
            }
            options: dict[str, Any] = {}
            if spec.gpu:
                options["device_requests"] = [
                    docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])
                ]
            try:
                with _engine(f"creating container {spec.name}"):
                    container = self._client.containers.create(
                        image_id,
                        command=spec.command,
                        name=spec.name,
                        environment={**spec.environment, KEY_ID_ENV: spec.key_id},
                        labels=labels,
                        mounts=[
                            docker.types.Mount(target, source, type="bind")
                            for target, source in dirs.mounts().items()
                        ],
                        network_mode=self._network,
                        security_opt=["no-new-privileges"],
                        detach=True,
                        **options,
                    )
            except ContainerConflictError:
                raise self._name_taken(spec.name) from None
            try:
                self._dirs.set_owner(token, *self._container_user(container))
            except BaseException:
                with contextlib.suppress(docker.errors.DockerException):
                    container.remove(force=True)
                raise
        except BaseException:
            self._dirs.remove(token)
            raise
        return self._info(container)

    def start(self, name: str) -> ContainerInfo:
        """Start (run) a created or exited container."""
        container = self._get(name)
        if container.status in _RUNNING or container.status in ("removing", "dead"):
            raise ContainerConflictError(
                f"container {name} is {container.status}; only a created or exited container "
                f"can be started (`modelyo docker stop {name}` first)"
            )
        self._serve_dirs(container)
        try:
            with _engine(f"starting container {name}"):
                container.start()
        except ContainerError as exc:
            if "device driver" in str(exc):
                raise ContainerError(
                    f"{exc}; the VM has GPUs but its Docker engine cannot hand them to "
                    "containers: install the NVIDIA Container Toolkit in the VM image"
                ) from None
            raise
        return self.inspect(name)

    def stop(self, name: str, timeout: int = DEFAULT_STOP_TIMEOUT) -> ContainerInfo:
        """Stop a running container: SIGTERM, then SIGKILL after `timeout` seconds.

        Like `docker stop`, stopping a container that is not running is not an error: the
        document's sequence is run, stop, delete, and a finished job has already stopped.
        """
        container = self._get(name)
        if container.status not in _RUNNING:
            return self.inspect(name)
        with _engine(f"stopping container {name}"):
            container.stop(timeout=timeout)
        return self.inspect(name)

    def delete(self, name: str, *, force: bool = False) -> None:
        """Remove a container and its /modelyo folders; a running one only with `force`."""
        container = self._get(name)
        if container.status in _RUNNING and not force:
            raise ContainerConflictError(
                f"container {name} is {container.status}; stop it first "
                f"(`modelyo docker stop {name}`), or delete it with force"
            )
        with _engine(f"deleting container {name}"):
            container.remove(v=True, force=force)
        token = container.labels.get(LABEL_CRYPTDIRS, "")
        if TOKEN_RE.match(token):
            self._dirs.remove(token)

    def list(self) -> list[ContainerInfo]:
        """This runtime's containers, by name."""
        with _engine("listing containers"):
            found = self._client.containers.list(
                all=True, filters={"label": f"{LABEL_AGENT}={self.agent_id}"}
            )
        return sorted((self._info(c) for c in found), key=lambda i: i.name)

    def inspect(self, name: str) -> ContainerInfo:
        """One container's state."""
        return self._info(self._get(name))

    def logs(self, name: str, follow: bool = False, framed: bool = False) -> Iterator[bytes]:
        """The container's output (stdout and stderr, as written); with `follow`, until it
        exits. With `framed`, the two streams apart and in order, as log frames
        (`modelyo.api.logframes`). Unknown names fail here, not at the first iteration."""
        container = self._get(name)
        what = f"reading the logs of {name}"
        if framed:
            with _engine(what):
                pairs = _engine_log_frames(self._client, container, follow)
            return _guarded((encode_frame(s, d) for s, d in pairs), what)
        with _engine(what):
            stream = container.logs(stdout=True, stderr=True, stream=True, follow=follow)
        return _guarded(stream, what)

    def wait(self, name: str, timeout: float | None = None) -> WaitResult:
        """Wait until the container exits; after `timeout` seconds return `timed_out` (exit
        code -1) and leave it running."""
        container = self._get(name)
        if container.status == "created":
            raise ContainerConflictError(
                f"container {name} has not been started; start it (`modelyo docker run {name}`) "
                "before waiting for it"
            )
        started = time.monotonic()
        try:
            with _engine(f"waiting for {name}"):
                result = container.wait(timeout=timeout)
        except ContainerError:
            elapsed = time.monotonic() - started
            if timeout is not None and elapsed >= timeout * 0.9:
                return WaitResult(name=name, exit_code=-1, timed_out=True)
            raise
        return WaitResult(name=name, exit_code=int(result.get("StatusCode", -1)))

    def get_archive(self, name: str, path: str) -> Iterator[bytes]:
        """A tar of `path` (a file or folder) in the container, in pieces."""
        _check_path(path)
        container = self._get(name)
        try:
            with _engine(f"copying {path} out of {name}"):
                bits, _stat = container.get_archive(path, chunk_size=_CHUNK)
        except ContainerNotFoundError:
            raise ContainerNotFoundError(f"there is no {path} in container {name}") from None
        return _guarded(bits, f"copying {path} out of {name}")

    def put_archive(
        self, name: str, path: str, chunks: Iterable[bytes], *, max_bytes: int = 1 << 40
    ) -> None:
        """Extract a tar arriving as `chunks` into the existing folder `path` of the container.
        The tar is received whole and checked first: a truncated one changes nothing."""
        _check_path(path)
        container = self._get(name)
        with tempfile.TemporaryFile(dir=self._spool_dir, prefix="modelyo-archive-") as spool:
            writer = _Spool(spool, max_bytes, "archive")  # type: ignore[arg-type]
            for chunk in chunks:
                writer.feed(chunk)
            try:
                index_tar(spool, writer.finish())  # type: ignore[arg-type]
            except ContainerInvalidError as exc:
                raise ContainerInvalidError(
                    str(exc).replace("a complete `docker save` tarball", "a complete tar")
                ) from None
            spool.seek(0)
            try:
                with _engine(f"copying into {path} of {name}"):
                    container.put_archive(path, spool)
            except ContainerNotFoundError:
                raise ContainerNotFoundError(
                    f"there is no folder {path} in container {name}; copy into an existing "
                    "folder (e.g. /tmp)"
                ) from None
            except ContainerError as exc:
                if "not a directory" in str(exc):
                    raise ContainerInvalidError(
                        f"{path} in container {name} is not a folder; give a folder to copy into"
                    ) from None
                raise

    # --- helpers ---

    def _find(self, name: str) -> Container | None:
        try:
            with _engine(f"looking up container {name}"):
                return self._client.containers.get(name)
        except ContainerNotFoundError:
            return None

    def _get(self, name: str) -> Container:
        container = self._find(name)
        if container is None or container.labels.get(LABEL_AGENT) != self.agent_id:
            raise ContainerNotFoundError(
                f"no container named {name!r}; `modelyo docker list` shows yours"
            )
        return container

    @staticmethod
    def _name_taken(name: str) -> ContainerConflictError:
        return ContainerConflictError(
            f"a container named {name!r} exists already; choose another name, or delete it "
            f"first (`modelyo docker delete {name}`)"
        )

    def _gpu_count(self) -> int:
        if self._gpus is None:
            return detect_gpus()
        return self._gpus() if callable(self._gpus) else self._gpus

    def _container_user(self, container: Container) -> tuple[int, int]:
        """The uid and gid the container's processes run as (its folders are given to them)."""
        user = str((container.attrs.get("Config") or {}).get("User") or "")
        if not user:
            return 0, 0
        group = user.partition(":")[2]
        passwd = self._read_file(container, "/etc/passwd")
        groups = self._read_file(container, "/etc/group") if group and not group.isdigit() else ""
        return resolve_user(user, passwd, groups)

    def _read_file(self, container: Container, path: str) -> str:
        try:
            with _engine(f"reading {path} of {container.name}"):
                bits, _stat = container.get_archive(path)
                data = b""
                for chunk in bits:
                    data += chunk
                    if len(data) > _MAX_ETC_FILE + 4 * tarfile.BLOCKSIZE:
                        return ""
        except ContainerNotFoundError:
            return ""
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            member = next((m for m in tar if m.isreg()), None)
            handle = tar.extractfile(member) if member is not None else None
            return handle.read().decode(errors="replace") if handle is not None else ""

    def _serve_dirs(self, container: Container) -> None:
        """Make sure the container's /modelyo folders exist and are served (after a restart
        of the agent or of the VM)."""
        labels = container.labels
        token, key_id = labels.get(LABEL_CRYPTDIRS, ""), labels.get(LABEL_KEY_ID, "")
        if not TOKEN_RE.match(token) or not key_id:
            raise ContainerError(
                f"container {container.name} lacks its /modelyo labels; delete it and create "
                "it again"
            )
        if self._dirs.get(token) is None:
            self._dirs.open(token, key_id)
            self._dirs.set_owner(token, *self._container_user(container))

    def _recover(self) -> None:
        """Serve the folders of containers created before a restart; drop orphaned folders."""
        tokens = set()
        with _engine("listing containers"):
            ours = self._client.containers.list(
                all=True, filters={"label": f"{LABEL_AGENT}={self.agent_id}"}
            )
        for container in ours:
            token = container.labels.get(LABEL_CRYPTDIRS, "")
            tokens.add(token)
            try:
                self._serve_dirs(container)
            except (ContainerError, OSError, ValueError) as exc:
                log.warning("cannot serve /modelyo for container %s: %s", container.name, exc)
        for token in self._dirs.tokens():
            if token not in tokens:
                self._dirs.remove(token)

    def _info(self, container: Container) -> ContainerInfo:
        with _engine(f"inspecting container {container.name}"):
            container.reload()
        attrs = container.attrs
        state = attrs.get("State") or {}
        status = str(state.get("Status", "unknown"))
        labels = container.labels
        return ContainerInfo(
            name=str(attrs.get("Name", "")).lstrip("/"),
            id=container.id or "",
            image=labels.get(LABEL_IMAGE) or str(attrs.get("Config", {}).get("Image", "")),
            status=status,
            exit_code=int(state.get("ExitCode", 0)) if status in ("exited", "dead") else None,
            key_id=labels.get(LABEL_KEY_ID, ""),
            gpu=labels.get(LABEL_GPU) == "true",
            created_at=str(attrs.get("Created", "")),
        )


def _check_path(path: str) -> None:
    if not path.startswith("/") or "\0" in path:
        raise ContainerInvalidError(
            f"{path!r} is not an absolute path; give a path inside the container such as /tmp"
        )


def _engine_log_frames(
    client: docker.DockerClient, container: Container, follow: bool
) -> Iterator[tuple[str, bytes]]:
    """(stream, data) pairs of the container's logs, in the order the engine keeps them.

    The docker SDK has no public way to this: `Container.logs` drops each frame's stream
    type (docker-py issue #3253), and `attach(demux=True)` serves running containers only.
    So the engine's documented endpoint (`GET /containers/{id}/logs`, a multiplexed stream
    of 8-byte headers, the layout of `modelyo.api.logframes`) is called through the SDK's
    HTTP session with its public request API, and read here. Everything engine-specific is
    in this one function.
    """
    api = client.api
    url = f"{api.base_url}/v{api.api_version}/containers/{container.id}/logs"
    params = {"stdout": 1, "stderr": 1, "follow": int(follow), "tail": "all"}
    # No timeout: a followed container may be quiet for longer than the SDK's default.
    response = api.get(url, params=params, stream=True, timeout=None)
    try:
        response.raise_for_status()
    except requests.HTTPError as exc:
        response.close()
        raise docker.errors.create_api_error_from_http_exception(exc) from None
    tty = bool(container.attrs.get("Config", {}).get("Tty"))
    return _read_engine_frames(response, tty)


def _read_engine_frames(response: requests.Response, tty: bool) -> Iterator[tuple[str, bytes]]:
    """Read the engine's multiplexed log stream; closing this closes the response."""
    raw = response.raw
    try:
        if tty:  # a terminal has one stream, not multiplexed (the agent never makes these)
            while chunk := raw.read1(1 << 16):
                yield STDOUT, chunk
            return
        while header := raw.read(ENGINE_HEADER.size):
            length = len(header) == ENGINE_HEADER.size and ENGINE_HEADER.unpack(header)[1]
            data = raw.read(length) if length else b""
            if len(header) < ENGINE_HEADER.size or len(data) < length:
                raise ContainerError(
                    "the Docker engine's log stream ended inside a frame; read the logs again"
                )
            stream = _ENGINE_STREAMS.get(header[0])
            if stream and data:  # 0 would be stdin: not output
                yield stream, data
    finally:
        response.close()


def _guarded(stream: Iterator[bytes], what: str) -> Iterator[bytes]:
    """Yield from a Docker stream, mapping its errors; closing this closes the stream."""
    try:
        with _engine(what):
            yield from stream
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
