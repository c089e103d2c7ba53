"""papermill I/O for encrypted notebooks: `modelyo+enc://PATH[?key_id=K]`.

    papermill analysis.ipynb modelyo+enc://runs/out.ipynb -p rows 1000

reads or writes the notebook at PATH (relative to the current folder, or absolute with a third
slash: `modelyo+enc:///data/out.ipynb`) in Modelyo's encrypted-file format
(docs/encrypted-file-format.md), under the key id `K` ("default" when not given) released by the
CA this folder attested (`modelyo attest` / `%modelyo attest`). The result is an ordinary
Modelyo encrypted file: `modelyo decrypt out.ipynb plain.ipynb` opens it too.

We hook papermill's I/O registry (entry point group `papermill.io`, see pyproject.toml) rather
than an engine or a kernel: execution is untouched (the notebook's `%%modelyo_run` cells go to
the attested VM), and only where the notebook is stored changes, which is exactly what an
encrypted output needs. papermill rewrites the output after every cell; each write encrypts the
whole notebook afresh into an unnamed file that replaces the old one in one rename, so a reader
(or a crash) sees the previous complete notebook or the new one, never a mix.

papermill imports this module whenever it starts, so it imports nothing heavy at module level.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from modelyo.errors import EncryptionError

if TYPE_CHECKING:
    from modelyo.encryption import KeySource

PREFIX = "modelyo+enc://"
DEFAULT_KEY_ID = "default"
# Ciphertext, but nobody else needs it: the same mode as the keys beside it.
FILE_MODE = 0o600


def parse_url(url: str) -> tuple[str, str | None]:
    """Split `modelyo+enc://PATH[?key_id=K]` into (PATH, K or None); refuse anything else.

    PATH is taken literally (no percent-decoding), so it may not contain `?`.
    """
    if not url.startswith(PREFIX):
        raise ValueError(f"{url!r} is not a {PREFIX}PATH address")
    path, _, query = url[len(PREFIX) :].partition("?")
    if not path:
        raise ValueError(
            f"{url!r} names no file; write {PREFIX}out.ipynb (relative) or {PREFIX}/abs/out.ipynb"
        )
    key_id: str | None = None
    if query:
        try:
            fields = parse_qs(query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise ValueError(
                f"{url!r}: cannot parse the query {query!r}; write ?key_id=NAME"
            ) from None
        unknown = sorted(set(fields) - {"key_id"})
        if unknown:
            raise ValueError(f"{url!r}: unknown option {', '.join(unknown)}; only key_id is known")
        values = fields["key_id"]
        if len(values) != 1 or not values[0]:
            raise ValueError(f"{url!r}: give key_id exactly once and not empty")
        key_id = values[0]
    return path, key_id


class EncryptedNotebookHandler:
    """papermill I/O handler (classmethods, as papermill calls them on the class).

    Keys come from the CA of the workspace in the current folder, unless `use_keys` installed
    another source (tests, or a caller holding keys already).
    """

    _keys: KeySource | None = None
    _write_lock = threading.Lock()

    @classmethod
    def use_keys(cls, keys: KeySource | None) -> None:
        """Take keys from `keys` instead of the workspace's CA (None: back to the CA)."""
        cls._keys = keys

    @classmethod
    def _key_source(cls) -> KeySource:
        if cls._keys is not None:
            return cls._keys
        from modelyo.client.keys import workspace_keys

        # One source per folder for the process: papermill writes the output many times a run.
        return workspace_keys(needed_for=f"an encrypted notebook ({PREFIX}...)")

    @classmethod
    def read(cls, path: str) -> str:
        """Decrypt the notebook at `path` and return its JSON text.

        With `?key_id=K`, the file must be encrypted under K (a file swapped in storage for one
        under another key is refused rather than silently read).
        """
        from modelyo.encryption import decrypt_bytes, read_header

        file, key_id = parse_url(path)
        try:
            data = Path(file).read_bytes()
        except OSError as exc:
            raise EncryptionError(f"cannot read {file}: {exc.strerror}", path=file) from None
        pos = 0

        def take(n: int) -> bytes:
            nonlocal pos
            chunk = data[pos : pos + n]
            pos += len(chunk)
            return chunk

        header = read_header(take, label=file)
        if key_id is not None and header.key_id != key_id:
            raise EncryptionError(
                f"{file} is encrypted under key id {header.key_id!r}, not {key_id!r} as asked; "
                f"check the file, or drop ?key_id= to accept the key id its header names",
                path=file,
            )
        plaintext = decrypt_bytes(data, cls._key_source(), label=file)
        try:
            return plaintext.decode("utf-8")
        except UnicodeDecodeError:
            raise EncryptionError(
                f"{file} decrypted, but is not UTF-8 text, so not a notebook", path=file
            ) from None

    @classmethod
    def write(cls, buf: str, path: str) -> None:
        """Encrypt the notebook text `buf` to `path`, replacing it atomically."""
        from modelyo.encryption import check_key_id, encrypt_bytes
        from modelyo.encryption.files import atomic_output

        file, key_id = parse_url(path)
        key_id = check_key_id(key_id or DEFAULT_KEY_ID)
        ciphertext = encrypt_bytes(buf.encode("utf-8"), cls._key_source(), key_id)
        # One write at a time per process: papermill may save from an output hook while the
        # main loop saves too, and the last complete notebook must win.
        with cls._write_lock, atomic_output(file, force=True, fsync=True, mode=FILE_MODE) as fd:
            view = memoryview(ciphertext)
            while view:
                view = view[os.write(fd, view) :]

    @classmethod
    def pretty_path(cls, path: str) -> str:
        """The address as the user gave it."""
        return path

    @classmethod
    def listdir(cls, path: str) -> list[str]:
        """The entries of the folder `path`, each as a `modelyo+enc://` address."""
        folder, key_id = parse_url(path)
        suffix = f"?key_id={key_id}" if key_id else ""
        return [
            f"{PREFIX}{os.path.join(folder, name)}{suffix}" for name in sorted(os.listdir(folder))
        ]
