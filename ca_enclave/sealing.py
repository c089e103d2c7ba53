"""Sealing: encrypting the CA's state so that only the same CA build on the same platform can
read it back.

Two sealers share one blob format:
- `SimulatedSealer`: the sealing key is derived from the simulated platform's secret and the
  MRENCLAVE the CA runs as (its simulated measurement), so another CA build, or the same build
  on another simulated platform, cannot unseal.
- `GramineSealer`: the key is Gramine's MRENCLAVE sealing key, read from
  ``/dev/attestation/keys/_sgx_mrenclave`` (16 bytes, derived by the CPU from its fused secret
  and the enclave's MRENCLAVE; Gramine Documentation/attestation.rst), so only this enclave
  build on this CPU can unseal.

In both cases the raw platform key is not used directly: the AES-256 key is
``HKDF-SHA256(platform key, salt=None, info=b"modelyo-seal-v1\\0" || kind || MRENCLAVE)``
(Gramine warns against using its keys for two purposes as they are).

Blob, version 1 (all fields fixed-size)::

    magic      8   b"MYSEAL1\\n"
    version    1   1
    kind       1   1 = simulated platform, 2 = Gramine SGX
    mrenclave  32  the MRENCLAVE the blob was sealed for (public; shown in error messages)
    key_id     32  SHA-256(b"modelyo-seal-key-id-v1\\0" || AES key): identifies the key, and
                   so the (platform, MRENCLAVE) pair it is bound to, without revealing it
    nonce      12  random
    ciphertext     AES-256-GCM(data), with AAD = the 74 header bytes before the nonce
                   || u8 len(purpose) || purpose

`purpose` ("state", "owner", ...) keeps one sealed file from being passed off as another.
A blob whose key id differs from this sealer's was sealed by another CA build or platform
(`SealedElsewhereError`); a blob that fails authentication was altered (`StateError`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from abc import ABC, abstractmethod
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from modelyo.errors import StateError
from modelyo.tee.sim import SimulatedPlatform

MAGIC = b"MYSEAL1\n"
VERSION = 1
KIND_SIMULATED = 1
KIND_GRAMINE = 2
KIND_NAMES = {KIND_SIMULATED: "SIMULATED platform", KIND_GRAMINE: "SGX enclave (Gramine)"}
SEAL_INFO = b"modelyo-seal-v1\0"
KEY_ID_DOMAIN = b"modelyo-seal-key-id-v1\0"
NONCE_SIZE = 12
_HEADER = struct.Struct(">8sBB32s32s")  # magic, version, kind, mrenclave, key id
HEADER_SIZE = _HEADER.size  # 74
MIN_BLOB_SIZE = HEADER_SIZE + NONCE_SIZE + 16

GRAMINE_ROOT = Path("/dev/attestation")
GRAMINE_MRENCLAVE_KEY = "keys/_sgx_mrenclave"
GRAMINE_TARGET_INFO = "my_target_info"
GRAMINE_KEY_SIZE = 16


class SealedElsewhereError(StateError):
    """A blob was sealed under another key: another CA build, or another platform."""


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(KEY_ID_DOMAIN + key).digest()


def _aad(header: bytes, purpose: str) -> bytes:
    label = purpose.encode("ascii")
    if not 0 < len(label) < 256:
        raise ValueError("a sealing purpose is 1 to 255 ASCII characters")
    return header + bytes([len(label)]) + label


def describe_binding(kind: int, mrenclave: bytes, key_id: bytes) -> str:
    """Human words for what a sealing key is bound to."""
    name = KIND_NAMES.get(kind, f"unknown platform kind {kind}")
    return f"{name}, MRENCLAVE {mrenclave.hex()[:16]}…, sealing key id {key_id.hex()[:16]}…"


class Sealer(ABC):
    """Seals and unseals bytes to one (platform, MRENCLAVE) identity."""

    kind: int

    def __init__(self, platform_key: bytes, mrenclave: bytes) -> None:
        if len(mrenclave) != 32:
            raise ValueError(f"MRENCLAVE is 32 bytes, got {len(mrenclave)}")
        self.mrenclave = bytes(mrenclave)
        self._key = HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=None,
            info=SEAL_INFO + bytes([self.kind]) + self.mrenclave,
        ).derive(platform_key)
        self.key_id = _key_id(self._key)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"

    @property
    @abstractmethod
    def simulated(self) -> bool:
        """True when the key comes from the simulated platform (no hardware protection)."""

    def describe(self) -> str:
        """What this sealer's key is bound to, for messages (never the key itself)."""
        return describe_binding(self.kind, self.mrenclave, self.key_id)

    def seal(self, data: bytes, *, purpose: str) -> bytes:
        """Encrypt and authenticate `data` for this identity and `purpose`."""
        header = _HEADER.pack(MAGIC, VERSION, self.kind, self.mrenclave, self.key_id)
        nonce = os.urandom(NONCE_SIZE)
        return header + nonce + AESGCM(self._key).encrypt(nonce, data, _aad(header, purpose))

    def unseal(self, blob: bytes, *, purpose: str, where: str) -> bytes:
        """Decrypt a blob sealed by `seal` with the same identity and `purpose`.

        `where` names the file or directory for messages. Raises `SealedElsewhereError` when
        another identity sealed it and `StateError` when it is damaged or altered.
        """
        if len(blob) < MIN_BLOB_SIZE or blob[: len(MAGIC)] != MAGIC:
            raise StateError(
                f"{where} is not a Modelyo sealed file (bad magic or too short): it was "
                "replaced or damaged; restore it from a backup of the same state directory"
            )
        header = blob[:HEADER_SIZE]
        _magic, version, kind, mrenclave, key_id = _HEADER.unpack(header)
        if version != VERSION:
            raise StateError(
                f"{where} is sealed with format version {version}; this CA reads version "
                f"{VERSION}: run the CA build that wrote it"
            )
        if not hmac.compare_digest(key_id, self.key_id):
            same_build = kind == self.kind and mrenclave == self.mrenclave
            which = "same MRENCLAVE: another platform" if same_build else "another CA build"
            raise SealedElsewhereError(
                f"state in {where} was sealed by another CA build or platform (sealed for "
                f"{describe_binding(kind, mrenclave, key_id)}; this CA is {self.describe()}; "
                f"{which}); "
                "restore the matching CA build, or start with a new --state-dir (a new CA: "
                "its keys and owner are not carried over)"
            )
        nonce = blob[HEADER_SIZE : HEADER_SIZE + NONCE_SIZE]
        try:
            return AESGCM(self._key).decrypt(
                nonce, blob[HEADER_SIZE + NONCE_SIZE :], _aad(header, purpose)
            )
        except InvalidTag:
            raise StateError(
                f"{where} failed authentication: it was altered, truncated or swapped with "
                "another sealed file (state tampered); restore it from a backup of the same "
                "state directory"
            ) from None


