"""The CA's state directory: sealed state, the owner record, the audit log, and a lock.

Files (the directory is 0700, every file 0600):

    state.sealed   the sealed state (see `SealedState`): CA root key and certificate, master
                   key versions, VM policy, registered VMs, the owner, the last audit entry
    owner.sealed   the sealed owner record; created once, by an exclusive link
    audit.jsonl    the audit log, one JSON entry per line (`modelyo.audit`), append-only
    .lock          held (fcntl) by the one CA process serving the directory

Guarantees:
- Writes are atomic (`modelyo.files.atomic_write_bytes`) and fsynced; every change appends
  one signed audit entry. Order: the sealed state (which holds the new entry as its
  `audit_tail`) first, then the log line. A crash between the two is repaired at the next
  start by appending the tail from the sealed state; a log that is shorter than that, or
  longer, or whose chain or signatures break, stops the CA (`StateError`).
- Ownership is decided by the file system, not by "check then write": the sealed owner record
  is written to a temporary file, fsynced, and hard-linked to `owner.sealed`; `link` fails with
  EEXIST for everyone but the first, across threads, processes and crashes. (Where the file
  system has no hard links, as under Gramine, `open(O_CREAT | O_EXCL)` decides instead.) The
  primitive is `modelyo.service.state.create_exclusive`, shared with the TDX agent. The
  owner is then also recorded in the sealed state, and only then is the claimant answered. So:
  a deleted `owner.sealed` is detected at start ("state tampered: owner record missing")
  instead of reopening ownership; an `owner.sealed` without an owner in the state (a crash
  between the link and the state write) is adopted, and its claimant gets its certificate by
  claiming again with the same key; one that does not unseal while the state has no owner
  (a claim cut short) was never answered and is set aside as `owner.sealed.void-TIME`.
- State sealed under another identity is never overwritten: the CA refuses to start.

Limitation (rollback): sealing gives confidentiality and integrity, not freshness. Someone who
controls the host can stop the CA and put back an older copy of the whole directory (state,
owner file and log together); the CA cannot tell. On hardware this is closed by keeping a
monotonic counter outside the host's reach (a TPM NV counter, or a replicated counter service
between several CA enclaves) and sealing its value into the state; see docs/ca.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ca_enclave.keyring import MASTER_KEY_SIZE, Keyring
from ca_enclave.sealing import Sealer
from modelyo import audit, pki
from modelyo.api.ca import AuditEntry, CaPolicy
from modelyo.attestation.binding import spki_der
from modelyo.errors import ModelyoError, StateError
from modelyo.files import atomic_write_bytes, fsync_dir
from modelyo.service.state import StateLock as SharedStateLock
from modelyo.service.state import (
    create_exclusive,
    prepare_directory,
    remove_stale_temporaries,
)

STATE_FILE = "state.sealed"
OWNER_FILE = "owner.sealed"
AUDIT_FILE = "audit.jsonl"
STATE_FORMAT = 1
ROOT_COMMON_NAME = "Modelyo CA root"

log = logging.getLogger("modelyo.ca")


class AlreadyOwnedError(ModelyoError):
    """Ownership was claimed before; it is granted exactly once."""


# --- sealed records ------------------------------------------------------------------------


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OwnerRecord(_Record):
    """Who owns the CA: the public key of the first successful claim, and its certificate."""

    spki_sha256: str
    certificate: str
    common_name: str
    claimed_at: int
    ca_fingerprint: str = Field(description="the CA root this record belongs to")


class VmRecord(_Record):
    """A registered TDX VM, with the evidence it registered with (re-checked on policy change)."""

    vm_id: str
    name: str
    registered_at: int
    rule: str | None
    measurements: dict[str, str]
    tcb_status: str | None
    simulated: bool
    key_ids: list[str]
    spki: str = Field(description="hex DER SubjectPublicKeyInfo of the VM's key")
    server_certificate: str
    client_certificate: str
    issuer_certificate: str
    quote: str = Field(description="base64 quote the VM registered with")
    collateral: str = Field(description="collateral JSON it was verified with")


class SealedState(_Record):
    """Everything in `state.sealed`. Holds secrets: never log or print it."""

    format: Literal[1] = STATE_FORMAT
    created_at: int
    root_key: str = Field(repr=False)
    root_certificate: str
    master_keys: dict[int, str] = Field(repr=False)
    policy: CaPolicy
    owner: OwnerRecord | None = None
    vms: dict[str, VmRecord] = Field(default_factory=dict)
    audit_tail: AuditEntry | None = None


def spki_sha256(public_key: ec.EllipticCurvePublicKey) -> str:
    return hashlib.sha256(spki_der(public_key)).hexdigest()


# --- the process lock and the directory ------------------------------------------------------


class StateLock(SharedStateLock):
    """An exclusive fcntl lock on `DIR/.lock`: one CA process per state directory."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, program="modelyo-ca")


