"""Where released keys come from: the `KeySource` protocol and the sources that need no CA.

The CA-backed source (the owner's client certificate, or an attested TDX VM) implements the same
protocol, so encryption code never knows which one it was given.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from modelyo.encryption.format import KEY_SIZE, MAX_KEY_VERSION, check_key_id
from modelyo.errors import KeyUnavailableError


@dataclass(frozen=True)
class ReleasedKey:
    """A 32-byte key released for one key id at one version."""

    key: bytes = field(repr=False)
    version: int

    def __post_init__(self) -> None:
        if len(self.key) != KEY_SIZE:
            raise ValueError(f"a released key is {KEY_SIZE} bytes, got {len(self.key)}")
        if not 0 <= self.version <= MAX_KEY_VERSION:
            raise ValueError(f"key version {self.version} is outside 0..{MAX_KEY_VERSION}")


@runtime_checkable
class KeySource(Protocol):
    """Gives the key for a key id: its current version (`version=None`) or an exact one.

    Encryption asks for the current version and records it in the header; decryption asks for
    exactly the version in the header, so files written before a rotation still decrypt.
    Raise `KeyUnavailableError` (with what to do) when the key is not available.
    """

    def key(self, key_id: str, version: int | None) -> ReleasedKey:
        """Return the key for `key_id` at `version` (None: the current version)."""
        ...


class StaticKeySource:
    """Keys held in memory: for tests, the benchmark and `--key-file`.

    `keys` maps key id -> {version: 32-byte key}; the current version is the highest.
    """

    def __init__(self, keys: Mapping[str, Mapping[int, bytes]], *, origin: str = "") -> None:
        self._keys: dict[str, dict[int, ReleasedKey]] = {}
        for key_id, versions in keys.items():
            check_key_id(key_id)
            if not versions:
                raise ValueError(f"key id {key_id!r} has no versions")
            self._keys[key_id] = {v: ReleasedKey(k, v) for v, k in versions.items()}
        self._origin = origin or "the static key source"

    @classmethod
    def single(cls, key: bytes, key_id: str = "default", version: int = 1) -> StaticKeySource:
        """A source holding one key for one key id at one version."""
        return cls({key_id: {version: key}})

    def key(self, key_id: str, version: int | None) -> ReleasedKey:
        """See `KeySource.key`."""
        versions = self._keys.get(key_id)
        if versions is None:
            held = ", ".join(repr(k) for k in sorted(self._keys))
            raise KeyUnavailableError(
                f"{self._origin} has no key for key id {key_id!r} (it holds {held}); "
                f"give the key of {key_id!r}"
            )
        if version is None:
            return versions[max(versions)]
        found = versions.get(version)
        if found is None:
            held = ", ".join(str(v) for v in sorted(versions))
            raise KeyUnavailableError(
                f"{self._origin} has no version {version} of key {key_id!r} "
                f"(it holds version {held}); get version {version} from the CA"
            )
        return found


def read_key_file(path: str | os.PathLike[str]) -> bytes:
    """Read a 32-byte key from `path`: 32 raw bytes, or 64 hex digits (surrounding whitespace
    allowed). Refuses files that others can read, as ssh does for private keys."""
    p = Path(path)
    try:
        st = p.stat()
        data = p.read_bytes()
    except OSError as exc:
        raise KeyUnavailableError(f"cannot read the key file {p}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyUnavailableError(f"the key file {p} is not a regular file")
    if st.st_mode & 0o077:
        raise KeyUnavailableError(
            f"the key file {p} is readable by others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run `chmod 600 {p}`"
        )
    if len(data) == KEY_SIZE:
        return data
    text = data.strip()
    if len(text) == 2 * KEY_SIZE:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    raise KeyUnavailableError(
        f"the key file {p} holds {len(data)} bytes; it must hold exactly 32 raw bytes or 64 hex "
        "digits (e.g. `head -c 32 /dev/urandom > KEY && chmod 600 KEY`)"
    )
