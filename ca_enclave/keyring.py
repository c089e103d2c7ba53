"""Key-encryption keys (KEKs), derived from the CA's sealed master keys and never stored.

Each master key version is 32 random bytes, created at initialisation (version 1) and by each
rotation (the next version); old versions are kept so files written under them still decrypt.

    KEK = HKDF-SHA256(master[version], salt=None, info, length=32)

    info = b"modelyo-kek-v1\\0"
           || u8 len(purpose) || purpose      (ASCII, 1..255 bytes; "file" for file keys)
           || u8 len(key_id)  || key_id       (ASCII, 1..255 bytes)
           || u32 version                     (big-endian, 1..2^32-1)

Every variable-length field is length-prefixed, so no two (purpose, key id, version) triples
give the same info: ("ab", "c") and ("a", "bc") differ in their length bytes. The version is
in the info as well as selecting the master key, so a KEK is bound to its version even if two
master versions were ever equal.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEK_DOMAIN = b"modelyo-kek-v1\0"
PURPOSE_FILE = "file"
MASTER_KEY_SIZE = 32
KEK_SIZE = 32
MAX_VERSION = (1 << 32) - 1
_ASCII_FIELD = re.compile(r"[\x21-\x7e]{1,255}")


class KeyVersionError(LookupError):
    """The requested master key version does not exist."""


def _field(name: str, value: str) -> bytes:
    if not isinstance(value, str) or not _ASCII_FIELD.fullmatch(value):
        raise ValueError(f"{name} must be 1 to 255 printable ASCII characters, got {value!r}")
    raw = value.encode("ascii")
    return bytes([len(raw)]) + raw


def kek_info(purpose: str, key_id: str, version: int) -> bytes:
    """The HKDF info for (purpose, key id, version), as the module docstring specifies."""
    if not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise ValueError(f"a key version is 1 to {MAX_VERSION}, got {version!r}")
    return (
        KEK_DOMAIN
        + _field("purpose", purpose)
        + _field("key id", key_id)
        + struct.pack(">I", version)
    )


def derive_kek(master: bytes, *, key_id: str, version: int, purpose: str = PURPOSE_FILE) -> bytes:
    """The 32-byte KEK for `key_id` at `version` from that version's master key."""
    if len(master) != MASTER_KEY_SIZE:
        raise ValueError(f"a master key is {MASTER_KEY_SIZE} bytes, got {len(master)}")
    return HKDF(
        algorithm=hashes.SHA256(),
        length=KEK_SIZE,
        salt=None,
        info=kek_info(purpose, key_id, version),
    ).derive(master)


class Keyring:
    """The master key versions of a CA; derives KEKs, never hands out a master key."""

    def __init__(self, masters: Mapping[int, bytes]) -> None:
        if not masters:
            raise ValueError("a keyring needs at least master key version 1")
        for version, key in masters.items():
            if not 1 <= version <= MAX_VERSION or len(key) != MASTER_KEY_SIZE:
                raise ValueError(f"master key version {version} is invalid")
        self._masters = dict(masters)

    def __repr__(self) -> str:  # never show key material
        return f"<Keyring versions={self.versions}>"

    @property
    def versions(self) -> list[int]:
        return sorted(self._masters)

    @property
    def current(self) -> int:
        """The newest version: what encryption uses."""
        return max(self._masters)

    def resolve(self, version: int | None) -> int:
        """`version`, or the current one for None; `KeyVersionError` if it does not exist."""
        if version is None:
            return self.current
        if version not in self._masters:
            raise KeyVersionError(
                f"key version {version} does not exist (versions {self.versions[0]} to "
                f"{self.current}); ask for the version written in the file's header"
            )
        return version

    def kek(
        self, key_id: str, version: int | None, purpose: str = PURPOSE_FILE
    ) -> tuple[int, bytes]:
        """(version, KEK) for `key_id` at `version` (None: the current version)."""
        resolved = self.resolve(version)
        return resolved, derive_kek(
            self._masters[resolved], key_id=key_id, version=resolved, purpose=purpose
        )