# --- the store ---------------------------------------------------------------------------------


class Store:
    """The CA's durable state. Thread-safe; one process per directory (see `StateLock`)."""

    def __init__(
        self,
        directory: Path,
        sealer: Sealer,
        state: SealedState,
        entries: list[AuditEntry],
        clock: Callable[[], float],
    ) -> None:
        self.directory = directory
        self._sealer = sealer
        self._state = state
        self._entries = entries
        self._clock = clock
        self._lock = threading.RLock()
        self._root_key = pki.load_private_key(state.root_key.encode("ascii"))
        self.root_certificate = pki.load_cert(state.root_certificate)
        self.root_fingerprint = pki.fingerprint(self.root_certificate)
        self.created = False
        # Entries written to the sealed state whose log line failed (disk error): retried first.
        self._unappended: list[AuditEntry] = []

    def __repr__(self) -> str:
        return f"<Store {self.directory} root={self.root_fingerprint[:16]}>"

    # --- opening -------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        sealer: Sealer,
        *,
        initial_policy: CaPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> Store:
        """Unseal the state in `directory`, or create a new CA there if it holds none.

        `initial_policy` is the VM policy of a new CA only. Raises `StateError` (nothing
        written) when the state was sealed elsewhere, altered or is inconsistent.
        """
        path = prepare_directory(Path(directory))
        if not (path / STATE_FILE).exists():
            leftovers = [name for name in (OWNER_FILE, AUDIT_FILE) if (path / name).exists()]
            if leftovers:
                raise StateError(
                    f"state tampered: {path / STATE_FILE} is missing but "
                    f"{' and '.join(leftovers)} exist; restore {STATE_FILE} from a backup, or "
                    "start a new CA with a new --state-dir"
                )
            return cls._create(path, sealer, initial_policy or CaPolicy(), clock)
        return cls._load(path, sealer, clock)

    @classmethod
    def _create(
        cls, path: Path, sealer: Sealer, policy: CaPolicy, clock: Callable[[], float]
    ) -> Store:
        root_key, root_cert = pki.create_root(ROOT_COMMON_NAME)
        state = SealedState(
            created_at=int(clock()),
            root_key=pki.private_key_pem(root_key).decode("ascii"),
            root_certificate=pki.cert_pem(root_cert),
            master_keys={1: secrets.token_bytes(MASTER_KEY_SIZE).hex()},
            policy=policy,
        )
        store = cls(path, sealer, state, [], clock)
        store.created = True
        store._commit(
            state,
            audit.CA_CREATED,
            {
                "ca_fingerprint": store.root_fingerprint,
                "sealed_for": sealer.describe(),
                "mrenclave": sealer.mrenclave.hex(),
                "simulated": sealer.simulated,
                "policy_sha256": _policy_digest(policy),
            },
        )
        return store

    @classmethod
    def _load(cls, path: Path, sealer: Sealer, clock: Callable[[], float]) -> Store:
        blob = _read(path / STATE_FILE)
        plain = sealer.unseal(blob, purpose="state", where=str(path))
        try:
            state = SealedState.model_validate_json(plain)
        except ValidationError as exc:
            raise StateError(
                f"the sealed state in {path} does not have the expected content "
                f"({exc.error_count()} problems): another CA version wrote it; run that version"
            ) from None
        root_key = pki.load_private_key(state.root_key.encode("ascii"))
        root_cert = pki.load_cert(state.root_certificate)
        if root_key.public_key() != root_cert.public_key():
            raise StateError(f"state tampered: the CA root key and certificate in {path} differ")
        entries, complete_bytes = _read_log(path / AUDIT_FILE)
        problems = audit.audit_problems(entries, root_cert)
        if problems:
            raise StateError(
                f"state tampered: the audit log {path / AUDIT_FILE} does not verify "
                f"({problems[0]}); restore it from a backup"
            )
        missing_tail = _reconcile_tail(path, entries, state.audit_tail)
        store = cls(path, sealer, state, entries, clock)
        void: str | None = None
        try:
            owner_record = store._read_owner_file()
        except StateError as exc:
            if state.owner is not None:
                raise
            # No owner in the sealed state means no claimant was ever answered, so a file that
            # does not unseal (a claim cut short, or junk) decides nothing: set it aside.
            owner_record, void = None, str(exc)
        if owner_record is None and state.owner is not None:
            raise StateError(
                f"state tampered: owner record missing ({path / OWNER_FILE} was deleted, but the "
                f"sealed state says the CA is owned since {_utc(state.owner.claimed_at)}); "
                "restore it from a backup. Ownership is not reopened."
            )
        if (
            owner_record is not None
            and state.owner is not None
            and owner_record.spki_sha256 != state.owner.spki_sha256
        ):
            raise StateError(
                f"state tampered: {path / OWNER_FILE} names another owner than the sealed state"
            )
        # Only now that everything checks out is anything written.
        if complete_bytes is not None:
            os.truncate(path / AUDIT_FILE, complete_bytes)  # drop a half-written last line
        if missing_tail is not None:
            store._append(missing_tail)
            store._entries.append(missing_tail)
        _remove_stale_temporaries(path)
        if void is not None:
            aside = path / f"{OWNER_FILE}.void-{int(clock())}"
            os.replace(path / OWNER_FILE, aside)
            fsync_dir(path)
            log.warning("set aside %s, which decided no ownership: %s", aside.name, void)
        if owner_record is not None and state.owner is None:
            # A crash between the link and the state write: the link decided, adopt its owner.
            store._commit(
                state.model_copy(update={"owner": owner_record}),
                audit.OWNERSHIP,
                _owner_details(owner_record) | {"recovered": True},
            )
        return store

    # --- reading ---------------------------------------------------------------------------

    @property
    def owner(self) -> OwnerRecord | None:
        return self._state.owner

    @property
    def policy(self) -> CaPolicy:
        return self._state.policy

    @property
    def vms(self) -> Mapping[str, VmRecord]:
        return dict(self._state.vms)

    @property
    def lock(self) -> threading.RLock:
        """Held by every change; hold it to read, decide and change as one step."""
        return self._lock

    @property
    def root_key(self) -> ec.EllipticCurvePrivateKey:
        return self._root_key

    def keyring(self) -> Keyring:
        return Keyring({v: bytes.fromhex(k) for v, k in self._state.master_keys.items()})

    def audit_entries(self) -> list[AuditEntry]:
        with self._lock:
            return list(self._entries)

    # --- changes (each appends one audit entry) -------------------------------------------

    def claim_ownership(self, record: OwnerRecord) -> tuple[OwnerRecord, bool]:
        """Make `record` the owner if nobody is: (owner, True) for the one winner.

        A claim by the current owner's key returns (owner, False) (a retried claim whose answer
        was lost); any other raises `AlreadyOwnedError`.
        """
        if record.ca_fingerprint != self.root_fingerprint:
            raise ValueError("owner record for another CA")
        with self._lock:
            current = self._state.owner
            if current is not None:
                return self._same_owner_or_refuse(current, record)
            blob = self._sealer.seal(record.model_dump_json().encode(), purpose="owner")
            if not self._create_owner_file(blob):
                try:
                    existing = self._read_owner_file()
                except StateError:
                    existing = None  # being written by a claim that won a moment ago
                if existing is None:
                    raise AlreadyOwnedError(
                        "this CA is already owned (another claim won just now); ownership is "
                        "granted once"
                    )
                return self._same_owner_or_refuse(existing, record)
            self._commit(
                self._state.model_copy(update={"owner": record}),
                audit.OWNERSHIP,
                _owner_details(record),
            )
            return record, True

    def _same_owner_or_refuse(
        self, owner: OwnerRecord, record: OwnerRecord
    ) -> tuple[OwnerRecord, bool]:
        if hmac.compare_digest(owner.spki_sha256, record.spki_sha256):
            return owner, False
        raise AlreadyOwnedError(already_owned_message(owner))

    def _create_owner_file(self, blob: bytes) -> bool:
        """Create `owner.sealed` holding `blob` unless it exists: True for the one creator.

        `modelyo.service.state.create_exclusive` decides (link, or O_EXCL without hard links).
        A crash while writing without hard links leaves a file that does not unseal; as no
        claimant was answered before the sealed state recorded the owner, the next start sets
        it aside.
        """
        return create_exclusive(self.directory / OWNER_FILE, blob)

    def put_vm(self, record: VmRecord, details: Mapping[str, Any]) -> None:
        """Add or replace a registered VM."""
        with self._lock:
            vms = dict(self._state.vms)
            vms[record.vm_id] = record
            self._commit(self._state.model_copy(update={"vms": vms}), audit.VM_REGISTERED, details)

    def set_policy(
        self, policy: CaPolicy, vms: Mapping[str, VmRecord], details: Mapping[str, Any]
    ) -> None:
        """Replace the VM policy, with the VMs' access recomputed under it."""
        with self._lock:
            self._commit(
                self._state.model_copy(update={"policy": policy, "vms": dict(vms)}),
                audit.POLICY_CHANGED,
                dict(details) | {"policy_sha256": _policy_digest(policy)},
            )

    def rotate(self) -> int:
        """Add a master key version; older versions stay for existing files."""
        with self._lock:
            masters = dict(self._state.master_keys)
            version = max(masters) + 1
            masters[version] = secrets.token_bytes(MASTER_KEY_SIZE).hex()
            self._commit(
                self._state.model_copy(update={"master_keys": masters}),
                audit.KEY_ROTATED,
                {"version": version},
            )
            return version

    def record(self, event: str, details: Mapping[str, Any]) -> AuditEntry:
        """An audit entry that changes nothing else (key releases, refusals)."""
        with self._lock:
            return self._commit(self._state, event, details)

    # --- writing -----------------------------------------------------------------------------

    def _commit(self, state: SealedState, event: str, details: Mapping[str, Any]) -> AuditEntry:
        with self._lock:
            entry = audit.make_entry(
                state.audit_tail, event, details, time=int(self._clock()), key=self._root_key
            )
            staged = state.model_copy(update={"audit_tail": entry})
            blob = self._sealer.seal(staged.model_dump_json().encode(), purpose="state")
            atomic_write_bytes(self.directory / STATE_FILE, blob, mode=0o600)
            self._state = staged
            self._entries.append(entry)
            self._unappended.append(entry)
            while self._unappended:
                self._append(self._unappended[0])
                self._unappended.pop(0)
            return entry

    def _append(self, entry: AuditEntry) -> None:
        path = self.directory / AUDIT_FILE
        new = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            data = audit.to_line(entry)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            fsync_dir(self.directory)

    def _read_owner_file(self) -> OwnerRecord | None:
        path = self.directory / OWNER_FILE
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read {path}: {exc.strerror or exc}") from None
        plain = self._sealer.unseal(blob, purpose="owner", where=str(path))
        try:
            record = OwnerRecord.model_validate_json(plain)
        except ValidationError:
            raise StateError(f"state tampered: {path} does not hold an owner record") from None
        if record.ca_fingerprint != self.root_fingerprint:
            raise StateError(
                f"state tampered: {path} belongs to another CA (root {record.ca_fingerprint[:16]}…"
                f", this CA's root is {self.root_fingerprint[:16]}…); it was copied in from "
                "another state directory"
            )
        return record


