"""The agent's state directory: its key, its last registration with the CA, and its owner.

Files (the directory is 0700, every file 0600):

    agent.key          the agent's P-256 private key: TLS server key, CA client key and the key
                       of the VM's intermediate (vm-issuer); made on first start, never logged
    registration.json  the CA's answer to the last registration (certificates, vm id, key ids)
    vm_client.pem      the VM's client certificate (role vm), for key release from the CA
    owner.json         the owner: created once, by `modelyo.service.state.create_exclusive`
    .lock              held (fcntl) by the one agent process serving the directory

Why the key persists: the owner's certificate is issued by the VM's intermediate, whose key is
this key. A new key on each start would orphan the owner's certificate (and change the VM id,
which is derived from the key). The agent still registers again on every start, so the CA's
current policy decides each time whether it gets certificates and key access.

Ownership is decided exactly as the CA decides it (the shared primitive): the owner record is
written to a temporary file, fsynced and hard-linked to `owner.json` (or created with O_EXCL
where there are no hard links); only the first creator wins, across threads, processes and
crashes, and the claimant is answered only after that. A later claim with the owner's own key
gets the same certificate again (a retried claim whose answer was lost); any other gets
`AlreadyOwnedError`. An `owner.json` that does not parse can only be a claim cut short under
O_EXCL, never answered: it is set aside as `owner.json.void-TIME` at start.

Limitation: unlike the CA's sealed state, these files are protected by file modes only. On
hardware the directory must be on storage only the measured TD can read and write (an encrypted,
integrity-protected disk); otherwise the host could read the key or delete `owner.json`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modelyo import pki
from modelyo.attestation.binding import spki_der
from modelyo.errors import ModelyoError, StateError
from modelyo.files import atomic_write_bytes, fsync_dir
from modelyo.service.state import (
    StateLock,
    create_exclusive,
    prepare_directory,
    remove_stale_temporaries,
)

KEY_FILE = "agent.key"
REGISTRATION_FILE = "registration.json"
CLIENT_CERT_FILE = "vm_client.pem"
OWNER_FILE = "owner.json"

log = logging.getLogger("modelyo.agent")


class AlreadyOwnedError(ModelyoError):
    """The VM was claimed before; ownership is granted exactly once."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RegistrationRecord(_Record):
    """What the CA issued to this VM at its last registration."""

    vm_id: str
    name: str
    ca_url: str
    ca_fingerprint: str = Field(description="SHA-256 of the CA root certificate")
    registered_at: int
    server_certificate: str
    client_certificate: str
    issuer_certificate: str
    ca_certificate: str
    key_ids: list[str]


class OwnerRecord(_Record):
    """Who owns the VM: the public key of the first successful claim, and its certificate."""

    spki_sha256: str
    certificate: str
    common_name: str
    claimed_at: int
    vm_id: str
    ca_fingerprint: str = Field(description="the CA root the owner's certificate chains to")


def spki_sha256(public_key: ec.EllipticCurvePublicKey) -> str:
    return hashlib.sha256(spki_der(public_key)).hexdigest()


