"""Modelyo's encrypted-file format and the one library the whole project uses for it.

Byte strings, streams, files and directory trees, all in one streaming authenticated format
(docs/encrypted-file-format.md): AES-256-GCM segments under a per-file key derived with HKDF
from a key released by the CA and a random salt, a counter-and-last-flag nonce, an
authenticated header and a key commitment.

    from modelyo.encryption import StaticKeySource, encrypt_bytes, decrypt_bytes
    keys = StaticKeySource.single(key)                  # the CA's key source in production
    blob = encrypt_bytes(b"data", keys, "default")
    assert decrypt_bytes(blob, keys) == b"data"

Failures raise `modelyo.errors.EncryptionError` and its subclasses: `TamperError` (altered,
truncated, reordered, moved), `WrongKeyError` (the key does not match the commitment) and
`KeyUnavailableError` (the key source has no such key id or version).
"""

from modelyo.encryption.files import decrypt_file, encrypt_file
from modelyo.encryption.format import (
    DEFAULT_SEGMENT_SIZE,
    MAX_SEGMENT_SIZE,
    MIN_SEGMENT_SIZE,
    Header,
    check_key_id,
)
from modelyo.encryption.keys import KeySource, ReleasedKey, StaticKeySource, read_key_file
from modelyo.encryption.stream import (
    KeyCache,
    NullProgress,
    Progress,
    decrypt_bytes,
    decrypt_stream,
    encrypt_bytes,
    encrypt_stream,
    read_header,
)
from modelyo.encryption.tree import TreeResult, check_relative_path, decrypt_tree, encrypt_tree

__all__ = [
    "DEFAULT_SEGMENT_SIZE",
    "MAX_SEGMENT_SIZE",
    "MIN_SEGMENT_SIZE",
    "Header",
    "KeyCache",
    "KeySource",
    "NullProgress",
    "Progress",
    "ReleasedKey",
    "StaticKeySource",
    "TreeResult",
    "check_key_id",
    "check_relative_path",
    "decrypt_bytes",
    "decrypt_file",
    "decrypt_stream",
    "decrypt_tree",
    "encrypt_bytes",
    "encrypt_file",
    "encrypt_stream",
    "encrypt_tree",
    "read_header",
    "read_key_file",
]