# --- helpers ---------------------------------------------------------------------------------


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror or exc}") from None


def _read_log(path: Path) -> tuple[list[AuditEntry], int | None]:
    """The complete entries of the log, and the size to truncate to if its last line is half
    written (a crash during an append), else None."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror or exc}") from None
    complete = data.rfind(b"\n") + 1
    truncate_to = complete if complete != len(data) else None
    entries: list[AuditEntry] = []
    for number, line in enumerate(data[:complete].splitlines(), start=1):
        try:
            entries.append(audit.parse_line(line))
        except ValidationError:
            raise StateError(
                f"state tampered: line {number} of {path} is not an audit entry; restore the "
                "log from a backup"
            ) from None
    return entries, truncate_to


def _reconcile_tail(
    path: Path, entries: list[AuditEntry], tail: AuditEntry | None
) -> AuditEntry | None:
    """The sealed tail entry if the log lacks just it (to append), else None; raise if the log
    and the sealed state disagree otherwise."""
    last = entries[-1] if entries else None
    if tail is None and last is None:
        return None
    if tail is not None and last is not None and last.seq == tail.seq:
        if hmac.compare_digest(last.hash, tail.hash):
            return None
    elif tail is not None and tail.seq == (last.seq + 1 if last else 0):
        if hmac.compare_digest(tail.prev, last.hash if last else audit.GENESIS):
            return tail
    ends = f"seq {last.seq}" if last else "nothing"
    expects = f"seq {tail.seq}" if tail else "no entry"
    raise StateError(
        f"state tampered: the audit log {path / AUDIT_FILE} ends at {ends} but the sealed state "
        f"expects {expects}: the log was shortened or replaced, or the state was rolled back; "
        "restore both from the same backup"
    )


def _remove_stale_temporaries(path: Path) -> None:
    # Claims that crashed before their link, writes that crashed before their rename: their
    # temporary files decided nothing.
    remove_stale_temporaries(path, OWNER_FILE)
    for leftover in path.glob(f".{STATE_FILE}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()


def _owner_details(record: OwnerRecord) -> dict[str, Any]:
    cert = pki.load_cert(record.certificate)
    return {
        "owner": record.common_name,
        "spki_sha256": record.spki_sha256,
        "certificate_sha256": pki.fingerprint(cert),
    }


def _policy_digest(policy: CaPolicy) -> str:
    return hashlib.sha256(
        json.dumps(policy.model_dump(mode="json"), sort_keys=True).encode()
    ).hexdigest()


def _utc(ts: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def already_owned_message(owner: OwnerRecord) -> str:
    """The refusal every later claim gets."""
    return (
        f"this CA is already owned (since {_utc(owner.claimed_at)}); ownership is granted "
        "once. Use the owner's ca_client.pem and ca_client.key, or start a new CA with a new "
        "--state-dir."
    )
