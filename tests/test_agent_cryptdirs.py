"""The containers' /modelyo folders: the agent's service on its own (host folders on tmpfs), the
in-container helper against it, and real containers using the helper with the Docker engine."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelyo import incontainer
from modelyo.api.agent import ContainerSpec
from modelyo.encryption import ReleasedKey, StaticKeySource, decrypt_bytes, encrypt_bytes
from modelyo.errors import ConfigError, CryptFolderError, KeyUnavailableError
from tdx_agent.containers import ContainerRuntime
from tdx_agent.cryptdirs import BoundKeys, CryptDirs, filesystem_type, mount_fstype

KEYS = StaticKeySource({"alpha": {1: b"A" * 32}, "beta": {1: b"B" * 32}})
MIB = 1 << 20


def wait_for(path: Path, timeout: float = 20.0) -> Path:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.01)
    return path


def put(folder: Path, name: str, data: bytes) -> None:
    """Write as a well-behaved client does: a hidden name, then a rename."""
    tmp = folder / f".{name}.part"
    tmp.write_bytes(data)
    tmp.rename(folder / name)


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path("/dev/shm") / f"modelyo-test-{uuid.uuid4().hex[:12]}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def service(root) -> Iterator[CryptDirs]:
    with CryptDirs(root / "dirs", KEYS, workers=2) as dirs:
        yield dirs


# --- pure parts --------------------------------------------------------------------------------


def test_mount_fstype_picks_the_innermost_mount() -> None:
    info = (
        "22 1 8:1 / / rw - ext4 /dev/vda rw\n"
        "30 22 0:5 / /dev/shm rw,nosuid - tmpfs shm rw\n"
        "31 22 0:6 / /mnt/with\\040space rw - tmpfs x rw\n"
        "32 30 8:1 /x /dev/shm/bound rw - ext4 /dev/vda rw\n"
    )
    assert mount_fstype(info, "/dev/shm/modelyo/abc") == "tmpfs"
    assert mount_fstype(info, "/dev/shmx") == "ext4"
    assert mount_fstype(info, "/var/lib") == "ext4"
    assert mount_fstype(info, "/mnt/with space/a") == "tmpfs"
    assert mount_fstype(info, "/dev/shm/bound/file") == "ext4"  # a disk bound inside tmpfs


def test_bound_keys_give_only_the_containers_key_and_cache_it() -> None:
    calls: list[tuple[str, int | None]] = []

    class Counting:
        def key(self, key_id: str, version: int | None) -> ReleasedKey:
            calls.append((key_id, version))
            return KEYS.key(key_id, version)

    bound = BoundKeys(Counting(), "alpha", ttl=60)
    assert bound.key("alpha", None) == bound.key("alpha", None) == bound.key("alpha", 1)
    assert calls == [("alpha", None)]
    with pytest.raises(KeyUnavailableError, match="may use only key id 'alpha'"):
        bound.key("beta", 1)
    assert calls == [("alpha", None)]  # the other key id was never even asked for
    expiring = BoundKeys(Counting(), "alpha", ttl=0)
    expiring.key("alpha", None)
    expiring.key("alpha", None)
    assert calls.count(("alpha", None)) == 3


def test_root_must_be_on_tmpfs(tmp_path) -> None:
    if filesystem_type(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is itself on tmpfs here")
    with pytest.raises(ConfigError, match="not tmpfs"):
        CryptDirs(tmp_path / "dirs", KEYS)


# --- the service on host folders ---------------------------------------------------------------


def test_files_are_encrypted_and_decrypted_with_the_containers_key(service, root) -> None:
    dirs = service.open("c1", "alpha")
    service.set_owner("c1", 1000, 1001)
    assert dirs.mounts()["/modelyo/enc_in"] == str(dirs.base / "enc_in")
    for folder in ("enc_in", "enc_out", "dec_in", "dec_out"):
        st = (dirs.base / folder).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1000, 1001, 0o700)
    assert (dirs.base.stat().st_mode & 0o777, (dirs.base / "work").stat().st_uid) == (0o700, 0)

    put(dirs.base / "enc_in", "report.csv", b"a,b\n1,2\n")
    sealed = wait_for(dirs.base / "enc_out" / "report.csv")
    assert decrypt_bytes(sealed.read_bytes(), KEYS) == b"a,b\n1,2\n"
    assert sealed.stat().st_uid == 1000  # the container's user may read and remove it
    assert not (dirs.base / "enc_in" / "report.csv").exists()  # the input is taken

    put(dirs.base / "dec_in", "in.bin", encrypt_bytes(b"secret rows", KEYS, "alpha"))
    plain = wait_for(dirs.base / "dec_out" / "in.bin")
    assert plain.read_bytes() == b"secret rows"
    assert not (dirs.base / "dec_in" / "in.bin").exists()
    assert service.wait_idle(10)
    assert list((dirs.base / "work").iterdir()) == []
    # The same name again replaces the earlier result.
    put(dirs.base / "dec_in", "in.bin", encrypt_bytes(b"newer rows", KEYS, "alpha"))
    deadline = time.monotonic() + 10
    while plain.read_bytes() != b"newer rows":
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_failures_write_name_error_and_no_output(service, root) -> None:
    dirs = service.open("c2", "alpha")
    good = encrypt_bytes(os.urandom(3 * MIB), KEYS, "alpha")
    cases = {
        # A flipped byte in the middle, a cut-off end, another container's key id, not
        # encrypted at all.
        "tampered.enc": good[: len(good) // 2]
        + bytes([good[len(good) // 2] ^ 1])
        + good[1 + len(good) // 2 :],
        "truncated.enc": good[:-100],
        "beta.enc": encrypt_bytes(b"for beta only", KEYS, "beta"),
        "plain.txt": b"just text",
    }
    expected = {
        "tampered.enc": "failed authentication",
        "truncated.enc": "failed authentication",
        "beta.enc": "may use only key id 'alpha'",
        "plain.txt": "",
    }
    for name, data in cases.items():
        put(dirs.base / "dec_in", name, data)
    for name, reason in expected.items():
        text = wait_for(dirs.base / "dec_out" / f"{name}.error").read_text()
        assert text.startswith(f"could not decrypt /modelyo/dec_in/{name}: "), text
        assert reason in text
        assert str(root) not in text  # the container learns nothing of the host's layout
        assert not (dirs.base / "dec_out" / name).exists()
        assert not (dirs.base / "dec_in" / name).exists()
    assert service.wait_idle(10)
    assert list((dirs.base / "work").iterdir()) == []  # no partial plaintext anywhere
    # A later success for the same name removes the stale error.
    put(dirs.base / "dec_in", "beta.enc", encrypt_bytes(b"ok now", KEYS, "alpha"))
    assert wait_for(dirs.base / "dec_out" / "beta.enc").read_bytes() == b"ok now"
    assert not (dirs.base / "dec_out" / "beta.enc.error").exists()


def test_a_file_is_taken_only_once_it_is_closed(service) -> None:
    dirs = service.open("c3", "alpha")
    first, second = os.urandom(2 * MIB), os.urandom(2 * MIB)
    with (dirs.base / "enc_in" / "slow.bin").open("wb") as f:
        f.write(first)
        f.flush()
        time.sleep(0.5)  # a slow writer: nothing may happen yet
        assert (dirs.base / "enc_in" / "slow.bin").exists()
        assert not (dirs.base / "enc_out" / "slow.bin").exists()
        f.write(second)
    sealed = wait_for(dirs.base / "enc_out" / "slow.bin")
    assert decrypt_bytes(sealed.read_bytes(), KEYS) == first + second


def test_hidden_names_folders_and_links_are_not_followed(service, root) -> None:
    dirs = service.open("c4", "alpha")
    (dirs.base / "enc_in" / ".staging").write_bytes(b"not yet")
    (dirs.base / "enc_in" / "sub").mkdir()
    secret = root / "host-secret"
    secret.write_bytes(b"the host's secret")
    (dirs.base / "enc_in" / "leak").symlink_to(secret)
    # A link planted in the _out folder is replaced, never written through.
    victim = root / "victim"
    victim.write_bytes(b"untouched")
    (dirs.base / "enc_out" / "target").symlink_to(victim)
    put(dirs.base / "enc_in", "target", b"result")

    assert "is a folder" in wait_for(dirs.base / "enc_out" / "sub.error").read_text()
    assert "not a regular file" in wait_for(dirs.base / "enc_out" / "leak.error").read_text()
    assert not (dirs.base / "enc_out" / "leak").exists()
    out = wait_for(dirs.base / "enc_out" / "target")
    deadline = time.monotonic() + 10
    while out.is_symlink():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert decrypt_bytes(out.read_bytes(), KEYS) == b"result"
    assert victim.read_bytes() == b"untouched" and secret.read_bytes() == b"the host's secret"
    assert service.wait_idle(10)
    assert (dirs.base / "enc_in" / ".staging").read_bytes() == b"not yet"
    assert (dirs.base / "enc_in" / "sub").is_dir()  # a folder is left where it is
    assert not (dirs.base / "enc_out" / ".staging").exists()


def test_many_files_in_two_containers_and_a_large_one(service) -> None:
    a = service.open("many-a", "alpha")
    b = service.open("many-b", "beta")
    big = os.urandom(64 * MIB)
    count = 300

    def flood(dirs, key_id: str) -> None:
        for i in range(count):
            put(dirs.base / "enc_in", f"f{i:04d}", f"{key_id} {i}".encode())

    writers = [threading.Thread(target=flood, args=(d, k)) for d, k in ((a, "alpha"), (b, "beta"))]
    for w in writers:
        w.start()
    put(a.base / "enc_in", "big.bin", big)
    for w in writers:
        w.join()
    for dirs, key_id in ((a, "alpha"), (b, "beta")):
        for i in range(count):
            sealed = wait_for(dirs.base / "enc_out" / f"f{i:04d}", timeout=60)
            assert decrypt_bytes(sealed.read_bytes(), KEYS) == f"{key_id} {i}".encode()
    sealed_big = wait_for(a.base / "enc_out" / "big.bin", timeout=60).read_bytes()
    put(b.base / "dec_in", "big.bin", sealed_big)  # beta's container may not decrypt it
    put(a.base / "dec_in", "big.bin", sealed_big)
    assert (
        "may use only key id 'beta'" in wait_for(b.base / "dec_out" / "big.bin.error").read_text()
    )
    assert wait_for(a.base / "dec_out" / "big.bin", timeout=60).read_bytes() == big
    assert not (b.base / "enc_out" / "big.bin").exists()
    assert len(list((b.base / "enc_out").iterdir())) == count


def test_restart_serves_files_that_arrived_meanwhile_and_remove_deletes(root) -> None:
    with CryptDirs(root / "dirs", KEYS) as first:
        dirs = first.open("r1", "alpha")
        first.set_owner("r1", 1000, 1000)
    # The agent is down: a file arrives, and a job it was running left a temporary behind.
    put(dirs.base / "enc_in", "while-down", b"queued")
    (dirs.base / "work" / "in-deadbeef").write_bytes(b"leftover")
    old = time.time() - 10
    os.utime(dirs.base / "enc_in" / "while-down", (old, old))
    with CryptDirs(root / "dirs", KEYS) as second:
        assert second.tokens() == ["r1"]
        again = second.open("r1", "alpha")
        assert (again.uid, again.gid) == (1000, 1000)  # kept from the folders themselves
        sealed = wait_for(dirs.base / "enc_out" / "while-down")
        assert decrypt_bytes(sealed.read_bytes(), KEYS) == b"queued"
        assert not (dirs.base / "work" / "in-deadbeef").exists()
        second.remove("r1")
        assert second.tokens() == [] and not dirs.base.exists()


# --- the in-container helper against the service -------------------------------------------


def test_helper_round_trip_errors_and_timeout(service, root, monkeypatch, tmp_path, capsys):
    dirs = service.open("h1", "alpha")
    monkeypatch.setenv(incontainer.ROOT_ENV, str(dirs.base))
    source = tmp_path / "table.csv"
    source.write_bytes(b"x,y\n")
    sealed = incontainer.encrypt(source)
    assert sealed == dirs.base / "enc_out" / "table.csv"
    assert decrypt_bytes(sealed.read_bytes(), KEYS) == b"x,y\n"
    plain = incontainer.decrypt(sealed.read_bytes(), name="table.csv")
    assert plain == dirs.base / "dec_out" / "table.csv" and plain.read_bytes() == b"x,y\n"
    assert source.read_bytes() == b"x,y\n"  # the caller's file is copied, not moved

    foreign = encrypt_bytes(b"beta data", KEYS, "beta")
    with pytest.raises(CryptFolderError, match="may use only key id 'alpha'") as caught:
        incontainer.decrypt(foreign, name="foreign.enc")
    assert not caught.value.timed_out
    assert not (dirs.base / "dec_out" / "foreign.enc.error").exists()  # consumed by the helper

    for bad in (".hidden", "a/b", ""):
        with pytest.raises(CryptFolderError, match="plain file name"):
            incontainer.encrypt(b"x", name=bad)
    with pytest.raises(CryptFolderError, match="give name="):
        incontainer.encrypt(b"x")

    # The command line, reading standard input and copying the result out.
    out = tmp_path / "copy.enc"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"piped")))
    assert incontainer.main(["encrypt", "-", "-n", "piped.txt", "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert decrypt_bytes(out.read_bytes(), KEYS) == b"piped"
    assert not (dirs.base / "enc_out" / "piped.txt").exists()
    assert incontainer.main(["decrypt", str(source), "-t", "20"]) == 1
    assert "could not decrypt" in capsys.readouterr().err

    # Folders nobody serves: the helper gives up after its timeout and says why.
    unserved = tmp_path / "unserved"
    for folder in incontainer.FOLDERS:
        (unserved / folder).mkdir(parents=True)
    monkeypatch.setenv(incontainer.ROOT_ENV, str(unserved))
    with pytest.raises(CryptFolderError, match="no answer") as caught:
        incontainer.encrypt(b"x", name="x", timeout=0.2)
    assert caught.value.timed_out
    monkeypatch.setenv(incontainer.ROOT_ENV, str(tmp_path / "absent"))
    with pytest.raises(CryptFolderError, match="created by the Modelyo agent"):
        incontainer.encrypt(b"x", name="x")


# --- real containers -----------------------------------------------------------------------------

ROUND_TRIP = '''\
"""The owner's job: decrypt the input, transform it, encrypt the result."""
import subprocess, sys
from pathlib import Path
from modelyo import incontainer
from modelyo.errors import CryptFolderError

