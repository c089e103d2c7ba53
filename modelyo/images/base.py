"""The job base image `modelyo/python:3.11`, built without a container registry.

Three steps, each reused when its inputs have not changed:

1. a Debian bookworm root file system made by `mmdebstrap` and `docker import`-ed as
   `modelyo/debian:bookworm` (reused while its recipe, the package list, is the same);
2. wheels for pandas, pyarrow, cryptography and modelyo's dependencies, downloaded on the host
   for the engine's architecture and CPython 3.11 (cached per requirement set);
3. a Dockerfile build with the network off that puts those wheels and a freshly built modelyo
   wheel into a venv at /opt/modelyo.

The image carries a label with a hash of its inputs (modelyo's source, the wheel list, the Debian
base), so an unchanged tree is recognised at once and a changed one rebuilds only the top layer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.status import Status

from modelyo.errors import EngineError

if TYPE_CHECKING:
    import docker

DEFAULT_TAG = "modelyo/python:3.11"
DEBIAN_TAG = "modelyo/debian:bookworm"
DEBIAN_SUITE = "bookworm"
# Debian bookworm ships CPython 3.11, so the wheels are for exactly that interpreter.
PYTHON_VERSION = "3.11"
PYTHON_ABI = "cp311"
# bookworm has glibc 2.36: every manylinux wheel up to that level runs on it.
GLIBC_MINOR = 36
# libstdc++6: manylinux wheels with C++ inside (numpy, pyarrow) expect the system's copy.
DEBIAN_PACKAGES = ("python3", "python3-venv", "ca-certificates", "libstdc++6")
# What jobs can count on besides modelyo itself.
JOB_REQUIREMENTS = ("pandas", "pyarrow", "cryptography")

LABEL_INPUTS = "io.modelyo.inputs-hash"
LABEL_SOURCE = "io.modelyo.source-hash"
LABEL_WHEELS = "io.modelyo.wheels"
LABEL_BASE = "io.modelyo.base-image"
LABEL_VERSION = "io.modelyo.version"
LABEL_DEBIAN_RECIPE = "io.modelyo.debian-recipe"
# Set by Dockerfile.base on its first stage (the venv with the third-party wheels).
LABEL_STAGE = "io.modelyo.stage"
LABEL_DEPS_KEY = "io.modelyo.deps-key"

# Bumped when the way the image is put together changes in a way the hashed inputs do not show.
_RECIPE_VERSION = "1"
_SKIPPED_DIRS = frozenset({"__pycache__"})
_SKIPPED_SUFFIXES = (".pyc", ".pyo")
# Docker reports the kernel's name for the machine; Debian and manylinux use their own.
_ARCHES = {
    "x86_64": ("x86_64", "amd64"),
    "amd64": ("x86_64", "amd64"),
    "aarch64": ("aarch64", "arm64"),
    "arm64": ("aarch64", "arm64"),
}
# Host apt settings that mmdebstrap must share to reach the same archive the same way.
_FORWARDED_APT_OPTIONS = (
    "Acquire::http::Proxy",
    "Acquire::https::Proxy",
    "Acquire::Check-Valid-Until",
    "Acquire::Check-Date",
)


@dataclass(frozen=True)
class WheelSet:
    """Downloaded third-party wheels: the directory holding them and their file names."""

    directory: Path
    names: tuple[str, ...]


@dataclass(frozen=True)
class BuildResult:
    """What `build_base` did: the tag, the image id, its inputs hash and whether it was built."""

    tag: str
    image_id: str
    inputs_hash: str
    built: bool


# --- inputs and their hash ---------------------------------------------------------------------


def source_root() -> Path:
    """The checkout holding the modelyo package imported here (its wheel is built from it)."""
    import modelyo

    root = Path(modelyo.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise EngineError(
            f"the job base image is built from the modelyo source tree, but modelyo is installed "
            f"as a package at {root}; run `modelyo image build-base` from a checkout installed "
            f"with `pip install -e .` (or `make test`)"
        )
    return root


def source_files(root: Path) -> list[Path]:
    """The files that make up the modelyo wheel: pyproject.toml and the package, sorted."""
    files = [root / "pyproject.toml"]
    for directory, dirnames, filenames in os.walk(root / "modelyo"):
        # Pruning in place keeps os.walk out of caches and hidden folders.
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS and d[0] != ".")
        files.extend(
            Path(directory, name)
            for name in filenames
            if not name.endswith(_SKIPPED_SUFFIXES) and name[0] != "."
        )
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def source_digest(root: Path) -> str:
    """SHA-256 over the relative paths and contents of `source_files(root)`."""
    digest = hashlib.sha256()
    for path in source_files(root):
        with path.open("rb") as f:
            content = hashlib.file_digest(f, "sha256").hexdigest()
        digest.update(f"{path.relative_to(root).as_posix()}\0{content}\n".encode())
    return digest.hexdigest()


def inputs_digest(source: str, wheels: Iterable[str], base_image_id: str) -> str:
    """The hash the image is labelled with: modelyo's source, the wheel list and the base image."""
    document = {
        "recipe": _RECIPE_VERSION,
        "source": source,
        "wheels": sorted(wheels),
        "base": base_image_id,
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def requirements(root: Path) -> list[str]:
    """The third-party requirements of the image: the job libraries and modelyo's dependencies."""
    with (root / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)["project"]
    return [*JOB_REQUIREMENTS, *project.get("dependencies", [])]


def wheel_platforms(machine: str) -> list[str]:
    """pip `--platform` tags for a Linux engine on `machine`, newest glibc first."""
    arch = _arch(machine)[0]
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(GLIBC_MINOR, 16, -1)]
    # Older wheels are tagged only with the legacy alias of manylinux_2_17.
    return [*tags, f"manylinux2014_{arch}"]