class SimulatedSealer(Sealer):
    """Sealing on the simulated platform: key from the platform secret and the MRENCLAVE."""

    kind = KIND_SIMULATED

    def __init__(self, platform: SimulatedPlatform, mrenclave: bytes) -> None:
        super().__init__(platform.platform_secret, mrenclave)

    @property
    def simulated(self) -> bool:
        return True


class GramineSealer(Sealer):
    """Sealing inside a Gramine SGX enclave with its MRENCLAVE sealing key."""

    kind = KIND_GRAMINE

    def __init__(self, root: Path = GRAMINE_ROOT, mrenclave: bytes | None = None) -> None:
        root = Path(root)
        key_path = root / GRAMINE_MRENCLAVE_KEY
        try:
            platform_key = key_path.read_bytes()
        except OSError as exc:
            raise StateError(
                f"cannot read Gramine's sealing key {key_path} ({exc.strerror or exc}): run the "
                "CA inside an SGX enclave with gramine-sgx (Gramine 1.5 or later), or use "
                "--platform simulated"
            ) from None
        if len(platform_key) != GRAMINE_KEY_SIZE:
            raise StateError(
                f"Gramine's sealing key {key_path} is {len(platform_key)} bytes, expected "
                f"{GRAMINE_KEY_SIZE}: this is not Gramine's /dev/attestation interface"
            )
        if mrenclave is None:
            mrenclave = _gramine_mrenclave(root)
        super().__init__(platform_key, mrenclave)

    @property
    def simulated(self) -> bool:
        return False


def _gramine_mrenclave(root: Path) -> bytes:
    # sgx_target_info_t starts with the enclave's MRENCLAVE (32 bytes) (Intel SDK sgx_report.h).
    path = root / GRAMINE_TARGET_INFO
    try:
        info = path.read_bytes()
    except OSError as exc:
        raise StateError(
            f"cannot read {path} ({exc.strerror or exc}) to learn this enclave's MRENCLAVE; "
            "run the CA under gramine-sgx"
        ) from None
    if len(info) < 32:
        raise StateError(f"{path} is {len(info)} bytes, too short for an SGX target info")
    return info[:32]