plain = incontainer.decrypt("/tmp/in/data.enc")
assert plain.parent == Path("/modelyo/dec_out"), plain
result = plain.read_bytes().upper()
plain.unlink()
incontainer.encrypt(result, name="result.enc")
# The command-line form, as a shell script would use it, copying the result out of /modelyo.
Path("/tmp/out").mkdir()
subprocess.run(
    [sys.executable, "-m", "modelyo.incontainer", "encrypt", "-", "-n", "cli.enc",
     "-o", "/tmp/out/cli.enc"],
    input=result[::-1], check=True,
)
try:
    incontainer.decrypt("/tmp/in/tampered.enc")
    print("TAMPERED-ACCEPTED")
except CryptFolderError as exc:
    print("TAMPERED-REFUSED:", exc)
'''

ISOLATION = '''\
"""Two of these run at once with different key ids: what does each see?"""
import json, os, sys, time
from modelyo import incontainer
from modelyo.errors import CryptFolderError

me = sys.argv[1]
incontainer.encrypt(me.encode(), name=me + ".marker")
time.sleep(1.5)  # the other container writes its marker meanwhile
listing = {f: sorted(os.listdir("/modelyo/" + f)) for f in incontainer.FOLDERS}
try:
    incontainer.decrypt("/tmp/in/alpha.enc")
    outcome = "decrypted"