def _utc(ts: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def already_owned_message(owner: OwnerRecord) -> str:
    """The refusal every later claim gets."""
    return (
        f"this VM is already owned (since {_utc(owner.claimed_at)}); ownership is granted "
        "once. Use the owner's tdx_client.pem and tdx_client.key, or ask the owner."
    )


class AgentState:
    """The agent's durable state. Thread-safe; one process per directory (`StateLock`)."""

    def __init__(self, directory: Path, lock: StateLock, key: ec.EllipticCurvePrivateKey) -> None:
        self.directory = directory
        self._lock_file = lock
        self._lock = threading.RLock()
        self.key = key
        self.created = False
        self._registration: RegistrationRecord | None = None
        self._owner: OwnerRecord | None = None

    def __repr__(self) -> str:
        return f"<AgentState {self.directory}>"

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> AgentState:
        """Lock `directory` (created 0700) and load it, making the key on first use.

        Raises `StateError` when another agent serves it or a file is unusable.
        """
        path = prepare_directory(directory)
        lock = StateLock(path, program="modelyo-agent").acquire()
        try:
            key_path = path / KEY_FILE
            created = not key_path.exists()
            if created:
                pki.write_private_key(key_path, pki.new_key())
            try:
                key = pki.read_private_key(key_path)
            except ModelyoError as exc:
                raise StateError(f"the agent key {key_path} is unusable: {exc}") from None
            state = cls(path, lock, key)
            state.created = created
            state._registration = state._read_registration()
            remove_stale_temporaries(path, OWNER_FILE)
            state._owner = state._read_owner_or_set_aside()
        except BaseException:
            lock.release()
            raise
        return state

    def close(self) -> None:
        self._lock_file.release()

    # --- reading ---------------------------------------------------------------------------

    @property
    def key_path(self) -> Path:
        return self.directory / KEY_FILE

    @property
    def client_cert_path(self) -> Path:
        return self.directory / CLIENT_CERT_FILE

    @property
    def spki(self) -> bytes:
        return spki_der(self.key.public_key())

    @property
    def registration(self) -> RegistrationRecord | None:
        """The last registration on record (from this run or an earlier one)."""
        return self._registration

    @property
    def owner(self) -> OwnerRecord | None:
        return self._owner

    # --- changes ---------------------------------------------------------------------------

    def save_registration(self, record: RegistrationRecord) -> None:
        """Store the CA's certificates (atomically; the client certificate also as a file,
        for the TLS client that fetches keys)."""
        with self._lock:
            atomic_write_bytes(
                self.client_cert_path, record.client_certificate.encode("ascii"), mode=0o600
            )
            atomic_write_bytes(
                self.directory / REGISTRATION_FILE,
                record.model_dump_json(indent=2).encode("utf-8"),
                mode=0o600,
            )
            self._registration = record

    def claim_owner(self, record: OwnerRecord) -> tuple[OwnerRecord, bool]:
        """Make `record` the owner if nobody is: (owner, True) for the one winner.

        A claim by the current owner's key returns (owner, False); any other raises
        `AlreadyOwnedError`.
        """
        with self._lock:
            current = self._owner
            if current is not None:
                return _same_owner_or_refuse(current, record)
            data = record.model_dump_json(indent=2).encode("utf-8")
            if not create_exclusive(self.directory / OWNER_FILE, data):
                # Another process won (the lock makes that impossible in normal operation, but
                # the file system decides, not this process's memory).
                try:
                    existing = self._read_owner()
                except StateError:
                    existing = None  # being written by a claim that won a moment ago
                if existing is None:
                    raise AlreadyOwnedError(
                        "this VM is already owned (another claim won just now); ownership is "
                        "granted once"
                    )
                self._owner = existing
                return _same_owner_or_refuse(existing, record)
            self._owner = record
            return record, True

    # --- files -----------------------------------------------------------------------------

    def _read_registration(self) -> RegistrationRecord | None:
        path = self.directory / REGISTRATION_FILE
        try:
            return RegistrationRecord.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as exc:
            # Only a cache of the CA's last answer: the agent registers again anyway.
            log.warning("ignoring %s (%s); the agent registers again", path, type(exc).__name__)
            return None

    def _read_owner(self) -> OwnerRecord | None:
        path = self.directory / OWNER_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            return OwnerRecord.model_validate_json(data)
        except ValidationError:
            raise StateError(f"{path} does not hold an owner record") from None

    def _read_owner_or_set_aside(self) -> OwnerRecord | None:
        try:
            return self._read_owner()
        except StateError as exc:
            # Only an O_EXCL creation cut short by a crash leaves such a file, and its claimant
            # was never answered: it decided nothing.
            aside = self.directory / f"{OWNER_FILE}.void-{int(time.time())}"
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.directory / OWNER_FILE, aside)
                fsync_dir(self.directory)
            log.warning("set aside %s, which decided no ownership: %s", aside.name, exc)
            return None


def _same_owner_or_refuse(owner: OwnerRecord, record: OwnerRecord) -> tuple[OwnerRecord, bool]:
    if hmac.compare_digest(owner.spki_sha256, record.spki_sha256):
        return owner, False
    raise AlreadyOwnedError(already_owned_message(owner))
