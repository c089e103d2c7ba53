"""Parquet Modular Encryption (PME) with the Modelyo CA as the key management service.

The files are standard encrypted Parquet (`AES_GCM_V1`, 256-bit data keys), so Arrow, Spark and
other PME readers can open them given a KMS client for the same master keys. Master key ids are
Modelyo CA key ids ("default", ...).

How the keys flow, honestly: the CA has no wrap/unwrap endpoint. It releases the key-encryption
key (KEK) for a key id and version to the owner over mutual TLS, and `ModelyoKmsClient` wraps and
unwraps Parquet's keys *locally*, in the trusted user process, with AES-256-GCM under a key
derived from that KEK. So whoever can obtain a key id's KEK from the CA (the owner, or a VM the
CA's policy allows) can read the file, and nobody else can.

Parquet encrypts each column (and the footer) with a random 256-bit data key (DEK) and asks the
KMS client to wrap it; the wrapped keys are stored in the file's key material (in clear, as
JSON: the master key ids are visible, the keys are not). Single wrapping is used on purpose:
pyarrow's default double wrapping puts its own 128-bit KEKs between the DEKs and the KMS to save
remote KMS calls, which this client never makes (wrapping is local, and `CaKeySource` asks the
CA once per key id and version), so it would only weaken the chain to 128 bits.

A wrapped key is a small JSON text that names the key id and key version it was wrapped under,
so files written before a `modelyo ca rotate` stay readable (unwrapping asks the CA for exactly
that version):

    {"format": "modelyo-pme-wrap", "version": 1, "key_id": "default", "key_version": 1,
     "salt": b64(32 random bytes), "commitment": b64(32 bytes), "wrapped": b64(AES-GCM output)}

    A          = "modelyo-pme-wrap" || 0x00 || version (1 byte) || key_version (4 bytes, BE)
                 || len(key_id) (1 byte) || key_id || salt
    wrap key   = HKDF-SHA256(CA key, salt, "modelyo pme v1 wrap key" || 0x00 || A)
    commitment = HKDF-SHA256(CA key, salt, "modelyo pme v1 commitment" || 0x00 || A)
    wrapped    = AES-256-GCM(wrap key, nonce = 12 zero bytes, plaintext = Parquet's key, aad = A)

Every wrap has a fresh salt and so its own wrap key, used once: a fixed nonce is safe (the
encrypted-file format relies on the same rule). The commitment tells a wrong key (another CA,
another key id) from altered key material before anything is decrypted.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from modelyo.encryption.files import atomic_output
from modelyo.encryption.format import MAX_KEY_VERSION, check_key_id
from modelyo.encryption.keys import KeySource, ReleasedKey
from modelyo.errors import EncryptionError, KeyUnavailableError, TamperError, WrongKeyError

if TYPE_CHECKING:
    import pandas as pd

WRAP_FORMAT = "modelyo-pme-wrap"
WRAP_VERSION = 1
KMS_INSTANCE_ID = "modelyo-ca"
"""Recorded in each file's key material; readers in other tools map it to a Modelyo client."""
ENCRYPTION_ALGORITHM = "AES_GCM_V1"
"""Authenticates every page (AES_GCM_CTR_V1 leaves pages unauthenticated and was not faster)."""
DATA_KEY_BITS = 256

_SALT_SIZE = 32
_COMMITMENT_SIZE = 32
_TAG_SIZE = 16
_NONCE = bytes(12)  # each wrap key is used once (fresh salt), see the module docstring
_WRAP_KEY_LABEL = b"modelyo pme v1 wrap key"
_COMMITMENT_LABEL = b"modelyo pme v1 commitment"
_FILE_MODE = 0o600


# --- The wrapped-key format (pure) ---------------------------------------------------------


