"""The agent's container runtime against the machine's real Docker engine: loading `docker save`
tarballs (whole, truncated, corrupted, large), the container lifecycle with its errors, archive
copy in and out, and what other agents' or foreign containers look like (invisible)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tarfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest

from modelyo.api.agent import ContainerSpec
from modelyo.encryption import StaticKeySource
from modelyo.errors import (
    ContainerConflictError,
    ContainerError,
    ContainerInvalidError,
    ContainerNotFoundError,
    UploadTooLargeError,
)
from modelyo.images.base import DEFAULT_TAG
from tdx_agent.containers import (
    LABEL_AGENT,
    LABEL_CRYPTDIRS,
    ContainerRuntime,
    check_save_tarball,
    resolve_user,
)
from tdx_agent.cryptdirs import CryptDirs

REPO = Path(__file__).resolve().parent.parent
SITE = "/opt/modelyo/lib/python3.11/site-packages/modelyo"
CHUNK = 1 << 20
GIB = 1 << 30
KEYS = StaticKeySource({"default": {1: b"d" * 32}, "alpha": {1: b"a" * 32}, "beta": {1: b"b" * 32}})

# The job image of these tests: the base image plus the current in-container helper (the base
# image may predate it; `modelyo image build-base` puts it in for real), a unique file so that
# its top layer is new to the engine, and a non-root user so folder ownership matters.
DOCKERFILE = f"""\
FROM {DEFAULT_TAG}
COPY errors.py incontainer.py {SITE}/
COPY jobs/ /jobs/
COPY nonce.txt /nonce.txt
USER 1000:1000
"""


def build_job_image(client: docker.DockerClient, directory: Path, jobs: dict[str, str]) -> str:
    """Build the test job image from `directory` (scratch) with `jobs` in /jobs; return its tag."""
    try:
        client.images.get(DEFAULT_TAG)
    except docker.errors.ImageNotFound:
        pytest.fail(f"{DEFAULT_TAG} is missing: run `.venv/bin/modelyo image build-base`")
    nonce = uuid.uuid4().hex
    (directory / "jobs").mkdir(parents=True)
    for name, text in jobs.items():
        (directory / "jobs" / name).write_text(text)
    for name in ("errors.py", "incontainer.py"):
        shutil.copy(REPO / "modelyo" / name, directory / name)
    (directory / "nonce.txt").write_text(nonce)
    (directory / "Dockerfile").write_text(DOCKERFILE)
    tag = f"modelyo-test/agent-job:{nonce[:12]}"
    client.images.build(path=str(directory), tag=tag, network_mode="none", rm=True, pull=False)
    return tag


def file_chunks(path: Path, limit: int | None = None, flip: int | None = None) -> Iterator[bytes]:
    """`path` in 1 MiB pieces, cut after `limit` bytes, with the byte at `flip` inverted."""
    sent = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            if limit is not None:
                chunk = chunk[: max(0, limit - sent)]
            if flip is not None and sent <= flip < sent + len(chunk):
                i = flip - sent
                chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
            if not chunk:
                return
            sent += len(chunk)
            yield chunk


def assert_not_loaded(client: docker.DockerClient, image_id: str, tag: str) -> None:
    """Neither the image nor its tag is on the engine (checked by name, not by comparing the
    whole image list, so other work on the same engine cannot disturb the test)."""
    with pytest.raises(docker.errors.ImageNotFound):
        client.images.get(image_id)
    with pytest.raises(docker.errors.ImageNotFound):
        client.images.get(tag)


def member_offset(path: Path, name: str) -> tuple[int, int]:
    with tarfile.open(path) as tar:
        info = tar.getmember(name)
        return info.offset_data, info.size


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_image(docker_client, tmp_path_factory) -> Iterator[tuple[Path, str, str]]:
    """A `docker save` of a freshly built job image, which is then removed from the engine:
    (tarball, tag, image id)."""
    scratch = tmp_path_factory.mktemp("job-image")
    tag = build_job_image(docker_client, scratch / "context", {"noop.py": "print('ok')\n"})
    image = docker_client.images.get(tag)
    tarball = scratch / "job.tar"
    with tarball.open("wb") as out:
        for chunk in image.save(chunk_size=CHUNK, named=True):
            out.write(chunk)
    docker_client.images.remove(image.id, force=True)
    yield tarball, tag, image.id
    with contextlib.suppress(docker.errors.ImageNotFound):
        docker_client.images.remove(image.id, force=True)
    tarball.unlink()


@pytest.fixture
def crypt_root() -> Iterator[Path]:
    root = Path("/dev/shm") / f"modelyo-test-{uuid.uuid4().hex[:12]}"
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def make_runtime(docker_client, crypt_root, tmp_path) -> Iterator:
    """Runtimes with their own agent id and folders; their containers are removed after."""
    made: list[tuple[ContainerRuntime, CryptDirs]] = []

    def make(**options) -> ContainerRuntime:
        dirs = CryptDirs(crypt_root / str(len(made)), KEYS)
        options.setdefault("allowed_key_ids", {"default", "alpha", "beta"})
        options.setdefault("gpus", 0)
        options.setdefault("agent_id", f"test-{uuid.uuid4().hex[:12]}")
        options.setdefault("state_dir", tmp_path / f"state-{len(made)}")
        runtime = ContainerRuntime(docker_client, dirs, **options)
        made.append((runtime, dirs))
        return runtime

    yield make
    for runtime, dirs in made:
        for container in docker_client.containers.list(
            all=True, filters={"label": f"{LABEL_AGENT}={runtime.agent_id}"}
        ):
            container.remove(force=True)
        dirs.close()


@pytest.fixture(scope="module")
def job_tag(docker_client, tmp_path_factory) -> Iterator[str]:
    """A job image for the lifecycle tests, used as a VM built-in image."""
    tag = build_job_image(docker_client, tmp_path_factory.mktemp("ctx") / "c", {"x.py": ""})
    yield tag
    docker_client.images.remove(tag, force=True)


# --- pure parts --------------------------------------------------------------------------------


def test_resolve_user_follows_dockers_rules() -> None:
    passwd = "root:x:0:0::/root:/bin/sh\nalice:x:1001:1002::/home/alice:/bin/sh\n"
    group = "root:x:0:\nstaff:x:50:\n"
    assert resolve_user("", passwd, group) == (0, 0)
    assert resolve_user("alice", passwd, group) == (1001, 1002)
    assert resolve_user("1001", passwd, group) == (1001, 1002)
    assert resolve_user("4242", passwd, group) == (4242, 0)  # unknown uid: group root
    assert resolve_user("alice:staff", passwd, group) == (1001, 50)
    assert resolve_user("7:8", "", "") == (7, 8)
    with pytest.raises(ContainerInvalidError, match="does not list"):
        resolve_user("bob", passwd, group)
    with pytest.raises(ContainerInvalidError, match="group 'wheel'"):
        resolve_user("alice:wheel", passwd, group)


def _save_tar(files: dict[str, bytes]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf


def _check(buf: io.BytesIO):
    # check_save_tarball reads with pread, so it needs a real file descriptor.
    import tempfile

    with tempfile.TemporaryFile() as f:
        f.write(buf.getvalue())
        f.flush()
        return check_save_tarball(f, len(buf.getvalue()))


def test_check_save_tarball_accepts_a_consistent_tar_and_names_what_is_wrong() -> None:
    layer = _save_tar({"hello": b"hi"}).getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    digest = hashlib.sha256(config).hexdigest()
    manifest = [{"Config": f"{digest}.json", "RepoTags": ["t:1"], "Layers": ["l/layer.tar"]}]
    files = {
        "l/layer.tar": layer,
        f"{digest}.json": config,
        "manifest.json": json.dumps(manifest).encode(),
    }
    (image,) = _check(_save_tar(files))
    assert (image.image_id, image.tags, image.layers) == ("sha256:" + digest, ("t:1",), 1)

    bad_layer = dict(files, **{"l/layer.tar": layer.replace(b"hi", b"ho")})
    with pytest.raises(ContainerInvalidError, match=r"layer 'l/layer.tar' is damaged"):
        _check(_save_tar(bad_layer))
    bad_config = dict(files, **{f"{digest}.json": config.replace(b"layers", b"Layers")})
    with pytest.raises(ContainerInvalidError, match="does not match its digest"):
        _check(_save_tar(bad_config))
    no_layer = {k: v for k, v in files.items() if k != "l/layer.tar"}
    with pytest.raises(ContainerInvalidError, match="missing from the tar"):
        _check(_save_tar(no_layer))
    with pytest.raises(ContainerInvalidError, match=r"no manifest\.json"):
        _check(_save_tar({"l/layer.tar": layer}))
    whole = _save_tar(files).getvalue()
    with pytest.raises(ContainerInvalidError, match="truncated"):
        _check(io.BytesIO(whole[: len(whole) - 10240 + 100]))
    with pytest.raises(ContainerInvalidError, match="not a tar archive"):
        _check(io.BytesIO(b"\x00garbage" * 100))


# --- loading -----------------------------------------------------------------------------------


@pytest.mark.docker
def test_truncated_uploads_load_nothing(docker_client, saved_image, make_runtime) -> None:
    tarball, tag, image_id = saved_image
    runtime = make_runtime()
    size = tarball.stat().st_size
    with contextlib.suppress(docker.errors.ImageNotFound):  # loaded by an earlier test
        docker_client.images.remove(image_id, force=True)
    assert_not_loaded(docker_client, image_id, tag)
    # Inside the first member, in the middle of the big base layer, and only the end marker.
    for limit in (700, size // 2, size - 1024):
        with pytest.raises(ContainerInvalidError, match="truncated") as caught:
            runtime.load(file_chunks(tarball, limit=limit), max_bytes=2 * GIB)
        assert "nothing was loaded" in str(caught.value)
        assert_not_loaded(docker_client, image_id, tag)
    assert runtime.images() == []


@pytest.mark.docker
def test_corrupted_uploads_load_nothing(docker_client, saved_image, make_runtime) -> None:
    tarball, tag, image_id = saved_image
    runtime = make_runtime()
    with contextlib.suppress(docker.errors.ImageNotFound):  # loaded by an earlier test
        docker_client.images.remove(image_id, force=True)
    with tarfile.open(tarball) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
    top_layer = member_offset(tarball, manifest[0]["Layers"][-1])
    config = member_offset(tarball, manifest[0]["Config"])
    for (offset, length), expected in (
        (top_layer, "is damaged"),
        (config, "does not match its digest"),
    ):
        with pytest.raises(ContainerInvalidError, match=expected):
            runtime.load(file_chunks(tarball, flip=offset + length // 2), max_bytes=2 * GIB)
        assert_not_loaded(docker_client, image_id, tag)
    with pytest.raises(ContainerInvalidError, match="not a tar archive"):
        runtime.load([os.urandom(4096)], max_bytes=GIB)
    with pytest.raises(UploadTooLargeError, match="limit"):
        runtime.load(file_chunks(tarball), max_bytes=10 * CHUNK)
    assert_not_loaded(docker_client, image_id, tag)


@pytest.mark.docker
def test_load_reports_the_images_and_only_loaded_ones_are_visible(
    docker_client, saved_image, make_runtime, tmp_path
) -> None:
    tarball, tag, image_id = saved_image
    runtime = make_runtime(state_dir=tmp_path / "state")
    (info,) = runtime.load(file_chunks(tarball), max_bytes=2 * GIB)
    assert info.id == image_id and info.tags == [tag] and info.size > 100 * 2**20
    assert docker_client.images.get(tag).id == image_id
    assert runtime.images() == [info]
    # The engine has other images (the base image at least); they are not the owner's.
    other = make_runtime(builtin_images=[DEFAULT_TAG])
    assert [i.tags for i in other.images()] == [[DEFAULT_TAG]]
    with pytest.raises(ContainerNotFoundError, match="load it first"):
        other.create(ContainerSpec(image=tag, name=f"t-{uuid.uuid4().hex[:8]}"))
    # Which images were loaded survives a restart of the agent (state_dir).
    again = make_runtime(state_dir=tmp_path / "state")
    assert again.images() == [info]


def _synthetic_save(
    client: docker.DockerClient, layer_size: int, tag: str
) -> tuple[Callable[[], Iterator[bytes]], str]:
    """A `docker save` tarball of a one-layer image whose layer holds `layer_size` bytes of
    incompressible data, as a function giving its chunks (never held in memory), and its id."""
    block = os.urandom(CHUNK)

    def layer_chunks() -> Iterator[bytes]:
        info = tarfile.TarInfo("blob")
        info.size = layer_size
        info.mode = 0o644
        yield info.tobuf(format=tarfile.GNU_FORMAT)
        for i in range(0, layer_size, CHUNK):
            yield (i.to_bytes(8, "big") + block[8:])[: min(CHUNK, layer_size - i)]
        yield b"\0" * (-layer_size % 512) + b"\0" * 1024

    arch = client.info()["Architecture"]
    digest = hashlib.sha256()
    layer_len = 0
    for chunk in layer_chunks():
        digest.update(chunk)
        layer_len += len(chunk)
    diff_id = "sha256:" + digest.hexdigest()
    config = json.dumps(
        {
            "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(arch, arch),
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps(
        [{"Config": config_name, "RepoTags": [tag], "Layers": ["l/layer.tar"]}]
    ).encode()

    def member(name: str, size: int) -> bytes:
        info = tarfile.TarInfo(name)
        info.size = size
        return info.tobuf(format=tarfile.GNU_FORMAT)

    def pad(size: int) -> bytes:
        return b"\0" * (-size % 512)

    def chunks() -> Iterator[bytes]:
        yield member("l/layer.tar", layer_len)
        yield from layer_chunks()
        yield pad(layer_len)
        for name, data in ((config_name, config), ("manifest.json", manifest)):
            yield member(name, len(data)) + data + pad(len(data))
        yield b"\0" * 1024

    return chunks, "sha256:" + config_name[:-5]


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


@pytest.mark.docker
@pytest.mark.slow
def test_loading_300_mb_keeps_memory_flat(docker_client, make_runtime) -> None:
    tag = f"modelyo-test/big:{uuid.uuid4().hex[:12]}"
    chunks, image_id = _synthetic_save(docker_client, 300 * 2**20, tag)
    runtime = make_runtime()
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    baseline = _rss_kib("VmRSS")
    try:
        (info,) = runtime.load(chunks(), max_bytes=2 * GIB)
        growth_mib = (_rss_kib("VmHWM") - baseline) / 1024
        assert info.id == image_id and info.tags == [tag]
        assert info.size >= 300 * 2**20
        print(f"peak RSS growth while loading a 300 MiB image: {growth_mib:.1f} MiB")
        assert growth_mib < 100, f"peak RSS grew by {growth_mib:.0f} MiB for a 300 MiB image"
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_client.images.remove(image_id, force=True)


@pytest.mark.docker
def test_gzipped_upload_loads_too(docker_client, make_runtime) -> None:
    tag = f"modelyo-test/gz:{uuid.uuid4().hex[:12]}"
    chunks, image_id = _synthetic_save(docker_client, 4 * CHUNK, tag)
    runtime = make_runtime()

    def gzipped() -> Iterator[bytes]:  # `docker save IMAGE | gzip`, streamed
        packer = zlib.compressobj(6, zlib.DEFLATED, 31)
        for chunk in chunks():
            yield packer.compress(chunk)
        yield packer.flush()

    whole = b"".join(gzipped())
    try:
        with pytest.raises(ContainerInvalidError, match="gzip stream is truncated"):
            runtime.load([whole[: len(whole) - 20]], max_bytes=GIB)
        with pytest.raises(docker.errors.ImageNotFound):
            docker_client.images.get(image_id)
        (info,) = runtime.load(
            [whole[i : i + 4096] for i in range(0, len(whole), 4096)], max_bytes=GIB
        )
        assert (info.id, info.tags) == (image_id, [tag])
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_client.images.remove(image_id, force=True)


# --- containers ----------------------------------------------------------------------------------


def _name() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.mark.docker
def test_container_lifecycle_and_its_errors(docker_client, job_tag, make_runtime) -> None:
    runtime = make_runtime(builtin_images=[job_tag])
    name = _name()
    command = ["python", "-c", "import sys; print('hello from', sys.argv); sys.exit(3)"]
    created = runtime.create(
        ContainerSpec(image=job_tag, name=name, command=command, environment={"A": "1"})
    )
    assert (created.name, created.status, created.key_id, created.gpu) == (
        name,
        "created",
        "default",
        False,
    )
    assert created.image == job_tag and created.exit_code is None
    assert [c.name for c in runtime.list()] == [name]
    assert runtime.inspect(name) == created

    with pytest.raises(ContainerConflictError, match="exists already"):
        runtime.create(ContainerSpec(image=job_tag, name=name))
    with pytest.raises(ContainerConflictError, match="has not been started"):
        runtime.wait(name, timeout=5)
    # Like `docker stop`: stopping what does not run is a no-op, not an error.
    assert runtime.stop(name).status == "created"

    started = runtime.start(name)
    assert started.status in ("running", "exited")
    result = runtime.wait(name, timeout=60)
    assert (result.exit_code, result.timed_out) == (3, False)
    assert b"hello from" in b"".join(runtime.logs(name))
    finished = runtime.inspect(name)
    assert (finished.status, finished.exit_code) == ("exited", 3)
    # An exited container can run again.
    runtime.start(name)
    assert runtime.wait(name, timeout=60).exit_code == 3
    assert b"".join(runtime.logs(name)).count(b"hello from") == 2

    container = docker_client.containers.get(name)
    assert container.attrs["HostConfig"]["NetworkMode"] == "bridge"
    assert "no-new-privileges" in container.attrs["HostConfig"]["SecurityOpt"]
    assert "A=1" in container.attrs["Config"]["Env"]
    assert "MODELYO_KEY_ID=default" in container.attrs["Config"]["Env"]
    mounts = {m["Destination"]: m["Source"] for m in container.attrs["Mounts"]}
    assert sorted(mounts) == [f"/modelyo/{f}" for f in ("dec_in", "dec_out", "enc_in", "enc_out")]
    base = Path(mounts["/modelyo/enc_in"]).parent
    assert base.is_dir() and oct(base.stat().st_mode & 0o777) == "0o700"
    assert (base / "enc_in").stat().st_uid == 1000  # the image's USER

    runtime.delete(name)
    assert not base.exists()
    assert runtime.list() == []
    for call in (runtime.inspect, runtime.start, runtime.stop, runtime.delete):
        with pytest.raises(ContainerNotFoundError, match="no container named"):
            call(name)
    with pytest.raises(ContainerNotFoundError):
        runtime.logs(name)


@pytest.mark.docker
def test_running_container_states_wait_timeout_and_follow(job_tag, make_runtime) -> None:
    runtime = make_runtime(builtin_images=[job_tag])
    name = _name()
    script = "import time\nfor i in range(3):\n    print('tick', i, flush=True); time.sleep(0.3)\n"
    sleeper = ["python", "-c", "import time; print('up', flush=True); time.sleep(120)"]
    runtime.create(ContainerSpec(image=job_tag, name=name, command=sleeper, key_id="beta"))
    runtime.start(name)
    with pytest.raises(ContainerConflictError, match="is running"):
        runtime.start(name)
    with pytest.raises(ContainerConflictError, match="stop it first"):
        runtime.delete(name)
    began = time.monotonic()
    waited = runtime.wait(name, timeout=1)
    assert waited.timed_out and waited.exit_code == -1
    assert time.monotonic() - began < 10
    assert runtime.inspect(name).status == "running"  # a timeout does not kill
    stopped = runtime.stop(name, timeout=1)
    assert stopped.status == "exited" and stopped.exit_code is not None
    runtime.delete(name)

    follower = _name()
    runtime.create(ContainerSpec(image=job_tag, name=follower, command=["python", "-c", script]))
    runtime.start(follower)
    lines = b"".join(runtime.logs(follower, follow=True))  # ends when the container exits
    assert lines.split() == [b"tick", b"0", b"tick", b"1", b"tick", b"2"]
    # Deleting a running container with force works and removes it.
    runtime.start(follower)
    runtime.delete(follower, force=True)
    assert runtime.list() == []


@pytest.mark.docker
def test_create_refusals(docker_client, job_tag, make_runtime) -> None:
    runtime = make_runtime(builtin_images=[job_tag], allowed_key_ids=lambda: {"alpha"})
    with pytest.raises(ContainerInvalidError, match="key id 'beta' is not allowed"):
        runtime.create(ContainerSpec(image=job_tag, name=_name(), key_id="beta"))
    # Allowed by the registration, but the key source (the CA) does not release it (any more).
    unreleased = make_runtime(builtin_images=[job_tag], allowed_key_ids={"alpha", "gamma"})
    with pytest.raises(ContainerInvalidError, match="key id 'gamma' is not released to this VM"):
        unreleased.create(ContainerSpec(image=job_tag, name=_name(), key_id="gamma"))
    assert unreleased.list() == []
    with pytest.raises(ContainerInvalidError, match="no GPU"):
        runtime.create(ContainerSpec(image=job_tag, name=_name(), key_id="alpha", gpu=True))
    with pytest.raises(ContainerNotFoundError, match="no image 'nope:1'"):
        runtime.create(ContainerSpec(image="nope:1", name=_name(), key_id="alpha"))
    # On the engine, but neither loaded by this agent nor built in.
    with pytest.raises(ContainerNotFoundError, match="load it first"):
        runtime.create(ContainerSpec(image=DEFAULT_TAG, name=_name(), key_id="alpha"))
    # A name taken by a container that is not ours is still taken.
    foreign = docker_client.containers.create(job_tag, name=_name())
    try:
        with pytest.raises(ContainerConflictError, match="exists already"):
            runtime.create(ContainerSpec(image=job_tag, name=foreign.name, key_id="alpha"))
        with pytest.raises(ContainerNotFoundError):
            runtime.inspect(foreign.name)
        with pytest.raises(ContainerNotFoundError):
            runtime.delete(foreign.name)
    finally:
        foreign.remove(force=True)
    assert runtime.list() == []
    assert runtime._dirs.tokens() == []  # no folders left behind by the refusals


@pytest.mark.docker
def test_gpu_request_on_an_engine_without_the_toolkit_says_so(job_tag, make_runtime) -> None:
    runtime = make_runtime(builtin_images=[job_tag], gpus=1)
    name = _name()
    info = runtime.create(ContainerSpec(image=job_tag, name=name, gpu=True, key_id="alpha"))
    assert info.gpu
    try:
        runtime.start(name)
    except ContainerError as exc:
        assert "NVIDIA Container Toolkit" in str(exc)
    else:  # an engine with GPUs: the container runs
        assert runtime.wait(name, timeout=60).exit_code == 0


@pytest.mark.docker
def test_other_agents_do_not_see_each_others_containers(job_tag, make_runtime) -> None:
    first = make_runtime(builtin_images=[job_tag])
    second = make_runtime(builtin_images=[job_tag])
    name = _name()
    first.create(ContainerSpec(image=job_tag, name=name))
    assert [c.name for c in first.list()] == [name]
    assert second.list() == []
    with pytest.raises(ContainerNotFoundError):
        second.inspect(name)


def _tar_of(files: dict[str, bytes], uid: int = 1000) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.uid, info.gid, info.mode = len(data), uid, uid, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.docker
def test_archive_copy_in_and_out(job_tag, make_runtime) -> None:
    runtime = make_runtime(builtin_images=[job_tag])
    name = _name()
    runtime.create(ContainerSpec(image=job_tag, name=name, command=["true"]))
    payload = os.urandom(3 * CHUNK + 17)
    tar = _tar_of({"in/data.bin": payload, "in/note.txt": b"note"})
    runtime.put_archive(name, "/tmp", [tar[i : i + 65536] for i in range(0, len(tar), 65536)])
    out = b"".join(runtime.get_archive(name, "/tmp/in"))
    with tarfile.open(fileobj=io.BytesIO(out)) as got:
        assert got.extractfile("in/data.bin").read() == payload
        assert got.extractfile("in/note.txt").read() == b"note"

    # A truncated tar changes nothing; a missing folder and a missing path are 404s.
    bad = _tar_of({"half/big.bin": payload})
    with pytest.raises(ContainerInvalidError, match="not a complete tar"):
        runtime.put_archive(name, "/tmp", [bad[: len(bad) // 2]])
    with pytest.raises(ContainerNotFoundError, match="no /tmp/half"):
        runtime.get_archive(name, "/tmp/half")
    with pytest.raises(ContainerNotFoundError, match="no folder /nowhere"):
        runtime.put_archive(name, "/nowhere", [tar])
    with pytest.raises(ContainerInvalidError, match="absolute"):
        runtime.get_archive(name, "tmp/in")
    with pytest.raises(UploadTooLargeError):
        runtime.put_archive(name, "/tmp", [tar], max_bytes=1000)


@pytest.mark.docker
def test_a_restarted_agent_serves_its_containers_again(docker_client, job_tag, crypt_root):
    agent = f"test-{uuid.uuid4().hex[:12]}"
    options = {"allowed_key_ids": {"alpha"}, "gpus": 0, "agent_id": agent}
    job = "from modelyo import incontainer; print(incontainer.encrypt(b'x', name='x'))"
    first_dirs = CryptDirs(crypt_root, KEYS)
    first = ContainerRuntime(docker_client, first_dirs, builtin_images=[job_tag], **options)
    name = _name()
    try:
        first.create(
            ContainerSpec(image=job_tag, name=name, key_id="alpha", command=["python", "-c", job])
        )
        first_dirs.close()  # the agent stops; the container and its folders stay
        (crypt_root / "0123abcd").mkdir()  # folders of a container deleted meanwhile
        with CryptDirs(crypt_root, KEYS) as dirs:
            again = ContainerRuntime(docker_client, dirs, builtin_images=[job_tag], **options)
            assert dirs.tokens() == [docker_client.containers.get(name).labels[LABEL_CRYPTDIRS]]
            again.start(name)
            assert again.wait(name, timeout=60).exit_code == 0
            assert b"/modelyo/enc_out/x" in b"".join(again.logs(name))
            again.delete(name)
            assert dirs.tokens() == []
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            docker_client.containers.get(name).remove(force=True)
