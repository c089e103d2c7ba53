"""The CA's audit log: a hash chain of events, each signed by the CA root key.

Pure logic, no I/O: the CA appends with `make_entry`, and `modelyo audit verify` checks a log
with `verify_log` / `audit_problems`.

An entry (wire model `modelyo.api.ca.AuditEntry`) has `seq` (0, 1, 2, ...), `time` (Unix
seconds), `event`, `details` (a JSON object), `prev`, `hash` and `signature`:

    canonical(entry) = JSON of {seq, time, event, details, prev}: keys sorted, separators
                       "," and ":", non-ASCII kept as UTF-8 (json.dumps(sort_keys=True,
                       separators=(",", ":"), ensure_ascii=False)), encoded UTF-8
    hash             = SHA-256(canonical(entry)), lowercase hex
    prev             = the previous entry's hash; 64 zeros for seq 0
    signature        = base64 of the DER ECDSA P-256 signature with SHA-256 over the 32 raw
                       bytes of `hash`, by the CA root key

Editing an entry breaks its hash (and so its signature); removing or reordering entries breaks
`seq` and `prev` at the first entry after the change. Removing entries from the end leaves a
valid shorter log: compare the last `seq` and `hash` with an earlier copy (the CA itself keeps
its last entry in its sealed state and refuses to start on a shortened log).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from modelyo.api.ca import AuditEntry
from modelyo.errors import ModelyoError

GENESIS = "0" * 64

# The events the CA records (the `event` field).
CA_CREATED = "ca-created"
OWNERSHIP = "ownership"
VM_REGISTERED = "vm-registered"
VM_REFUSED = "vm-refused"
POLICY_CHANGED = "policy-changed"
KEY_RELEASED = "key-released"
KEY_ROTATED = "key-rotated"
EVENTS = (
    CA_CREATED,
    OWNERSHIP,
    VM_REGISTERED,
    VM_REFUSED,
    POLICY_CHANGED,
    KEY_RELEASED,
    KEY_ROTATED,
)


class AuditError(ModelyoError):
    """An audit log does not verify; `seq` is the first entry found broken (None: the log)."""

    def __init__(self, message: str, seq: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq


@dataclass(frozen=True)
class AuditProblem:
    """One thing wrong with a log: at position `index`, where entry `seq` belongs."""

    index: int
    seq: int
    message: str

    def __str__(self) -> str:
        return f"seq {self.seq} (line {self.index + 1}): {self.message}"


def canonical(seq: int, time: int, event: str, details: Mapping[str, Any], prev: str) -> bytes:
    """The bytes an entry's hash covers (see the module docstring)."""
    body = {"seq": seq, "time": time, "event": event, "details": dict(details), "prev": prev}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(seq: int, time: int, event: str, details: Mapping[str, Any], prev: str) -> str:
    return hashlib.sha256(canonical(seq, time, event, details, prev)).hexdigest()


def make_entry(
    previous: AuditEntry | None,
    event: str,
    details: Mapping[str, Any],
    *,
    time: int,
    key: ec.EllipticCurvePrivateKey,
) -> AuditEntry:
    """The entry after `previous` (None: the first), hashed and signed with `key`."""
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r}")
    seq = 0 if previous is None else previous.seq + 1
    prev = GENESIS if previous is None else previous.hash
    # Round-trip through JSON so the entry holds exactly what a reader will parse back.
    plain = json.loads(json.dumps(dict(details), ensure_ascii=False))
    digest = entry_hash(seq, time, event, plain, prev)
    signature = key.sign(bytes.fromhex(digest), ec.ECDSA(hashes.SHA256()))
    return AuditEntry(
        seq=seq,
        time=time,
        event=event,
        details=plain,
        prev=prev,
        hash=digest,
        signature=base64.b64encode(signature).decode("ascii"),
    )


def _signature_ok(entry: AuditEntry, public_key: ec.EllipticCurvePublicKey) -> bool:
    try:
        signature = base64.b64decode(entry.signature, validate=True)
        public_key.verify(signature, bytes.fromhex(entry.hash), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def audit_problems(entries: Sequence[AuditEntry], ca_cert: x509.Certificate) -> list[AuditProblem]:
    """Everything wrong with a log, in order (empty when it verifies).

    Checks, per entry: `seq` equals its position, `prev` equals the previous entry's hash
    (64 zeros first), `hash` matches its content, and the signature verifies with the public
    key of `ca_cert` (the CA root).
    """
    public_key = ca_cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        return [AuditProblem(0, 0, "the CA certificate's key is not an EC key")]
    problems: list[AuditProblem] = []
    expected_prev, expected_seq = GENESIS, 0
    for index, entry in enumerate(entries):
        found: list[str] = []
        if entry.seq != expected_seq:
            found.append(
                f"seq {entry.seq} stands where seq {expected_seq} belongs: entries were removed, "
                "inserted or reordered here"
            )
        if not hmac.compare_digest(entry.prev, expected_prev):
            found.append(
                "prev does not match the previous entry's hash: an entry before this one was "
                "edited, removed or reordered"
            )
        recomputed = entry_hash(entry.seq, entry.time, entry.event, entry.details, entry.prev)
        if not hmac.compare_digest(entry.hash, recomputed):
            found.append("hash does not match the entry's content: the entry was edited")
        elif not _signature_ok(entry, public_key):
            found.append("signature does not verify with the CA root key: forged or another CA's")
        # Report where the log stops being what it should be: the seq expected at this place.
        problems.extend(AuditProblem(index, expected_seq, message) for message in found)
        expected_prev, expected_seq = entry.hash, entry.seq + 1
    return problems


def verify_log(entries: Sequence[AuditEntry], ca_cert: x509.Certificate) -> None:
    """Raise `AuditError` naming the first broken entry's seq, or return if the log verifies."""
    problems = audit_problems(entries, ca_cert)
    if problems:
        first = problems[0]
        raise AuditError(f"audit log broken at {first}", seq=first.seq)


def parse_line(line: str | bytes) -> AuditEntry:
    """One JSON line of the CA's log file."""
    return AuditEntry.model_validate_json(line)


def to_line(entry: AuditEntry) -> bytes:
    """One JSON line (with its newline) for the CA's log file."""
    return entry.model_dump_json().encode("utf-8") + b"\n"