@dataclass(frozen=True)
class WrappedKey:
    """A Parquet key wrapped under one CA key id and version (see the module docstring)."""

    key_id: str
    key_version: int
    salt: bytes = field(repr=False)
    commitment: bytes = field(repr=False)
    wrapped: bytes = field(repr=False)

    def aad(self) -> bytes:
        """The authenticated description `A`: format, version, key id, key version, salt."""
        key_id = self.key_id.encode("ascii")
        return (
            WRAP_FORMAT.encode("ascii")
            + b"\x00"
            + WRAP_VERSION.to_bytes(1, "big")
            + self.key_version.to_bytes(4, "big")
            + len(key_id).to_bytes(1, "big")
            + key_id
            + self.salt
        )

    def encode(self) -> str:
        """The JSON text stored in the file's key material."""
        return json.dumps(
            {
                "format": WRAP_FORMAT,
                "version": WRAP_VERSION,
                "key_id": self.key_id,
                "key_version": self.key_version,
                "salt": _b64(self.salt),
                "commitment": _b64(self.commitment),
                "wrapped": _b64(self.wrapped),
            },
            separators=(",", ":"),
        )

    @classmethod
    def decode(cls, text: str) -> WrappedKey:
        """Parse a wrapped key; TamperError when it is not one this version wrote."""
        try:
            fields = json.loads(text)
            if not isinstance(fields, dict):
                raise ValueError("not a JSON object")
            if fields.get("format") != WRAP_FORMAT:
                raise ValueError(f"its format is {fields.get('format')!r}, not {WRAP_FORMAT!r}")
            if fields.get("version") != WRAP_VERSION:
                raise ValueError(
                    f"its version is {fields.get('version')!r}; this Modelyo reads version "
                    f"{WRAP_VERSION} (upgrade Modelyo if the file is newer)"
                )
            key_version = fields.get("key_version")
            if type(key_version) is not int or not 1 <= key_version <= MAX_KEY_VERSION:
                raise ValueError(f"its key version {key_version!r} is not 1..{MAX_KEY_VERSION}")
            wrapped = cls(
                key_id=check_key_id(fields.get("key_id")),  # type: ignore[arg-type]
                key_version=key_version,
                salt=_unb64(fields.get("salt"), "salt"),
                commitment=_unb64(fields.get("commitment"), "commitment"),
                wrapped=_unb64(fields.get("wrapped"), "wrapped"),
            )
        except ValueError as exc:  # json.JSONDecodeError is a ValueError too
            raise TamperError(
                f"a wrapped Parquet key is malformed ({exc}): the file's key material was "
                "altered or was not written by Modelyo"
            ) from None
        if len(wrapped.salt) != _SALT_SIZE or len(wrapped.commitment) != _COMMITMENT_SIZE:
            raise TamperError("a wrapped Parquet key has a salt or commitment of the wrong size")
        if len(wrapped.wrapped) <= _TAG_SIZE:
            raise TamperError("a wrapped Parquet key is too short to hold a key")
        return wrapped


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, name: str) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"its {name} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise ValueError(f"its {name} is not valid base64") from None


def _hkdf(ca_key: bytes, label: bytes, blob: WrappedKey) -> bytes:
    info = label + b"\x00" + blob.aad()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=blob.salt, info=info).derive(ca_key)


def wrap(data_key: bytes, released: ReleasedKey, key_id: str) -> WrappedKey:
    """Wrap `data_key` (a Parquet DEK or KEK) under the CA key `released` of `key_id`."""
    if not data_key:
        raise ValueError("there is no key to wrap")
    draft = WrappedKey(
        key_id=check_key_id(key_id),
        key_version=released.version,
        salt=os.urandom(_SALT_SIZE),
        commitment=b"",
        wrapped=b"",
    )
    commitment = _hkdf(released.key, _COMMITMENT_LABEL, draft)
    wrap_key = _hkdf(released.key, _WRAP_KEY_LABEL, draft)
    sealed = AESGCM(wrap_key).encrypt(_NONCE, data_key, draft.aad())
    return WrappedKey(draft.key_id, draft.key_version, draft.salt, commitment, sealed)


def unwrap(blob: WrappedKey, released: ReleasedKey) -> bytes:
    """Recover the Parquet key from `blob` with the CA key `released` (its exact version).

    WrongKeyError when `released` is not the key it was wrapped under (checked first, from the
    commitment); TamperError when the wrapped bytes or their description were altered.
    """
    if released.version != blob.key_version:
        raise KeyUnavailableError(
            f"the key source returned version {released.version} of key {blob.key_id!r} when "
            f"version {blob.key_version} was asked for"
        )
    commitment = _hkdf(released.key, _COMMITMENT_LABEL, blob)
    if not hmac.compare_digest(commitment, blob.commitment):
        raise WrongKeyError(
            f"key {blob.key_id!r} version {blob.key_version} does not match this file's wrapped "
            "key: the file was written under another CA (or another key), or its key material "
            "was altered; nothing was decrypted"
        )
    wrap_key = _hkdf(released.key, _WRAP_KEY_LABEL, blob)
    try:
        return AESGCM(wrap_key).decrypt(_NONCE, blob.wrapped, blob.aad())
    except InvalidTag:
        raise TamperError(
            f"a Parquet key wrapped under key {blob.key_id!r} version {blob.key_version} failed "
            "authentication: the file's key material was altered; nothing was decrypted"
        ) from None


