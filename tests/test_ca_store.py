"""The CA's state directory: sealing, exactly one owner (threads, processes, SIGKILL), crash
recovery, tamper detection, the process lock."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ca_enclave.sealing import SealedElsewhereError, SimulatedSealer
from ca_enclave.store import (
    AUDIT_FILE,
    OWNER_FILE,
    STATE_FILE,
    AlreadyOwnedError,
    OwnerRecord,
    StateLock,
    Store,
    spki_sha256,
)
from modelyo import audit, pki
from modelyo.api.ca import CaPolicy
from modelyo.errors import StateError
from modelyo.tee.sim import SimulatedPlatform

MRENCLAVE = hashlib.sha256(b"store test build").digest()


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sim")
    assert SimulatedPlatform(path).platform_secret  # created once, shared by the tests
    return path


@pytest.fixture(scope="module")
def sealer(sim_dir):
    return SimulatedSealer(SimulatedPlatform(sim_dir), MRENCLAVE)


@pytest.fixture
def state_dir(tmp_path):
    return tmp_path / "state"


def owner_record(store: Store, name: str = "owner") -> tuple[OwnerRecord, object]:
    key = pki.new_key()
    cert = pki.issue(
        key.public_key(),
        issuer_key=store.root_key,
        issuer_cert=store.root_certificate,
        role=pki.Role.OWNER,
        common_name=name,
    )
    record = OwnerRecord(
        spki_sha256=spki_sha256(key.public_key()),
        certificate=pki.cert_pem(cert),
        common_name=name,
        claimed_at=int(time.time()),
        ca_fingerprint=store.root_fingerprint,
    )
    return record, key


def events(store: Store) -> list[str]:
    return [e.event for e in store.audit_entries()]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


# --- creating and reopening ------------------------------------------------------------------


def test_create_then_reopen_gives_the_same_ca_and_keys(state_dir, sealer):
    policy = CaPolicy(root="simulation")
    store = Store.open(state_dir, sealer, initial_policy=policy)
    assert store.created
    assert store.policy == policy
    kek = store.keyring().kek("default", None)
    assert kek[0] == 1
    reopened = Store.open(state_dir, sealer, initial_policy=CaPolicy(root="intel"))
    assert not reopened.created
    assert reopened.root_fingerprint == store.root_fingerprint
    assert reopened.keyring().kek("default", None) == kek  # deterministic across restart
    assert reopened.policy == policy  # the initial policy seeds a new CA only
    assert events(reopened) == [audit.CA_CREATED]
    audit.verify_log(reopened.audit_entries(), reopened.root_certificate)


def test_directory_is_private_and_files_are_0600(state_dir, sealer):
    store = Store.open(state_dir, sealer)
    store.claim_ownership(owner_record(store)[0])
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    for name in (STATE_FILE, OWNER_FILE, AUDIT_FILE):
        assert stat.S_IMODE((state_dir / name).stat().st_mode) == 0o600, name


def test_an_open_directory_is_refused(tmp_path, sealer):
    path = tmp_path / "open"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)
    with pytest.raises(StateError, match="chmod 700"):
        Store.open(path, sealer)


def test_state_of_another_build_or_platform_is_refused_and_left_untouched(
    state_dir, sealer, sim_dir, tmp_path
):
    store = Store.open(state_dir, sealer)
    store.claim_ownership(owner_record(store)[0])
    before = snapshot(state_dir)
    other_build = SimulatedSealer(SimulatedPlatform(sim_dir), hashlib.sha256(b"x").digest())
    with pytest.raises(SealedElsewhereError, match="restore the matching CA build"):
        Store.open(state_dir, other_build)
    other_platform = SimulatedSealer(SimulatedPlatform(tmp_path / "sim2"), MRENCLAVE)
    with pytest.raises(SealedElsewhereError, match="another CA build or platform"):
        Store.open(state_dir, other_platform)
    assert snapshot(state_dir) == before


def test_rotation_adds_versions_and_old_ones_survive_restart(state_dir, sealer):
    store = Store.open(state_dir, sealer)
    v1 = store.keyring().kek("project", 1)
    assert store.rotate() == 2
    assert store.rotate() == 3
    reopened = Store.open(state_dir, sealer)
    ring = reopened.keyring()
    assert ring.current == 3
    assert ring.kek("project", 1) == v1
    assert ring.kek("project", 2)[1] != v1[1]
    assert events(reopened).count(audit.KEY_ROTATED) == 2


# --- ownership --------------------------------------------------------------------------------


def test_ownership_is_granted_once_and_a_retry_by_the_owner_gets_the_same(state_dir, sealer):
    store = Store.open(state_dir, sealer)
    first, _ = owner_record(store, "first")
    assert store.claim_ownership(first) == (first, True)
    second, _ = owner_record(store, "second")
    with pytest.raises(AlreadyOwnedError, match="already owned"):
        store.claim_ownership(second)
    retry = first.model_copy(update={"claimed_at": first.claimed_at + 5})
    assert store.claim_ownership(retry) == (first, False)
    assert events(store) == [audit.CA_CREATED, audit.OWNERSHIP]
    assert Store.open(state_dir, sealer).owner == first


def test_fifty_threads_claiming_give_exactly_one_owner(state_dir, sealer):
    store = Store.open(state_dir, sealer)
    records = [owner_record(store, f"t{i}")[0] for i in range(50)]
    barrier = threading.Barrier(len(records))
    results: list[str] = []

    def claim(record: OwnerRecord) -> None:
        barrier.wait()
        try:
            store.claim_ownership(record)
            results.append(record.spki_sha256)
        except AlreadyOwnedError:
            results.append("refused")

    threads = [threading.Thread(target=claim, args=(r,)) for r in records]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [r for r in results if r != "refused"]
    assert len(winners) == 1 and results.count("refused") == 49
    assert Store.open(state_dir, sealer).owner.spki_sha256 == winners[0]


CLAIMER = r"""
import os, sys, time
from ca_enclave.sealing import SimulatedSealer
from ca_enclave.store import AlreadyOwnedError, OwnerRecord, Store, spki_sha256
from modelyo import pki
from modelyo.tee.sim import SimulatedPlatform

