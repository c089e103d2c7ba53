"""Encrypt and decrypt files from inside a Modelyo container, through its /modelyo folders.

The agent in the TDX VM serves four folders in every container it runs (on tmpfs):

    /modelyo/enc_in  ->  /modelyo/enc_out    encrypted with the container's key
    /modelyo/dec_in  ->  /modelyo/dec_out    decrypted with the container's key

A file that is complete in an `_in` folder (closed after writing, or renamed into it) is taken
by the agent; the result appears whole under the same name in the matching `_out` folder, or
`NAME.error` appears there with the reason. Names starting with "." are never taken, so writers
stage files under such names and rename them when done. This module does exactly that:

    from modelyo import incontainer
    plain = incontainer.decrypt("/data/train.csv.enc")         # Path("/modelyo/dec_out/...")
    sealed = incontainer.encrypt(b"42\\n", name="answer.txt")   # Path("/modelyo/enc_out/...")

    python -m modelyo.incontainer decrypt /data/train.csv.enc [-n NAME] [-o OUT] [-t SECONDS]

Only the standard library and `modelyo.errors` are used, so it works in any image that has the
modelyo package. MODELYO_CRYPT_ROOT points it at another folder than /modelyo (tests).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import BinaryIO

from modelyo.errors import CryptFolderError

ROOT_ENV = "MODELYO_CRYPT_ROOT"
DEFAULT_ROOT = "/modelyo"
FOLDERS = ("enc_in", "enc_out", "dec_in", "dec_out")
ERROR_SUFFIX = ".error"
DEFAULT_TIMEOUT = 600.0
# Leaves room for ".error" and for the agent's and this module's staging names (NAME_MAX 255).
MAX_NAME_BYTES = 200
_COPY_CHUNK = 1 << 20


def root() -> Path:
    """The folder holding enc_in, enc_out, dec_in and dec_out: $MODELYO_CRYPT_ROOT or /modelyo."""
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def is_request_name(name: str) -> bool:
    """Whether the agent takes a file of this name from an `_in` folder (hidden ones it skips)."""
    return bool(name) and not name.startswith(".") and "/" not in name and "\0" not in name


def check_name(name: str) -> str:
    """Return `name` if it can name a request (one visible path component), else raise."""
    if not is_request_name(name):
        raise CryptFolderError(
            f"{name!r} cannot name a file in the /modelyo folders: give a plain file name that "
            "does not start with '.' and has no '/'"
        )
    if len(os.fsencode(name)) > MAX_NAME_BYTES:
        raise CryptFolderError(
            f"the file name {name[:40]!r}... is longer than {MAX_NAME_BYTES} bytes; "
            "give a shorter name with name=..."
        )
    return name


def encrypt(
    source: str | os.PathLike[str] | bytes,
    name: str | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """Have the agent encrypt `source` (a file path, or bytes with `name`) with this
    container's key; return the path of the encrypted file in /modelyo/enc_out.

    Raises `CryptFolderError` with the agent's reason, or with `timed_out` set.
    """
    return request("enc", source, name, timeout=timeout)


def decrypt(
    source: str | os.PathLike[str] | bytes,
    name: str | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """Have the agent decrypt `source` (a file path, or bytes with `name`) with this
    container's key; return the path of the plaintext in /modelyo/dec_out (tmpfs).

    Raises `CryptFolderError` with the agent's reason (tampered file, wrong key, a key id this
    container may not use), or with `timed_out` set.
    """
    return request("dec", source, name, timeout=timeout)


Source = str | os.PathLike[str] | bytes | BinaryIO


def request(
    direction: str,
    source: Source,
    name: str | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """Put `source` (a path, bytes or a binary stream) into `<direction>_in` under `name` and
    wait for the agent's answer; return the result's path in `<direction>_out`."""
    if direction not in ("enc", "dec"):
        raise ValueError(f"direction is 'enc' or 'dec', not {direction!r}")
    if isinstance(source, bytes | bytearray | memoryview) or hasattr(source, "read"):
        if name is None:
            raise CryptFolderError("give name=... for bytes or a stream: it names the result")
    elif name is None:
        name = Path(source).name
    check_name(name)
    in_dir, out_dir = _folders(direction)
    result, error = out_dir / name, out_dir / (name + ERROR_SUFFIX)
    # An earlier answer under the same name must not be taken for this one.
    for stale in (result, error):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    _put(in_dir, name, source)
    return _wait(result, error, name, timeout)


def _folders(direction: str) -> tuple[Path, Path]:
    base = root()
    in_dir, out_dir = base / f"{direction}_in", base / f"{direction}_out"
    for folder in (in_dir, out_dir):
        if not folder.is_dir():
            raise CryptFolderError(
                f"{folder} does not exist: this works inside a container created by the Modelyo "
                f"agent (or set {ROOT_ENV} to a folder served by one)"
            )
    return in_dir, out_dir


def _put(in_dir: Path, name: str, source: Source) -> None:
    """Write the request under a hidden name, then rename it: the agent sees it only whole."""
    staging = in_dir / f".{name}.{secrets.token_hex(6)}.part"
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            if isinstance(source, bytes | bytearray | memoryview):
                out.write(source)
            elif hasattr(source, "read"):
                shutil.copyfileobj(source, out, _COPY_CHUNK)
            else:
                try:
                    with open(source, "rb") as src:
                        shutil.copyfileobj(src, out, _COPY_CHUNK)
                except OSError as exc:
                    raise CryptFolderError(
                        f"cannot read {os.fsdecode(source)}: {exc.strerror}",
                        path=os.fsdecode(source),
                    ) from None
        os.rename(staging, in_dir / name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
        raise


def _wait(result: Path, error: Path, name: str, timeout: float) -> Path:
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        # The agent renames the answer into place, so existing means complete.
        if result.exists():
            return result
        if error.exists():
            try:
                reason = error.read_text(errors="replace").strip()
            except FileNotFoundError:  # removed between the check and the read: look again
                continue
            with contextlib.suppress(FileNotFoundError):
                error.unlink()
            raise CryptFolderError(reason or f"the agent could not process {name}", path=name)
        if time.monotonic() >= deadline:
            raise CryptFolderError(
                f"no answer for {name} after {timeout:g} s: large files take longer (pass a "
                f"larger timeout), otherwise the Modelyo agent is not serving "
                f"{result.parent.parent}",
                path=name,
                timed_out=True,
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _copy_out(result: Path, output: Path) -> None:
    """Copy `result` to `output` (complete or not at all), then drop it from the _out folder."""
    tmp = output.with_name(f".{output.name}.{secrets.token_hex(6)}.part")
    try:
        with result.open("rb") as src, tmp.open("xb") as dst:
            shutil.copyfileobj(src, dst, _COPY_CHUNK)
        os.replace(tmp, output)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    result.unlink()


def main(argv: list[str] | None = None) -> int:
    """`python -m modelyo.incontainer encrypt|decrypt FILE`: print where the result is."""
    parser = argparse.ArgumentParser(
        prog="python -m modelyo.incontainer",
        description="Encrypt or decrypt a file through this container's /modelyo folders.",
    )
    parser.add_argument("action", choices=("encrypt", "decrypt"))
    parser.add_argument("file", help="the file to process ('-' reads standard input)")
    parser.add_argument("-n", "--name", help="name of the result (default: the file's name)")
    parser.add_argument(
        "-o", "--output", type=Path, help="copy the result here and remove it from /modelyo"
    )
    parser.add_argument("-t", "--timeout", type=float, default=DEFAULT_TIMEOUT)
    args = parser.parse_args(argv)
    direction = "enc" if args.action == "encrypt" else "dec"
    try:
        source: Source = sys.stdin.buffer if args.file == "-" else args.file
        result = request(direction, source, args.name, timeout=args.timeout)
        if args.output is not None:
            _copy_out(result, args.output)
            result = args.output
    except (CryptFolderError, OSError) as exc:
        print(f"modelyo.incontainer: {exc}", file=sys.stderr)
        return 1
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