# --- The KMS client pyarrow calls -----------------------------------------------------------


class ModelyoKmsClient(pe.KmsClient):
    """A pyarrow KMS client whose master keys are Modelyo CA key ids.

    `wrap_key` wraps under the current version of the key id, `unwrap_key` asks `keys` for the
    exact version recorded in the wrapped key. The CA only *releases* keys (over mutual TLS);
    wrapping happens here, in this trusted process. `used` records the (key id, version) pairs
    this client wrapped or unwrapped with.
    """

    def __init__(self, keys: KeySource) -> None:
        pe.KmsClient.__init__(self)
        self._keys = keys
        self._lock = threading.Lock()
        self.used: set[tuple[str, int]] = set()

    def _note(self, key_id: str, version: int) -> None:
        # pyarrow may call from its reader threads.
        with self._lock:
            self.used.add((key_id, version))

    def wrap_key(self, key_bytes: bytes, master_key_identifier: str) -> str:
        """Wrap one of Parquet's keys under the current version of `master_key_identifier`."""
        key_id = check_key_id(master_key_identifier)
        released = self._keys.key(key_id, None)
        self._note(key_id, released.version)
        return wrap(bytes(key_bytes), released, key_id).encode()

    def unwrap_key(self, wrapped_key: str, master_key_identifier: str) -> bytes:
        """Unwrap with exactly the key version the wrapped key records."""
        blob = WrappedKey.decode(wrapped_key)
        if blob.key_id != master_key_identifier:
            raise TamperError(
                f"a wrapped Parquet key names key id {blob.key_id!r} but the file's key "
                f"material names {master_key_identifier!r}: the key material was altered"
            )
        released = self._keys.key(blob.key_id, blob.key_version)
        key = unwrap(blob, released)
        self._note(blob.key_id, blob.key_version)
        return key


class _Session:
    """One CryptoFactory and the KMS clients it made, for one file.

    pyarrow caches inside a CryptoFactory for `cache_lifetime` (600 s by default): KMS clients
    per (KMS instance, access token), and with double wrapping its own KEKs per master key id (a
    writer then reuses them for every file it writes and asks the KMS nothing more; a reader
    keeps unwrapped KEKs by KEK id). A long-lived factory would therefore keep using a key
    version after a rotation, and which calls reach the key source would depend on history. One
    factory per file keeps every call deterministic: each file asks the key source for the
    current version (CaKeySource itself re-asks the CA after its `current_ttl`).
    """

    def __init__(self, keys: KeySource) -> None:
        self.clients: list[ModelyoKmsClient] = []
        self.factory = pe.CryptoFactory(self._make_client)
        self._keys = keys
        self.connection = pe.KmsConnectionConfig(kms_instance_id=KMS_INSTANCE_ID)

    def _make_client(self, _config: pe.KmsConnectionConfig) -> ModelyoKmsClient:
        client = ModelyoKmsClient(self._keys)
        self.clients.append(client)
        return client

    @property
    def used(self) -> set[tuple[str, int]]:
        return set().union(*(c.used for c in self.clients))


# --- Writing and reading files --------------------------------------------------------------


def _default_keys(keys: KeySource | None) -> KeySource:
    if keys is not None:
        return keys
    from modelyo_jupyter.dataframes import default_key_source

    return default_key_source()


def _check_column_keys(
    column_keys: Mapping[str, Sequence[str]], columns: Sequence[str]
) -> dict[str, list[str]]:
    """Validate {key id: [column, ...]}: known columns, each under one key id only."""
    seen: dict[str, str] = {}
    checked: dict[str, list[str]] = {}
    for key_id, names in column_keys.items():
        check_key_id(key_id)
        if isinstance(names, str):
            raise ValueError(
                f"column_keys[{key_id!r}] must be a list of column names, not the string {names!r}"
            )
        for name in names:
            if name not in columns:
                raise ValueError(
                    f"column_keys[{key_id!r}] names the column {name!r}, which the frame does not "
                    f"have (Parquet columns: {', '.join(map(repr, columns))})"
                )
            if name in seen and seen[name] != key_id:
                raise ValueError(
                    f"the column {name!r} is listed under both {seen[name]!r} and {key_id!r}; "
                    "give each column one key id"
                )
            seen[name] = key_id
        checked[key_id] = list(dict.fromkeys(names))
    return checked