def _arch(machine: str) -> tuple[str, str]:
    try:
        return _ARCHES[machine]
    except KeyError:
        raise EngineError(
            f"the Docker engine runs on {machine!r}; the job base image supports "
            f"{', '.join(sorted(_ARCHES))}: use an engine on one of those"
        ) from None


def cache_dir() -> Path:
    """Where downloads and scratch files live: $MODELYO_CACHE_DIR, else the XDG cache."""
    if explicit := os.environ.get("MODELYO_CACHE_DIR"):
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "modelyo"


# --- progress ----------------------------------------------------------------------------------


class _Steps:
    """One status line per step while it runs, and a line with its elapsed time when it ends."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._status: Status | None = None

    @contextmanager
    def step(self, title: str) -> Iterator[_Step]:
        started = time.monotonic()
        step = _Step(self, title, started)
        with self.console.status(title) as status:
            self._status = status
            try:
                yield step
            except BaseException:
                self.console.print(f"[red]✗[/] {title} [dim]({time.monotonic() - started:.1f} s)")
                raise
            finally:
                self._status = None
        self.console.print(
            f"[green]✓[/] {step.outcome or title} [dim]({time.monotonic() - started:.1f} s)"
        )

    def update(self, text: str) -> None:
        if self._status is not None:
            self._status.update(text)


class _Step:
    def __init__(self, steps: _Steps, title: str, started: float) -> None:
        self._steps = steps
        self.title = title
        self.started = started
        self.outcome = ""

    def progress(self, detail: str = "") -> None:
        elapsed = time.monotonic() - self.started
        self._steps.update(f"{self.title} [dim]{elapsed:.0f} s[/] {detail}".rstrip())


def _run_logged(cmd: Sequence[str], step: _Step, log: Path, failure: str) -> None:
    """Run `cmd` logging to `log`, ticking the status; EngineError with the log tail on failure."""
    with log.open("wb") as out:
        try:
            # stdin closed: mmdebstrap reads sources from a non-terminal stdin, pip might prompt.
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        except OSError as exc:
            raise EngineError(f"{failure}: cannot run {cmd[0]}: {exc}") from exc
        while True:
            try:
                code = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                step.progress()
    if code != 0:
        tail = _tail(log.read_text(errors="replace").splitlines(), 25)
        raise EngineError(f"{failure} (exit code {code}); last lines of {log}:\n{tail}")


def _tail(lines: Iterable[str], count: int) -> str:
    return "\n".join(deque((line.rstrip() for line in lines if line.strip()), maxlen=count))


# --- the Docker engine -------------------------------------------------------------------------


def connect(timeout: int = 900) -> docker.DockerClient:
    """A client for the engine DOCKER_HOST (or the default socket) names, checked to answer."""
    try:
        import docker
        import requests
    except ImportError:
        raise EngineError(
            "the docker Python SDK is not installed; install it with `pip install 'modelyo[agent]'`"
        ) from None
    where = os.environ.get("DOCKER_HOST", "the default socket (/var/run/docker.sock)")
    try:
        # A long timeout: importing a root file system and installing wheels are single calls.
        client = docker.from_env(timeout=timeout)
        client.ping()
    except (docker.errors.DockerException, requests.RequestException) as exc:
        raise EngineError(
            f"no Docker engine answers at {where}: {exc}; start one (on Debian as root, "
            f"scripts/ensure-docker.sh installs docker.io and starts dockerd), or install "
            f"Docker Engine or Docker Desktop, then check that `docker info` works"
        ) from exc
    return client


def _image_or_none(client: docker.DockerClient, ref: str) -> docker.models.images.Image | None:
    import docker

    try:
        return client.images.get(ref)
    except docker.errors.ImageNotFound:
        return None


def _tag(client: docker.DockerClient, image_id: str, ref: str) -> None:
    repository, _, tag = ref.rpartition(":")
    if not repository or "/" in tag:
        raise EngineError(f"image reference {ref!r} needs the form REPOSITORY:TAG")
    client.api.tag(image_id, repository, tag, force=True)


# --- step 1: the Debian root file system ------------------------------------------------------


def debian_mirrors() -> list[str]:
    """The apt source lines mmdebstrap uses: $MODELYO_DEBIAN_MIRROR, else deb.debian.org."""
    main = os.environ.get("MODELYO_DEBIAN_MIRROR", "http://deb.debian.org/debian").rstrip("/")
    security = os.environ.get(
        "MODELYO_DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security"
    ).rstrip("/")
    # Point releases and security fixes too: the image runs code on sensitive data.
    return [
        f"deb {main} {DEBIAN_SUITE} main",
        f"deb {main} {DEBIAN_SUITE}-updates main",
        f"deb {security} {DEBIAN_SUITE}-security main",
    ]


def host_apt_options() -> list[str]:
    """Proxy and date-check settings of the host's apt, to pass to mmdebstrap as --aptopt."""
    if shutil.which("apt-config") is None:
        return []
    try:
        dump = subprocess.run(
            ["apt-config", "dump"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [
        line.strip()
        for line in dump.splitlines()
        if line.split(" ", 1)[0] in _FORWARDED_APT_OPTIONS
    ]


def _debian_options(machine: str) -> list[str]:
    """The mmdebstrap options that decide what the root file system contains."""
    return [
        "--variant=essential",
        f"--architectures={_arch(machine)[1]}",
        f"--include={','.join(DEBIAN_PACKAGES)}",
        # Documentation is dead weight in a job image; copyright notices stay.
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    ]


def debian_recipe(machine: str) -> str:
    """Hash of what goes into the Debian base, so a changed package list re-bootstraps it."""
    document = [_RECIPE_VERSION, DEBIAN_SUITE, *_debian_options(machine)]
    return hashlib.sha256(json.dumps(document).encode()).hexdigest()


def mmdebstrap_command(machine: str, output: Path) -> list[str]:
    """The mmdebstrap call that writes a bookworm root file system with Python 3.11 to `output`."""
    return [
        "mmdebstrap",
        *_debian_options(machine),
        *(f"--aptopt={option}" for option in host_apt_options()),
        DEBIAN_SUITE,
        str(output),
        # Explicit sources: without them mmdebstrap reads sources from a non-terminal stdin.
        *debian_mirrors(),
    ]


def ensure_debian_base(
    client: docker.DockerClient, machine: str, steps: _Steps, *, force: bool = False
) -> tuple[str, str | None]:
    """`modelyo/debian:bookworm`, bootstrapped and imported when missing or stale.

    Returns its id and the id of the image it replaced, if any.
    """
    recipe = debian_recipe(machine)
    existing = _image_or_none(client, DEBIAN_TAG)
    if existing is not None and not force and existing.labels.get(LABEL_DEBIAN_RECIPE) == recipe:
        with steps.step(f"Debian base {DEBIAN_TAG}") as step:
            step.outcome = f"Debian base {DEBIAN_TAG} reused ({existing.short_id})"
        return existing.id, None

    if shutil.which("mmdebstrap") is None:
        raise EngineError(
            f"mmdebstrap is needed to build {DEBIAN_TAG} and is not installed; install it with "
            f"`apt-get install mmdebstrap` (Debian/Ubuntu), or run scripts/ensure-docker.sh as root"
        )
    scratch = cache_dir() / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch, prefix="rootfs-") as tmp:
        rootfs = Path(tmp, "rootfs.tar")
        with steps.step(f"mmdebstrap {DEBIAN_SUITE} ({', '.join(DEBIAN_PACKAGES)})") as step:
            _run_logged(
                mmdebstrap_command(machine, rootfs),
                step,
                Path(tmp, "mmdebstrap.log"),
                "mmdebstrap could not build the Debian root file system "
                "(check that the Debian mirror is reachable, or set MODELYO_DEBIAN_MIRROR)",
            )
            step.outcome = f"mmdebstrap {DEBIAN_SUITE}: {rootfs.stat().st_size / 2**20:.0f} MiB"
        with steps.step(f"docker import as {DEBIAN_TAG}") as step:
            image_id = _import_rootfs(client, rootfs, recipe)
            # Tagged only now that the import is complete.
            _tag(client, image_id, DEBIAN_TAG)
            step.outcome = f"imported {DEBIAN_TAG} ({image_id[:19]})"
    replaced = existing.id if existing is not None and existing.id != image_id else None
    return image_id, replaced


def _import_rootfs(client: docker.DockerClient, rootfs: Path, recipe: str) -> str:
    import docker

    changes = [
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV LANG=C.UTF-8",
        f"LABEL {LABEL_DEBIAN_RECIPE}={recipe}",
        'CMD ["/bin/bash"]',
    ]
    try:
        answer = client.api.import_image_from_file(str(rootfs), changes=changes)
    except docker.errors.DockerException as exc:
        raise EngineError(f"docker import of {rootfs} failed: {exc}") from exc
    # The engine answers with JSON messages; the last status is the new image's id.
    for line in reversed(str(answer).splitlines()):
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if "error" in message:
            raise EngineError(f"docker import of {rootfs} failed: {message['error']}")
        if str(message.get("status", "")).startswith("sha256:"):
            return message["status"]
    raise EngineError(f"docker import of {rootfs} returned no image id: {answer!r}")


# --- step 2: wheels ----------------------------------------------------------------------------


def wheel_set_key(reqs: Sequence[str], machine: str) -> str:
    """Names one resolution: the requirements, the target interpreter and the platform tags."""
    document = {
        "requirements": sorted(reqs),
        "python": PYTHON_VERSION,
        "abi": PYTHON_ABI,
        "platforms": wheel_platforms(machine),
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:20]


def cached_wheels(reqs: Sequence[str], machine: str) -> WheelSet | None:
    """The wheel set already downloaded for these requirements, if any."""
    directory = cache_dir() / "wheels" / f"{_arch(machine)[0]}-{wheel_set_key(reqs, machine)}"
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    names = tuple(manifest.get("wheels", ()))
    if not names or not all((directory / name).is_file() for name in names):
        return None
    return WheelSet(directory, names)


def download_wheels(
    reqs: Sequence[str], machine: str, steps: _Steps, *, refresh: bool = False
) -> WheelSet:
    """Wheels for `reqs` on CPython 3.11/`machine`, from the cache or downloaded with pip."""
    title = f"wheels for {', '.join(JOB_REQUIREMENTS)} and modelyo's dependencies"
    if not refresh and (cached := cached_wheels(reqs, machine)) is not None:
        with steps.step(title) as step:
            step.outcome = f"{len(cached.names)} wheels from the cache ({cached.directory.name})"
        return cached

    target = cache_dir() / "wheels" / f"{_arch(machine)[0]}-{wheel_set_key(reqs, machine)}"
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
    try:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            "--implementation=cp",
            f"--python-version={PYTHON_VERSION}",
            f"--abi={PYTHON_ABI}",
            *(f"--platform={tag}" for tag in wheel_platforms(machine)),
            f"--dest={staging}",
            *reqs,
        ]
        with steps.step(title) as step:
            _run_logged(
                cmd,
                step,
                staging / "pip.log",
                "pip could not download the wheels for the job image (check that PyPI is "
                "reachable and that every requirement has a manylinux wheel for CPython 3.11)",
            )
            names = tuple(sorted(p.name for p in staging.glob("*.whl")))
            (staging / "pip.log").unlink()
            _write_atomic(staging / "manifest.json", json.dumps({"wheels": names}, indent=1))
            # The set appears whole under its final name, or not at all.
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
            step.outcome = f"{len(names)} wheels downloaded ({target.name})"
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return WheelSet(target, names)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_modelyo_wheel(root: Path, dest: Path, log: Path, steps: _Steps) -> Path:
    """Build the modelyo wheel from the source tree `root` into `dest` (pip's output in `log`)."""
    with steps.step("modelyo wheel") as step:
        _run_logged(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--disable-pip-version-check",
                "--no-deps",
                f"--wheel-dir={dest}",
                str(root),
            ],
            step,
            log,
            f"pip could not build the modelyo wheel from {root}",
        )
        wheels = list(dest.glob("modelyo-*.whl"))
        if len(wheels) != 1:
            raise EngineError(f"expected one modelyo wheel in {dest}, found {wheels}")
        step.outcome = f"built {wheels[0].name}"
    return wheels[0]