state, sim, mrenclave, go = sys.argv[1:5]
store = Store.open(state, SimulatedSealer(SimulatedPlatform(sim), bytes.fromhex(mrenclave)))
key = pki.new_key()
name = f"process {os.getpid()}"
cert = pki.issue(key.public_key(), issuer_key=store.root_key, issuer_cert=store.root_certificate,
                 role=pki.Role.OWNER, common_name=name)
record = OwnerRecord(spki_sha256=spki_sha256(key.public_key()), certificate=pki.cert_pem(cert),
                     common_name=name, claimed_at=int(time.time()),
                     ca_fingerprint=store.root_fingerprint)
print("ready", record.spki_sha256, flush=True)
while not os.path.exists(go):
    time.sleep(0.0005)
try:
    store.claim_ownership(record)
    print("won", flush=True)
except AlreadyOwnedError:
    print("lost", flush=True)
"""


def _spawn_claimers(count: int, state_dir: Path, sim_dir: Path, go: Path):
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, str(state_dir), str(sim_dir), MRENCLAVE.hex(), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    keys = []
    for process in processes:
        line = process.stdout.readline().split()
        assert line and line[0] == "ready", process.stderr.read()
        keys.append(line[1])
    return processes, keys


def test_processes_racing_to_claim_give_exactly_one_owner(state_dir, sealer, sim_dir, tmp_path):
    Store.open(state_dir, sealer)
    go = tmp_path / "go"
    processes, keys = _spawn_claimers(6, state_dir, sim_dir, go)
    go.touch()
    outcomes = [p.communicate(timeout=60)[0].strip() for p in processes]
    assert sorted(outcomes) == ["lost"] * 5 + ["won"], outcomes
    winner = keys[outcomes.index("won")]
    reopened = Store.open(state_dir, sealer)
    assert reopened.owner.spki_sha256 == winner
    assert events(reopened) == [audit.CA_CREATED, audit.OWNERSHIP]


def test_sigkill_during_claims_leaves_at_most_one_owner(sealer, sim_dir, tmp_path):
    rng = random.Random(1234)
    for round_number in range(4):
        state_dir = tmp_path / f"state{round_number}"
        Store.open(state_dir, sealer)
        go = tmp_path / f"go{round_number}"
        processes, keys = _spawn_claimers(5, state_dir, sim_dir, go)
        go.touch()
        time.sleep(rng.uniform(0, 0.02))
        for process in processes:
            process.send_signal(signal.SIGKILL)
        printed = [p.communicate(timeout=30)[0].split() for p in processes]
        reported = [keys[i] for i, out in enumerate(printed) if out == ["won"]]
        assert len(reported) <= 1
        # Restart: whatever the kill interrupted, the directory opens and agrees with itself.
        store = Store.open(state_dir, sealer)
        audit.verify_log(store.audit_entries(), store.root_certificate)
        ownerships = events(store).count(audit.OWNERSHIP)
        assert ownerships <= 1
        if reported:
            assert store.owner is not None and store.owner.spki_sha256 == reported[0]
        if store.owner is not None:
            assert store.owner.spki_sha256 in keys and ownerships == 1
            with pytest.raises(AlreadyOwnedError):
                store.claim_ownership(owner_record(store, "late")[0])
        else:
            assert not (state_dir / OWNER_FILE).exists()
            assert store.claim_ownership(owner_record(store, "late")[0])[1]
        assert not list(state_dir.glob(".owner.*.tmp"))


# --- crashes at each step, made deterministic ---------------------------------------------------


def test_crash_between_the_link_and_the_state_write_keeps_the_linked_owner(
    state_dir, sealer, monkeypatch
):
    store = Store.open(state_dir, sealer)
    record, _ = owner_record(store)

    def crash(*_args, **_kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(store, "_commit", crash)
    with pytest.raises(RuntimeError):
        store.claim_ownership(record)
    assert (state_dir / OWNER_FILE).exists()
    reopened = Store.open(state_dir, sealer)
    assert reopened.owner == record
    last = reopened.audit_entries()[-1]
    assert last.event == audit.OWNERSHIP and last.details["recovered"] is True
    with pytest.raises(AlreadyOwnedError):
        reopened.claim_ownership(owner_record(reopened, "second")[0])
    audit.verify_log(reopened.audit_entries(), reopened.root_certificate)


def test_crash_between_the_state_write_and_the_log_append_is_repaired(
    state_dir, sealer, monkeypatch
):
    store = Store.open(state_dir, sealer)
    monkeypatch.setattr(Store, "_append", lambda self, entry: (_ for _ in ()).throw(OSError()))
    with pytest.raises(OSError):
        store.rotate()
    monkeypatch.undo()
    assert len((state_dir / AUDIT_FILE).read_bytes().splitlines()) == 1
    reopened = Store.open(state_dir, sealer)
    assert events(reopened) == [audit.CA_CREATED, audit.KEY_ROTATED]
    assert len((state_dir / AUDIT_FILE).read_bytes().splitlines()) == 2
    assert reopened.keyring().current == 2


def test_a_half_written_last_line_is_dropped_and_the_entry_restored(state_dir, sealer):
    store = Store.open(state_dir, sealer)
    store.rotate()
    path = state_dir / AUDIT_FILE
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + lines[1][:40])  # the append was cut short
    reopened = Store.open(state_dir, sealer)
    assert events(reopened) == [audit.CA_CREATED, audit.KEY_ROTATED]
    assert path.read_bytes() == b"".join(lines)


# --- tampering ----------------------------------------------------------------------------------


def test_a_deleted_owner_file_is_detected_not_reopened(state_dir, sealer):
    store = Store.open(state_dir, sealer)
    store.claim_ownership(owner_record(store)[0])
    (state_dir / OWNER_FILE).unlink()
    with pytest.raises(StateError, match="state tampered: owner record missing"):
        Store.open(state_dir, sealer)
    assert not (state_dir / OWNER_FILE).exists()


def test_an_owner_file_copied_from_another_ca_is_set_aside_never_adopted(tmp_path, sealer):
    Store.open(tmp_path / "ours", sealer)
    theirs = Store.open(tmp_path / "theirs", sealer)
    theirs.claim_ownership(owner_record(theirs)[0])
    shutil.copy(tmp_path / "theirs" / OWNER_FILE, tmp_path / "ours" / OWNER_FILE)
    reopened = Store.open(tmp_path / "ours", sealer)
    assert reopened.owner is None
    assert [p.name.startswith(f"{OWNER_FILE}.void-") for p in (tmp_path / "ours").iterdir()].count(
        True
    ) == 1
    assert reopened.claim_ownership(owner_record(reopened)[0])[1]


def test_an_interrupted_claim_decides_nothing_but_a_damaged_owner_file_of_an_owned_ca_stops_it(
    state_dir, sealer
):
    store = Store.open(state_dir, sealer)
    (state_dir / OWNER_FILE).write_bytes(b"MYSEAL1\n" + bytes(20))  # creation cut short
    reopened = Store.open(state_dir, sealer)
    assert reopened.owner is None
    winner, _ = owner_record(reopened)
    assert reopened.claim_ownership(winner) == (winner, True)
    blob = (state_dir / OWNER_FILE).read_bytes()
    (state_dir / OWNER_FILE).write_bytes(blob[:-3])
    with pytest.raises(StateError, match="failed authentication"):
        Store.open(state_dir, sealer)
    assert store.owner is None  # the first instance never saw an owner: nothing shared


def test_without_hard_links_exclusive_creation_decides(state_dir, sealer, monkeypatch):
    """Gramine has no link(): the fallback still gives exactly one owner among threads."""
    import errno

    def no_link(*_args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(os, "link", no_link)
    store = Store.open(state_dir, sealer)
    records = [owner_record(store, f"t{i}")[0] for i in range(10)]
    barrier = threading.Barrier(len(records))
    outcomes: list[bool] = []

    def claim(record):
        barrier.wait()
        try:
            outcomes.append(store.claim_ownership(record)[1])
        except AlreadyOwnedError:
            outcomes.append(False)

    threads = [threading.Thread(target=claim, args=(r,)) for r in records]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count(True) == 1
    assert not list(state_dir.glob(".owner.*.tmp"))
    assert Store.open(state_dir, sealer).owner == store.owner


def test_a_missing_state_file_with_an_owner_or_log_left_is_refused(state_dir, sealer):
    store = Store.open(state_dir, sealer)
    store.claim_ownership(owner_record(store)[0])
    (state_dir / STATE_FILE).unlink()
    with pytest.raises(StateError, match=r"state\.sealed is missing"):
        Store.open(state_dir, sealer)
    assert not (state_dir / STATE_FILE).exists()  # no new CA was created over the remains


def test_an_edited_log_entry_stops_the_ca(state_dir, sealer):
    store = Store.open(state_dir, sealer)
    store.rotate()
    path = state_dir / AUDIT_FILE
    path.write_bytes(path.read_bytes().replace(b'"version":2', b'"version":7'))
    with pytest.raises(StateError, match=r"does not verify .*seq 1"):
        Store.open(state_dir, sealer)


def test_a_shortened_log_or_a_rolled_back_state_stops_the_ca(state_dir, sealer):
    store = Store.open(state_dir, sealer)
    store.rotate()
    store.rotate()
    path = state_dir / AUDIT_FILE
    full = path.read_bytes()
    lines = full.splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:1]))  # two entries gone: more than a crash can explain
    with pytest.raises(StateError, match="ends at seq 0 but the sealed state expects seq 2"):
        Store.open(state_dir, sealer)
    path.write_bytes(full)
    old_state = (state_dir / STATE_FILE).read_bytes()
    Store.open(state_dir, sealer).rotate()
    (state_dir / STATE_FILE).write_bytes(old_state)  # an older sealed state put back
    with pytest.raises(StateError, match="rolled back"):
        Store.open(state_dir, sealer)


# --- the process lock ----------------------------------------------------------------------------


def test_a_second_lock_on_the_directory_is_refused_with_the_holder(state_dir):
    state_dir.mkdir(mode=0o700)
    with StateLock(state_dir):
        with pytest.raises(StateError, match=f"another modelyo-ca \\(pid {os.getpid()}\\)"):
            StateLock(state_dir).acquire()
    StateLock(state_dir).acquire().release()  # free again once released
