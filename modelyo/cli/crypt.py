"""`modelyo encrypt SRC DST` and `modelyo decrypt SRC DST`: folders, files and streams.

The commands print their own error messages and end with SystemExit(code): click, run with
standalone_mode=False as `modelyo.cli.main` does, returns the code of a `ctx.exit()` instead
of raising it, so that route would lose exit code 3. They behave the same under the `modelyo`
group and under the lean entry point `python -m modelyo.cli.crypt`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from modelyo.encryption import (
    KeySource,
    StaticKeySource,
    TreeResult,
    check_key_id,
    decrypt_file,
    decrypt_stream,
    decrypt_tree,
    encrypt_file,
    encrypt_stream,
    encrypt_tree,
    read_key_file,
)
from modelyo.encryption.files import atomic_output
from modelyo.encryption.stream import NO_PROGRESS, Progress
from modelyo.errors import KeyUnavailableError, ModelyoError, TamperError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_REFUSED = 3
EXIT_INTERRUPTED = 130

_EXIT_CODES = """
\b
Exit codes:
  0  done: the destination is complete
  1  error (unreadable input, missing key, destination exists without --force, ...);
     nothing was created
  2  the command line is wrong
  3  refused: a file failed authentication (altered, truncated, reordered, moved, wrong
     key); nothing was created (for stdout: discard what was written)
  130 interrupted; nothing was created