def write_encrypted_parquet(
    df: pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    footer_key: str = "default",
    column_keys: Mapping[str, Sequence[str]] | None = None,
    keys: KeySource | None = None,
    plaintext_footer: bool = False,
    force: bool = False,
) -> Path:
    """Write `df` as a Parquet file encrypted with Parquet Modular Encryption; return its path.

    Without `column_keys`, every column (and the footer) is encrypted under the CA key id
    `footer_key`. With `column_keys` ({key id: [column, ...]}) the listed columns are encrypted
    under their key ids and the footer under `footer_key`; columns not listed are stored
    *unencrypted* (PME's rule), readable by anyone holding the file. `plaintext_footer=True`
    leaves the schema and the unencrypted columns readable by tools without keys (the footer is
    then signed with the footer key instead of encrypted).

    `keys` defaults to the workspace's CA (`modelyo attest` first). The file appears complete or
    not at all (mode 0600); an existing `path` is replaced only with `force`.
    """
    check_key_id(footer_key)
    keys = _default_keys(keys)
    table = pa.Table.from_pandas(df)
    config = pe.EncryptionConfiguration(
        footer_key=footer_key,
        column_keys=_check_column_keys(column_keys, table.column_names) if column_keys else {},
        uniform_encryption=not column_keys,
        encryption_algorithm=ENCRYPTION_ALGORITHM,
        plaintext_footer=plaintext_footer,
        double_wrapping=False,  # see the module docstring
        data_key_length_bits=DATA_KEY_BITS,
    )
    session = _Session(keys)
    # Fresh FileEncryptionProperties per file: reusing them would give two files one data key.
    properties = session.factory.file_encryption_properties(session.connection, config)
    target = Path(path)
    with atomic_output(target, force=force, fsync=True, mode=_FILE_MODE) as fd:
        with os.fdopen(fd, "wb", closefd=False) as sink:
            pq.write_table(table, sink, encryption_properties=properties)
    return target


def read_encrypted_parquet(
    path: str | os.PathLike[str],
    *,
    keys: KeySource | None = None,
    columns: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Read a file `write_encrypted_parquet` wrote (or any PME file whose master keys are CA key
    ids) back into a DataFrame with its dtypes and index.

    Each wrapped key is unwrapped with the exact CA key version it records, so files written
    before a rotation still read. WrongKeyError: the keys are not the ones it was written under
    (another CA); TamperError: the file or its key material was altered or is damaged;
    EncryptionError: the file is not encrypted at all (a plain file in its place is refused).
    All name the file.
    """
    label = os.fsdecode(path)
    keys = _default_keys(keys)
    session = _Session(keys)
    properties = session.factory.file_decryption_properties(
        session.connection, pe.DecryptionConfiguration()
    )
    # A native file, not a Python one: Arrow's thread pool can abort the interpreter at exit
    # after reading through a Python file object (apache/arrow#50482). Missing or unreadable
    # files raise OSError here, as open() would.
    with pa.OSFile(os.fspath(path)) as source:
        try:
            table = pq.read_table(
                source,
                columns=list(columns) if columns is not None else None,
                decryption_properties=properties,
            )
        except EncryptionError as exc:  # raised by our KMS client: name the file
            raise type(exc)(f"{label}: {exc}", path=label) from None
        except (OSError, pa.ArrowException) as exc:
            raise TamperError(
                f"{label} could not be read as encrypted Parquet ({exc}): it was altered or "
                "truncated, or it is not a Parquet file; nothing was returned",
                path=label,
            ) from None
    if not session.used:
        raise EncryptionError(
            f"{label} is not an encrypted Parquet file (no Modelyo key was needed to read it); "
            "refusing it where an encrypted one was expected (read it with pandas.read_parquet "
            "if it is meant to be plain)",
            path=label,
        )
    return table.to_pandas()
