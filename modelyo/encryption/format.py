"""Version 1 of the Modelyo encrypted-file format: constants, header, key schedule.

Pure logic, no I/O. The byte layout is specified in docs/encrypted-file-format.md; this module
is its reference implementation and the test vectors in tests/vectors/encryption/ pin it.

    header  = H || commitment
    H       = magic || version || segment_size || key_version || salt
              || len(key_id) || len(name) || key_id || name
    file key   = HKDF-SHA256(released key, salt, "modelyo enc v1 file key" || 0x00 || H)
    commitment = HKDF-SHA256(released key, salt, "modelyo enc v1 commitment" || 0x00 || H)

Feeding all of H into both derivations authenticates the header (any edit changes the file key
and the commitment), and the commitment makes a wrong key fail before any segment is read.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from dataclasses import dataclass

MAGIC = b"\x89MYENC\r\n"
"""8 bytes; the high-bit byte and CR LF catch 7-bit and newline-mangling transfers (as PNG's)."""
VERSION = 1
KEY_SIZE = 32
SALT_SIZE = 32
COMMITMENT_SIZE = 32
TAG_SIZE = 16
NONCE_SIZE = 12
DEFAULT_SEGMENT_SIZE = 1 << 20
MIN_SEGMENT_SIZE = 16
MAX_SEGMENT_SIZE = 1 << 24
"""Readers must hold one segment (twice, in the pipeline) in memory: this bounds their memory."""
MAX_SEGMENTS = 1 << 32
MAX_KEY_ID_LENGTH = 128
MAX_NAME_LENGTH = 4096
MAX_KEY_VERSION = (1 << 32) - 1

KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

FILE_KEY_LABEL = b"modelyo enc v1 file key\x00"
COMMITMENT_LABEL = b"modelyo enc v1 commitment\x00"

# magic, version, segment size, key version, salt, key id length, name length
_FIXED = struct.Struct(">8sBII32sBH")
FIXED_SIZE = _FIXED.size  # 52
MIN_HEADER_SIZE = FIXED_SIZE + 1 + COMMITMENT_SIZE
MAX_HEADER_SIZE = FIXED_SIZE + MAX_KEY_ID_LENGTH + MAX_NAME_LENGTH + COMMITMENT_SIZE


class HeaderError(ValueError):
    """The bytes are not a valid version-1 header; the message says which field is wrong."""


def check_key_id(key_id: str) -> str:
    """Return `key_id` if it is a valid key id (1-128 of A-Z a-z 0-9 . _ : -, not starting
    with punctuation), else raise ValueError saying so."""
    if not isinstance(key_id, str) or not KEY_ID_PATTERN.fullmatch(key_id):
        raise ValueError(
            f"invalid key id {key_id!r}: use 1-{MAX_KEY_ID_LENGTH} characters from "
            "A-Z a-z 0-9 . _ : - starting with a letter or digit"
        )
    return key_id


@dataclass(frozen=True)
class Header:
    """The fields of a version-1 header. `commitment` is empty until `seal_header` fills it."""

    key_id: str
    key_version: int
    salt: bytes
    segment_size: int = DEFAULT_SEGMENT_SIZE
    name: bytes = b""
    commitment: bytes = b""

    def __post_init__(self) -> None:
        check_key_id(self.key_id)
        if not 0 <= self.key_version <= MAX_KEY_VERSION:
            raise ValueError(f"key version {self.key_version} is outside 0..{MAX_KEY_VERSION}")
        if len(self.salt) != SALT_SIZE:
            raise ValueError(f"salt must be {SALT_SIZE} bytes, got {len(self.salt)}")
        if not MIN_SEGMENT_SIZE <= self.segment_size <= MAX_SEGMENT_SIZE:
            raise ValueError(
                f"segment size {self.segment_size} is outside "
                f"{MIN_SEGMENT_SIZE}..{MAX_SEGMENT_SIZE}"
            )
        if len(self.name) > MAX_NAME_LENGTH:
            raise ValueError(f"bound name is {len(self.name)} bytes, more than {MAX_NAME_LENGTH}")
        if self.commitment and len(self.commitment) != COMMITMENT_SIZE:
            raise ValueError(f"commitment must be {COMMITMENT_SIZE} bytes")

    def authenticated_bytes(self) -> bytes:
        """H: every header byte before the commitment, as fed to the key schedule."""
        key_id = self.key_id.encode("ascii")
        return (
            _FIXED.pack(
                MAGIC,
                VERSION,
                self.segment_size,
                self.key_version,
                self.salt,
                len(key_id),
                len(self.name),
            )
            + key_id
            + self.name
        )

    def encode(self) -> bytes:
        """The full header as written to a file (H || commitment)."""
        if len(self.commitment) != COMMITMENT_SIZE:
            raise ValueError("the header has no commitment yet: build it with seal_header()")
        return self.authenticated_bytes() + self.commitment

    @property
    def size(self) -> int:
        """Length in bytes of the encoded header."""
        return FIXED_SIZE + len(self.key_id) + len(self.name) + COMMITMENT_SIZE


def derive(key: bytes, header: Header) -> tuple[bytes, bytes]:
    """Return (file key, commitment) for `header` under the released `key`.

    Both are HKDF-SHA256 (RFC 5869) outputs of 32 bytes, so one Extract and one Expand block
    each; written with the standard library's one-shot HMAC because this runs once per file and
    the per-file cost matters for trees of small files (the tests check it against
    `cryptography`'s HKDF).
    """
    if len(key) != KEY_SIZE:
        raise ValueError(f"a released key is {KEY_SIZE} bytes, got {len(key)}")
    h = header.authenticated_bytes()
    prk = hmac.digest(header.salt, key, hashlib.sha256)
    file_key = hmac.digest(prk, FILE_KEY_LABEL + h + b"\x01", hashlib.sha256)
    commitment = hmac.digest(prk, COMMITMENT_LABEL + h + b"\x01", hashlib.sha256)
    return file_key, commitment


def seal_header(key: bytes, header: Header) -> tuple[Header, bytes]:
    """Fill in the commitment of `header`; return the completed header and the file key."""
    file_key, commitment = derive(key, header)
    return (
        Header(
            key_id=header.key_id,
            key_version=header.key_version,
            salt=header.salt,
            segment_size=header.segment_size,
            name=header.name,
            commitment=commitment,
        ),
        file_key,
    )


def open_header(key: bytes, header: Header) -> bytes | None:
    """Return the file key if `key` matches the header's commitment, else None.

    The comparison is constant-time so that timing does not reveal how much of a forged
    commitment was right.
    """
    file_key, commitment = derive(key, header)
    if not hmac.compare_digest(commitment, header.commitment):
        return None
    return file_key


def parse_fixed(data: bytes) -> tuple[int, int]:
    """Check the first FIXED_SIZE bytes of a header; return (key id length, name length).

    The caller then reads that many bytes plus the commitment and calls `parse_header`.
    """
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise HeaderError("not a Modelyo encrypted file (the magic bytes are wrong)")
    if len(data) < FIXED_SIZE:
        raise HeaderError(f"the header is truncated ({len(data)} of at least {MIN_HEADER_SIZE})")
    _, version, segment_size, _, _, key_id_len, name_len = _FIXED.unpack_from(data)
    if version != VERSION:
        raise HeaderError(
            f"format version {version} is not supported (this modelyo reads version {VERSION}); "
            "upgrade modelyo if the file is newer"
        )
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise HeaderError(f"the segment size {segment_size} is out of range")
    if not 1 <= key_id_len <= MAX_KEY_ID_LENGTH:
        raise HeaderError(f"the key id length {key_id_len} is out of range")
    if name_len > MAX_NAME_LENGTH:
        raise HeaderError(f"the bound name length {name_len} is out of range")
    return key_id_len, name_len


def parse_header(data: bytes) -> Header:
    """Parse a complete encoded header (exactly its bytes) into a Header."""
    key_id_len, name_len = parse_fixed(data)
    size = FIXED_SIZE + key_id_len + name_len + COMMITMENT_SIZE
    if len(data) != size:
        raise HeaderError(f"the header is {len(data)} bytes where {size} were expected")
    _, _, segment_size, key_version, salt, _, _ = _FIXED.unpack_from(data)
    raw_id = data[FIXED_SIZE : FIXED_SIZE + key_id_len]
    try:
        key_id = check_key_id(raw_id.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise HeaderError(f"the key id {raw_id!r} is not valid") from None
    name = data[FIXED_SIZE + key_id_len : FIXED_SIZE + key_id_len + name_len]
    return Header(
        key_id=key_id,
        key_version=key_version,
        salt=salt,
        segment_size=segment_size,
        name=name,
        commitment=data[size - COMMITMENT_SIZE :],
    )


@dataclass(frozen=True)
class Layout:
    """Where the segments of a complete ciphertext lie, computed from its total length."""

    header_size: int
    segment_size: int
    segments: int
    last_plaintext: int

    @property
    def plaintext_size(self) -> int:
        """Length of the plaintext the ciphertext decrypts to."""
        return (self.segments - 1) * self.segment_size + self.last_plaintext


def ciphertext_size(plaintext_size: int, header_size: int, segment_size: int) -> int:
    """Length of the ciphertext of `plaintext_size` bytes (an empty plaintext is one segment)."""
    segments = max(1, -(-plaintext_size // segment_size))
    return header_size + plaintext_size + segments * TAG_SIZE


def segment_count(plaintext_size: int, segment_size: int) -> int:
    """Number of segments for a plaintext: ceil(size / segment), and 1 for an empty one."""
    return max(1, -(-plaintext_size // segment_size))


def layout(total_size: int, header_size: int, segment_size: int) -> Layout:
    """The segment layout of a ciphertext of `total_size` bytes.

    Raises ValueError naming the defect: truncated, dangling bytes after the last whole segment,
    or an empty final segment after others (which no writer produces).
    """
    body = total_size - header_size
    stride = segment_size + TAG_SIZE
    if body < TAG_SIZE:
        raise ValueError("it is truncated: no complete segment follows the header")
    segments = -(-body // stride)
    last = body - (segments - 1) * stride
    if last < TAG_SIZE:
        raise ValueError("it is truncated inside its last segment")
    if last == TAG_SIZE and segments > 1:
        raise ValueError("its final segment is empty, which this format never writes")
    if segments > MAX_SEGMENTS:
        raise ValueError(f"it has more than {MAX_SEGMENTS} segments")
    return Layout(header_size, segment_size, segments, last - TAG_SIZE)