"""

# Progress bars only for runs long enough to want one.
_BAR_MIN_BYTES = 64 << 20
_BAR_MIN_FILES = 200


def _valid_key_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return check_key_id(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def key_source(key_file: Path | None, key_id: str) -> KeySource:
    """Pick where keys come from: a key file when given, else the attested CA.

    A key file (32 raw bytes or 64 hex digits) serves version 1 of `key_id`; the CA releases
    keys to its owner, using the files `modelyo attest` stored in the current directory.
    """
    check_key_id(key_id)
    if key_file is not None:
        key = read_key_file(key_file)
        return StaticKeySource({key_id: {1: key}}, origin=f"the key file {key_file}")
    # Imported here: the workspace's pydantic models cost ~80 ms of start-up, which a run
    # with a key file (or a short tree run) should not pay.
    from modelyo.workspace import Workspace

    workspace = Workspace.here()
    if workspace.ca_owner:
        # Imported here: the HTTPS client is only needed when keys come from the CA.
        from modelyo.client.ca import CaClient
        from modelyo.client.keys import CaKeySource

        return CaKeySource(CaClient.for_owner(workspace))
    raise KeyUnavailableError(
        "no key: run `modelyo attest` in this directory (keys then come from the CA with the "
        "owner's client certificate), or pass --key-file PATH (32 raw bytes or 64 hex digits, "
        "mode 600) or set MODELYO_KEY_FILE"
    )


class _Bar:
    """A rich progress bar (bytes, files, rate, time left) on stderr, fed from any thread."""

    def __init__(self, verb: str, total_bytes: int, total_files: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichProgress

        self._files = 0
        self._total_files = total_files
        self._lock = threading.Lock()
        self._bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TextColumn("{task.fields[files]}"),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._task = self._bar.add_task(verb, total=total_bytes, files=self._files_text())

    def _files_text(self) -> str:
        return f"{self._files}/{self._total_files} files" if self._total_files > 1 else ""

    def advance(self, nbytes: int) -> None:
        self._bar.update(self._task, advance=nbytes)

    def file_done(self) -> None:
        with self._lock:
            self._files += 1
            text = self._files_text()
        self._bar.update(self._task, files=text)

    def __enter__(self) -> _Bar:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()


class _LazyProgress:
    """Starts a bar once the totals are known, if the run is long and stderr is a terminal."""

    def __init__(self, verb: str, quiet: bool) -> None:
        self.verb = verb
        self.enabled = not quiet and sys.stderr.isatty()
        self.bar: _Bar | None = None
        self.sink: Progress = NO_PROGRESS

    def start(self, total_bytes: int, total_files: int) -> None:
        if self.enabled and (total_bytes >= _BAR_MIN_BYTES or total_files >= _BAR_MIN_FILES):
            self.bar = _Bar(self.verb, total_bytes, total_files).__enter__()
            self.sink = self.bar

    def advance(self, nbytes: int) -> None:
        self.sink.advance(nbytes)

    def file_done(self) -> None:
        self.sink.file_done()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None
            self.sink = NO_PROGRESS


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    # Turn SIGTERM into an exception so that staging folders and unnamed outputs are cleaned
    # up on the way out, exactly as for Ctrl-C.
    raise KeyboardInterrupt


@contextlib.contextmanager
def _exit_codes(stdout_used: bool) -> Iterator[None]:
    """Map failures to a one-line message and the documented exit codes."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        yield
    except TamperError as exc:
        hint = " (discard what was written to stdout: it is incomplete)" if stdout_used else ""
        click.secho(f"refused: {exc}{hint}", fg="red", err=True)
        raise SystemExit(EXIT_REFUSED) from None
    except ModelyoError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        raise SystemExit(EXIT_ERROR) from None
    except KeyboardInterrupt:
        click.secho("interrupted: nothing was created", fg="red", err=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except BrokenPipeError:
        # The reader of stdout went away (e.g. `| head`): not worth a traceback.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(EXIT_ERROR) from None
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        click.secho(f"error: {exc.strerror or exc}{where}", fg="red", err=True)
        raise SystemExit(EXIT_ERROR) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def _source_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _warn_skip(src: str) -> Callable[[str, str], None]:
    def warn(rel: str, reason: str) -> None:
        click.secho(f"skipped {src.rstrip('/')}/{rel}: {reason}", fg="yellow", err=True)

    return warn


def _summary(quiet: bool, text: str) -> None:
    if not quiet:
        click.echo(text, err=True)


def _tree_text(verb: str, result: TreeResult, src: str, dst: str) -> str:
    return (
        f"{verb} {result.files} files in {result.folders + 1} folders "
        f"({_human(result.bytes)}) from {src} into {dst}"
    )


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


_common = [
    click.option(
        "--key-file",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="MODELYO_KEY_FILE",
        help="Read the key (32 raw bytes or 64 hex digits, mode 600) from this file "
        "[env: MODELYO_KEY_FILE]. Until the CA is attested this is the only key source.",
    ),
    click.option("--force", is_flag=True, help="Replace DST if it exists (atomically)."),
    click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary line."),
    click.option(
        "--no-fsync",
        is_flag=True,
        help="Do not wait for the disk before DST appears: still atomic if this process dies, "
        "but not after a power loss.",
    ),
]


def _options(func: Callable[..., None]) -> Callable[..., None]:
    for option in reversed(_common):
        func = option(func)
    return func


@click.command("encrypt", epilog=_EXIT_CODES)
@click.argument("src")
@click.argument("dst")
@click.option(
    "--key-id",
    default="default",
    show_default=True,
    callback=_valid_key_id,
    help="Encrypt under this key id (a dataset or project); its current version is used.",
)
@_options
def encrypt(
    src: str, dst: str, key_id: str, key_file: Path | None, force: bool, quiet: bool, no_fsync: bool
) -> None:
    """Encrypt SRC (a folder, a file, or - for stdin) into DST (new; - for stdout).

    A folder is mirrored: relative paths, empty folders and modes. Symlinks, devices, FIFOs and
    sockets inside it are skipped with a message, never followed. DST appears complete or not
    at all, and an existing DST is only replaced with --force.

    \b
    Examples:
      modelyo encrypt my_plain/ my_encrypted/
      modelyo encrypt report.csv report.csv.enc --key-id project-x
      tar c data/ | modelyo encrypt - data.tar.enc
    """
    with _exit_codes(stdout_used=dst == "-"):
        keys = key_source(key_file, key_id)
        fsync = not no_fsync
        progress = _LazyProgress("encrypting", quiet)
        try:
            if dst == "-" and sys.stdout.isatty():
                raise click.UsageError(
                    "refusing to write encrypted bytes to a terminal; redirect stdout or give DST"
                )
            if src == "-":
                _stream_to(
                    dst, force, fsync, 0o666 & ~_umask(), encrypt=True, keys=keys, key_id=key_id
                )
                if dst != "-":
                    _summary(quiet, f"encrypted stdin into {dst} with key {key_id!r}")
            elif _is_dir(src):
                if dst == "-":
                    raise click.UsageError(
                        "a folder cannot be written to stdout; give a DST folder"
                    )
                result = encrypt_tree(
                    src,
                    dst,
                    keys,
                    key_id,
                    force=force,
                    fsync=fsync,
                    progress=progress,
                    on_skip=_warn_skip(src),
                    on_scanned=lambda r: progress.start(r.bytes, r.files),
                )
                _summary(
                    quiet,
                    _tree_text("encrypted", result, src, dst)
                    + f" with key {key_id!r}"
                    + (f"; skipped {len(result.skipped)}" if result.skipped else ""),
                )
            elif dst == "-":
                with open(src, "rb") as handle:
                    encrypt_stream(handle, sys.stdout.buffer, keys, key_id)
            else:
                progress.start(_source_size(src), 1)
                header = encrypt_file(
                    src, dst, keys, key_id, force=force, fsync=fsync, progress=progress
                )
                _summary(
                    quiet,
                    f"encrypted {src} into {dst} with key {key_id!r} version {header.key_version}",
                )
        finally:
            progress.close()


@click.command("decrypt", epilog=_EXIT_CODES)
@click.argument("src")
@click.argument("dst")
@click.option(
    "--key-id",
    default="default",
    show_default=True,
    callback=_valid_key_id,
    help="The key id the key file holds. Each file's header names its key id and version, "
    "and exactly that key is used.",
)
@_options
def decrypt(
    src: str, dst: str, key_id: str, key_file: Path | None, force: bool, quiet: bool, no_fsync: bool
) -> None:
    """Decrypt SRC (a folder, a file, or - for stdin) into DST (new; - for stdout).

    Every file is authenticated before its plaintext gets a name: if any file was altered,
    truncated, reordered, moved within the tree or encrypted under another key, the command
    stops with exit code 3 and DST is not created. With - as DST, each segment is written once
    it authenticated, so on exit code 3 discard what was written.

    \b
    Examples:
      modelyo decrypt my_encrypted/ my_plain/
      modelyo decrypt data.tar.enc - | tar x
    """
    with _exit_codes(stdout_used=dst == "-"):
        keys = key_source(key_file, key_id)
        fsync = not no_fsync
        progress = _LazyProgress("decrypting", quiet)
        try:
            if src == "-":
                _stream_to(dst, force, fsync, 0o600, encrypt=False, keys=keys, key_id=key_id)
                if dst != "-":
                    _summary(quiet, f"decrypted stdin into {dst}")
            elif _is_dir(src):
                if dst == "-":
                    raise click.UsageError(
                        "a folder cannot be written to stdout; give a DST folder"
                    )
                result = decrypt_tree(
                    src,
                    dst,
                    keys,
                    force=force,
                    fsync=fsync,
                    progress=progress,
                    on_skip=_warn_skip(src),
                    on_scanned=lambda r: progress.start(r.bytes, r.files),
                )
                _summary(
                    quiet,
                    _tree_text("decrypted", result, src, dst)
                    + (f"; skipped {len(result.skipped)}" if result.skipped else ""),
                )
            elif dst == "-":
                with open(src, "rb") as handle:
                    decrypt_stream(handle, sys.stdout.buffer, keys, label=src)
            else:
                progress.start(_source_size(src), 1)
                header = decrypt_file(src, dst, keys, force=force, fsync=fsync, progress=progress)
                _summary(
                    quiet,
                    f"decrypted {src} into {dst} (key {header.key_id!r} "
                    f"version {header.key_version})",
                )
        finally:
            progress.close()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _stream_to(
    dst: str, force: bool, fsync: bool, mode: int, *, encrypt: bool, keys: KeySource, key_id: str
) -> None:
    """stdin to stdout, or stdin to a file that appears atomically."""
    stdin = sys.stdin.buffer
    if dst == "-":
        if encrypt:
            encrypt_stream(stdin, sys.stdout.buffer, keys, key_id)
        else:
            decrypt_stream(stdin, sys.stdout.buffer, keys, label="<stdin>")
        return
    with (
        atomic_output(dst, force=force, fsync=fsync, mode=mode) as fd,
        open(fd, "wb", closefd=False) as out,
    ):
        if encrypt:
            encrypt_stream(stdin, out, keys, key_id)
        else:
            decrypt_stream(stdin, out, keys, label="<stdin>")


def main(argv: list[str] | None = None) -> int:
    """A lean entry point with only these two commands (`python -m modelyo.cli.crypt`), which
    starts faster than the full `modelyo` group."""
    group = click.Group(
        "modelyo",
        commands=[encrypt, decrypt],
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    try:
        code = group.main(args=argv, prog_name="modelyo", standalone_mode=False)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo("aborted", err=True)
        return EXIT_ERROR
    return code if isinstance(code, int) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