# --- step 3: the image -------------------------------------------------------------------------


def dockerfile_text() -> str:
    """The Dockerfile of the job image (package data beside this module)."""
    return resources.files("modelyo.images").joinpath("Dockerfile.base").read_text()


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _build_image(
    client: docker.DockerClient,
    context: Path,
    labels: dict[str, str],
    deps_key: str,
    steps: _Steps,
    *,
    nocache: bool,
) -> str:
    import docker

    lines: deque[str] = deque(maxlen=30)
    image_id = ""
    with steps.step("docker build (network off)") as step:
        try:
            stream = client.api.build(
                path=str(context),
                dockerfile="Dockerfile",
                buildargs={"BASE": DEBIAN_TAG, "DEPS_KEY": deps_key},
                labels=labels,
                network_mode="none",  # every byte comes from the context
                pull=False,
                nocache=nocache,
                rm=True,
                forcerm=True,
                decode=True,
            )
            cached_steps = 0
            for chunk in stream:
                if "error" in chunk:
                    raise EngineError(
                        f"docker build of the job image failed: {chunk['error'].strip()} "
                        f"(the previous image, if any, keeps its tag; fix the cause shown "
                        f"below, or rebuild from scratch with --force); last build log lines:\n"
                        + "\n".join(lines)
                    )
                if aux := chunk.get("aux"):
                    image_id = aux.get("ID", image_id)
                for line in str(chunk.get("stream", "")).splitlines():
                    if not line.strip():
                        continue
                    lines.append(line.rstrip())
                    if line.startswith("Step "):
                        step.progress(line.strip()[:80])
                    elif "Using cache" in line:
                        cached_steps += 1
        except docker.errors.DockerException as exc:
            raise EngineError(
                f"docker build of the job image failed: {exc}; last build log lines:\n"
                + "\n".join(lines)
            ) from exc
        if not image_id:
            raise EngineError(
                "docker build finished without an image id; last build log lines:\n"
                + "\n".join(lines)
            )
        step.outcome = f"docker build: {image_id[:19]} ({cached_steps} steps from cache)"
    return image_id


