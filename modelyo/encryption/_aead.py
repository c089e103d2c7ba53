"""The dangerous part: raw AES-256-GCM on segments and the nonce rule. Private on purpose.

Nothing outside `modelyo.encryption` may import this module. Its callers guarantee that each
file key comes from `format.seal_header`/`format.open_header` (a fresh random salt per file, so
a counter nonce is never reused under one key) and that each (index, last) pair is sealed once.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from modelyo.encryption.format import KEY_SIZE, MAX_SEGMENTS, TAG_SIZE

_FINAL = b"\x01"
_NOT_FINAL = b"\x00"


def nonce(index: int, last: bool) -> bytes:
    """The 12-byte nonce of segment `index`: an 11-byte big-endian counter, then 0x01 on the
    final segment and 0x00 on every other (age's STREAM nonce)."""
    if not 0 <= index < MAX_SEGMENTS:
        raise ValueError(f"segment index {index} is outside 0..{MAX_SEGMENTS - 1}")
    return index.to_bytes(11, "big") + (_FINAL if last else _NOT_FINAL)


class SegmentCipher:
    """AES-256-GCM under one file key, sealing and opening segments by index.

    The `*_into` methods write into caller-owned buffers (reused across segments: allocating
    and copying 1 MiB per segment cost 16-61 % of throughput). `cryptography` >= 50 releases
    the GIL inside them, so several threads can use one SegmentCipher at once.
    """

    __slots__ = ("_aead",)

    def __init__(self, file_key: bytes) -> None:
        if len(file_key) != KEY_SIZE:
            raise ValueError("a file key is 32 bytes")
        self._aead = AESGCM(file_key)

    def seal_into(self, index: int, last: bool, plaintext: memoryview, out: memoryview) -> None:
        """Encrypt `plaintext` as segment `index` into `out` (exactly len(plaintext) + 16)."""
        self._aead.encrypt_into(nonce(index, last), plaintext, None, out)

    def open_into(self, index: int, last: bool, ciphertext: memoryview, out: memoryview) -> None:
        """Decrypt segment `index` into `out` (exactly len(ciphertext) - 16 bytes).

        Raises cryptography's InvalidTag when the segment does not authenticate; `out` may then
        hold unauthenticated bytes, which the caller must never release.
        """
        self._aead.decrypt_into(nonce(index, last), ciphertext, None, out)

    def seal(self, index: int, last: bool, plaintext: bytes) -> bytes:
        """Encrypt one segment into a new bytes object (for small inputs)."""
        return self._aead.encrypt(nonce(index, last), plaintext, None)

    def open(self, index: int, last: bool, ciphertext: bytes) -> bytes:
        """Decrypt one segment into a new bytes object; raises InvalidTag if it is not genuine."""
        if len(ciphertext) < TAG_SIZE:
            raise ValueError("a segment is at least 16 bytes")
        return self._aead.decrypt(nonce(index, last), ciphertext, None)
