"""DataFrames in Modelyo's encrypted-file format, and the `.modelyo` pandas accessor.

    import modelyo_jupyter.dataframes                       # registers df.modelyo / s.modelyo
    df.modelyo.encrypt("sales.parquet.enc")                  # key id "default", the workspace's CA
    df2 = read_encrypted("sales.parquet.enc")                # key id and version from the header
    df.modelyo.to_parquet_encrypted("sales.parquet")         # Parquet Modular Encryption instead

The frame is written as Parquet by `modelyo.jobs.codec` (dtypes, missing values and the index
intact) and streamed straight into the encrypted-file format (docs/encrypted-file-format.md):
the plaintext Parquet only ever exists in memory, a segment or so at a time, and the output file
appears complete or not at all. Reading decrypts into memory and parses only once every segment
authenticated, so a damaged file yields an error and never part of a frame.

Keys come from the CA of the workspace `modelyo attest` set up in the current directory, unless
a `keys` source (e.g. `modelyo.encryption.StaticKeySource`) is passed.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

import pandas as pd

from modelyo.client.keys import workspace_keys
from modelyo.encryption import KeySource, ReleasedKey, check_key_id, decrypt_stream, encrypt_stream
from modelyo.encryption.files import atomic_output
from modelyo.errors import CodecError
from modelyo.jobs.codec import read_value, write_dataframe, write_value
from modelyo.jobs.pipe import through_pipe
from modelyo.workspace import Workspace

__all__ = [
    "ModelyoFrameAccessor",
    "ModelyoSeriesAccessor",
    "default_key_source",
    "read_encrypted",
    "write_encrypted",
]

_FILE_MODE = 0o600


# --- The workspace's key source -------------------------------------------------------------


def default_key_source(workspace: Workspace | None = None) -> KeySource:
    """The CA key source of `workspace` (default: the current directory), one per workspace.

    After `modelyo ca rotate`, new files use the new version once the source's cached answer
    for "current" expires (60 s); exact versions never change, so old files always read.
    NotAttestedError when the workspace has not attested the CA.
    """
    return workspace_keys(workspace, needed_for="encrypting or decrypting a DataFrame")


class _OneKey:
    """A KeySource holding the one key already fetched, so the encrypter thread asks no CA."""

    def __init__(self, key_id: str, released: ReleasedKey) -> None:
        self._key_id = key_id
        self._released = released

    def key(self, key_id: str, version: int | None) -> ReleasedKey:
        if key_id != self._key_id or version not in (None, self._released.version):
            raise AssertionError("the encrypter asked for a key it was not given")  # a bug
        return self._released


# --- Writing and reading --------------------------------------------------------------------


def write_encrypted(
    value: pd.DataFrame | pd.Series,
    path: str | os.PathLike[str],
    key_id: str = "default",
    *,
    keys: KeySource | None = None,
    force: bool = False,
) -> Path:
    """Write a DataFrame (or Series) as Parquet inside a Modelyo encrypted file; return its path.

    Encrypted under the current version of `key_id`; the header records the key id and version
    so `read_encrypted` needs neither. An existing `path` is replaced only with `force`. The
    file (mode 0600) appears complete or not at all, and no plaintext ever reaches the disk.
    """
    if not isinstance(value, pd.DataFrame | pd.Series):
        raise TypeError(f"write_encrypted takes a DataFrame or a Series, not {type(value)}")
    check_key_id(key_id)
    with atomic_output(path, force=force, fsync=True, mode=_FILE_MODE) as fd:
        source = keys if keys is not None else default_key_source()
        # Asked here, not in the encrypter thread, so a missing key fails plainly and first.
        fixed = _OneKey(key_id, source.key(key_id, None))
        with os.fdopen(fd, "wb", closefd=False) as out:
            _stream_encrypted(value, out, fixed, key_id)
    return Path(path)


def _stream_encrypted(
    value: pd.DataFrame | pd.Series, out: io.BufferedWriter, keys: KeySource, key_id: str
) -> None:
    """Encode `value` as Parquet in a thread while this one encrypts it into `out`."""

    def encode(sink: BinaryIO) -> None:
        if isinstance(value, pd.DataFrame):
            write_dataframe(value, sink)
        else:
            write_value(value, sink)

    through_pipe(encode, lambda source: encrypt_stream(source, out, keys, key_id))


def read_encrypted(
    path: str | os.PathLike[str], *, keys: KeySource | None = None
) -> pd.DataFrame | pd.Series:
    """Decrypt a file `write_encrypted` (or `df.modelyo.encrypt`) wrote and return the frame.

    A Series comes back as a Series. The key id and version come from the file's header.
    WrongKeyError when the key does not match, TamperError when the file was altered or
    truncated; both name the file, and no part of the data is returned.
    """
    label = os.fsdecode(path)
    source = keys if keys is not None else default_key_source()
    plaintext = io.BytesIO()
    with open(path, "rb") as encrypted:
        decrypt_stream(encrypted, plaintext, source, label=label)
    # Parsed only now that every segment authenticated.
    try:
        # A zero-copy view: pyarrow may keep referring to it, so it is not released here.
        return read_value(plaintext.getbuffer(), "parquet")  # type: ignore[arg-type, return-value]
    except CodecError as exc:
        raise CodecError(
            f"{label} decrypted, but it does not hold a DataFrame ({exc}); decrypt it with "
            "`modelyo decrypt` to see what it is"
        ) from None


# --- pandas accessors -----------------------------------------------------------------------


class _EncryptAccessor:
    """What `df.modelyo` and `series.modelyo` share."""

    def __init__(self, value: pd.DataFrame | pd.Series) -> None:
        self._value = value

    def encrypt(
        self,
        path: str | os.PathLike[str],
        key_id: str = "default",
        *,
        keys: KeySource | None = None,
        force: bool = False,
    ) -> Path:
        """Write this value to `path` in Modelyo's encrypted format (see `write_encrypted`)."""
        return write_encrypted(self._value, path, key_id, keys=keys, force=force)


@pd.api.extensions.register_dataframe_accessor("modelyo")
class ModelyoFrameAccessor(_EncryptAccessor):
    """`df.modelyo`: encrypt this frame with Modelyo keys."""

    def to_parquet_encrypted(
        self,
        path: str | os.PathLike[str],
        *,
        footer_key: str = "default",
        column_keys: dict[str, list[str]] | None = None,
        keys: KeySource | None = None,
        plaintext_footer: bool = False,
        force: bool = False,
    ) -> Path:
        """Write this frame as Parquet Modular Encryption with the CA as the KMS (see
        `modelyo_jupyter.parquet_kms.write_encrypted_parquet`)."""
        from modelyo_jupyter.parquet_kms import write_encrypted_parquet

        return write_encrypted_parquet(
            self._value,
            path,
            footer_key=footer_key,
            column_keys=column_keys,
            keys=keys,
            plaintext_footer=plaintext_footer,
            force=force,
        )


@pd.api.extensions.register_series_accessor("modelyo")
class ModelyoSeriesAccessor(_EncryptAccessor):
    """`series.modelyo`: encrypt this Series with Modelyo keys."""