except CryptFolderError as exc:
    outcome = str(exc)
print(json.dumps({"listing": listing, "outcome": outcome, "key": os.environ["MODELYO_KEY_ID"]}))
'''

BULK = '''\
"""Many small files at once through the helper, and one of 64 MiB both ways."""
import hashlib, os
from concurrent.futures import ThreadPoolExecutor
from modelyo import incontainer

def one(i):
    return incontainer.encrypt(f"row {i}\\n".encode() * (i + 1), name=f"small-{i:03d}", timeout=120)

with ThreadPoolExecutor(16) as pool:
    list(pool.map(one, range(100)))
big = os.urandom(64 << 20)
sealed = incontainer.encrypt(big, name="big.bin", timeout=120)
back = incontainer.decrypt(sealed, timeout=120)
assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(big).digest()
back.unlink()
print("BIG", hashlib.sha256(big).hexdigest())
'''


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.uid, info.gid, info.mode = len(data), 1000, 1000, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _untar(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}


@pytest.fixture(scope="module")
def job_tag(docker_client, tmp_path_factory) -> Iterator[str]:
    from tests.test_agent_containers import build_job_image

    jobs = {"round_trip.py": ROUND_TRIP, "isolation.py": ISOLATION, "bulk.py": BULK}
    tag = build_job_image(docker_client, tmp_path_factory.mktemp("ctx") / "c", jobs)
    yield tag
    docker_client.images.remove(tag, force=True)


@pytest.fixture
def runtime(docker_client, root, job_tag, tmp_path) -> Iterator[ContainerRuntime]:
    dirs = CryptDirs(root / "dirs", KEYS)
    rt = ContainerRuntime(
        docker_client,
        dirs,
        allowed_key_ids={"alpha", "beta"},
        gpus=0,
        agent_id=f"test-{uuid.uuid4().hex[:12]}",
        builtin_images=[job_tag],
    )
    yield rt
    for info in rt.list():
        rt.delete(info.name, force=True)
    dirs.close()


def _run(runtime: ContainerRuntime, name: str, timeout: float = 120) -> str:
    runtime.start(name)
    result = runtime.wait(name, timeout=timeout)
    logs = b"".join(runtime.logs(name)).decode()
    assert result.exit_code == 0, logs
    return logs


@pytest.mark.docker
def test_a_container_decrypts_its_input_and_encrypts_its_result(runtime, job_tag) -> None:
    name = f"t-{uuid.uuid4().hex[:12]}"
    runtime.create(
        ContainerSpec(
            image=job_tag,
            name=name,
            key_id="alpha",
            command=["python", "/jobs/round_trip.py"],
        )
    )
    data = encrypt_bytes(b"confidential measurements", KEYS, "alpha")
    tampered = bytearray(encrypt_bytes(b"x" * 5000, KEYS, "alpha"))
    tampered[-40] ^= 0x01
    runtime.put_archive(
        name, "/tmp", [_tar({"in/data.enc": data, "in/tampered.enc": bytes(tampered)})]
    )
    logs = _run(runtime, name)
    assert "TAMPERED-REFUSED: could not decrypt /modelyo/dec_in/tampered.enc" in logs
    assert "failed authentication" in logs

    # The owner fetches the encrypted results and decrypts them with the CA's key.
    results = _untar(b"".join(runtime.get_archive(name, "/modelyo/enc_out")))
    assert decrypt_bytes(results["enc_out/result.enc"], KEYS) == b"CONFIDENTIAL MEASUREMENTS"
    cli = _untar(b"".join(runtime.get_archive(name, "/tmp/out/cli.enc")))
    assert decrypt_bytes(cli["cli.enc"], KEYS) == b"STNEMERUSAEM LAITNEDIFNOC"
    # No plaintext was left in the folders, and the tampered input left no output.
    left = _untar(b"".join(runtime.get_archive(name, "/modelyo/dec_out")))
    assert left == {}


@pytest.mark.docker
def test_two_containers_at_once_see_only_their_own_folders_and_key(
    docker_client, runtime, job_tag
) -> None:
    names = {}
    for key_id in ("alpha", "beta"):
        names[key_id] = f"t-{key_id}-{uuid.uuid4().hex[:8]}"
        runtime.create(
            ContainerSpec(
                image=job_tag,
                name=names[key_id],
                key_id=key_id,
                command=["python", "/jobs/isolation.py", key_id],
            )
        )
        for_alpha = encrypt_bytes(b"alpha's data", KEYS, "alpha")
        runtime.put_archive(names[key_id], "/tmp", [_tar({"in/alpha.enc": for_alpha})])
    for name in names.values():
        runtime.start(name)
    seen = {}
    for key_id, name in names.items():
        assert runtime.wait(name, timeout=120).exit_code == 0
        seen[key_id] = json.loads(b"".join(runtime.logs(name)).decode().splitlines()[-1])
    assert seen["alpha"]["outcome"] == "decrypted"
    assert "may use only key id 'beta'" in seen["beta"]["outcome"]
    for key_id, other in (("alpha", "beta"), ("beta", "alpha")):
        assert seen[key_id]["key"] == key_id
        assert seen[key_id]["listing"]["enc_out"] == [f"{key_id}.marker"], seen[key_id]
        assert all(f"{other}.marker" not in files for files in seen[key_id]["listing"].values())
    # Each container's /modelyo is bound to folders of its own.
    mounts = {
        key_id: {m["Source"] for m in docker_client.containers.get(name).attrs["Mounts"]}
        for key_id, name in names.items()
    }
    assert len(mounts["alpha"]) == 4 and mounts["alpha"].isdisjoint(mounts["beta"])


@pytest.mark.docker
def test_many_small_files_and_a_64_mib_file_from_a_container(runtime, job_tag) -> None:
    name = f"t-{uuid.uuid4().hex[:12]}"
    runtime.create(
        ContainerSpec(image=job_tag, name=name, key_id="beta", command=["python", "/jobs/bulk.py"])
    )
    logs = _run(runtime, name, timeout=300)
    digest = logs.split("BIG ")[1].split()[0]
    results = _untar(b"".join(runtime.get_archive(name, "/modelyo/enc_out")))
    assert len(results) == 101
    for i in range(100):
        expected = f"row {i}\n".encode() * (i + 1)
        assert decrypt_bytes(results[f"enc_out/small-{i:03d}"], KEYS) == expected
    big = decrypt_bytes(results["enc_out/big.bin"], KEYS)
    assert len(big) == 64 * MIB and hashlib.sha256(big).hexdigest() == digest