def build_base(
    tag: str = DEFAULT_TAG, *, force: bool = False, console: Console | None = None
) -> BuildResult:
    """Make sure `tag` is the job base image for the current modelyo tree; build what is stale.

    `force` bootstraps Debian again, downloads the wheels again and builds without the cache.
    """
    steps = _Steps(console or Console(stderr=True))
    with steps.step("Docker engine") as step:
        client = connect()
        info = client.info()
        machine = str(info.get("Architecture", ""))
        _arch(machine)
        step.outcome = f"Docker engine {info.get('ServerVersion', '?')} on {machine}"

    root = source_root()
    base_id, replaced_base = ensure_debian_base(client, machine, steps, force=force)
    wheels = download_wheels(requirements(root), machine, steps, refresh=force)
    source = source_digest(root)
    digest = inputs_digest(source, wheels.names, base_id)

    current = _image_or_none(client, tag)
    if current is not None and not force and current.labels.get(LABEL_INPUTS) == digest:
        steps.console.print(f"[green]✓[/] {tag} is up to date ({current.short_id})")
        return BuildResult(tag, current.id, digest, built=False)

    import modelyo

    scratch = cache_dir() / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch, prefix="context-") as tmp:
        context = Path(tmp, "context")
        (context / "wheels" / "deps").mkdir(parents=True)
        (context / "wheels" / "modelyo").mkdir()
        build_modelyo_wheel(root, context / "wheels" / "modelyo", Path(tmp, "pip-wheel.log"), steps)
        for name in wheels.names:
            _link_or_copy(wheels.directory / name, context / "wheels" / "deps" / name)
        (context / "Dockerfile").write_text(dockerfile_text())
        labels = {
            LABEL_INPUTS: digest,
            LABEL_SOURCE: source,
            LABEL_WHEELS: ",".join(sorted(wheels.names)),
            LABEL_BASE: base_id,
            LABEL_VERSION: modelyo.__version__,
        }
        deps_key = hashlib.sha256(f"{base_id}\n{labels[LABEL_WHEELS]}".encode()).hexdigest()[:20]
        image_id = _build_image(client, context, labels, deps_key, steps, nocache=force)

    # Tagged only after a successful build: a failure leaves the previous image in place.
    _tag(client, image_id, tag)
    _drop_replaced(client, current.id if current else None, image_id, deps_key, replaced_base)
    steps.console.print(f"[green]✓[/] {tag} built ({image_id[:19]})")
    return BuildResult(tag, image_id, digest, built=True)


def _drop_replaced(
    client: docker.DockerClient,
    old_image: str | None,
    new_image: str,
    deps_key: str,
    old_base: str | None,
) -> None:
    """Free what a rebuild made obsolete; the current first stage stays as the build cache."""
    import docker

    if old_image is not None and old_image != new_image:
        _remove_quietly(client, old_image)
    try:
        client.images.prune(
            filters={
                "dangling": True,
                "label": f"{LABEL_STAGE}=deps",
                "label!": f"{LABEL_DEPS_KEY}={deps_key}",
            }
        )
    except docker.errors.APIError:
        pass  # another prune or build is running: what is left goes next time
    if old_base is not None:
        _remove_quietly(client, old_base)


def _remove_quietly(client: docker.DockerClient, image_id: str) -> None:
    """Drop the image a rebuild replaced, unless something still uses it."""
    import docker

    try:
        client.images.remove(image_id)
    except docker.errors.APIError:
        pass  # still tagged elsewhere or used by a container: it stays, which is harmless
