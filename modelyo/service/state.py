"""State directories of Modelyo services: private, served by one process, decided once.

- `prepare_directory`: create a state directory 0700, or refuse one that others can open.
- `StateLock`: an exclusive fcntl lock on `DIR/.lock`, so one process serves a directory.
- `create_exclusive`: create a file holding given bytes unless the name exists, atomically,
  with exactly one winner among threads, processes and crashes. This is how ownership is
  decided (the CA's `owner.sealed`, the agent's `owner.json`): never "check, then write".

How `create_exclusive` decides: the bytes go to a private temporary file (0600), which is
fsynced and then hard-linked to the final name. `link()` creates the name only if it does not
exist, atomically, and the name appears with its complete content, so a crash leaves either
nothing or the whole file. Where the file system has no hard links (Gramine implements no
`link()`), `open(O_CREAT | O_EXCL)` decides instead; a crash while writing can then leave a
short file under the name, which callers must treat as "decided nothing" as long as they
answered nobody before the write completed (both services do: the claimant is answered only
after this function returned True).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import uuid
from pathlib import Path

from modelyo.errors import StateError
from modelyo.files import fsync_dir

LOCK_FILE = ".lock"
# link() failing with these means the file system has no hard links (not that we lost).
NO_HARD_LINKS = frozenset({errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP})


def prepare_directory(directory: str | os.PathLike[str], *, option: str = "--state-dir") -> Path:
    """Create the state directory (0700) or check that an existing one is private."""
    path = Path(directory).absolute()
    try:
        existed = path.exists()
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not existed:
            os.chmod(path, 0o700)  # the umask may have removed bits, never added
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise StateError(
            f"cannot use state directory {path}: {exc.strerror or exc}; check its "
            f"permissions or choose another {option}"
        ) from None
    if mode & 0o077:
        raise StateError(
            f"state directory {path} is open to other users (mode {mode:03o}); run "
            f"`chmod 700 {path}`"
        )
    return path


class StateLock:
    """An exclusive fcntl lock on `DIR/.lock`: one `program` process per state directory."""

    def __init__(
        self, directory: str | os.PathLike[str], *, program: str, option: str = "--state-dir"
    ) -> None:
        self.path = Path(directory) / LOCK_FILE
        self.program = program
        self.option = option
        self._fd: int | None = None

    def acquire(self) -> StateLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StateError(
                f"another {self.program} (pid {holder}) is serving the state directory "
                f"{self.path.parent}; stop it first, or give this one another {self.option}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None

    def __enter__(self) -> StateLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def write_new(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600) -> None:
    """Create `path` (never an existing one) holding `data`, with `mode`, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def temporary_name(target: Path) -> Path:
    """A unique hidden name beside `target` (`.NAME.PID.UUID.tmp`) for a file being prepared."""
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")


def create_exclusive(target: str | os.PathLike[str], data: bytes, *, mode: int = 0o600) -> bool:
    """Create `target` holding `data` unless it exists: True for the one creator, else False.

    See the module docstring for the guarantees. Raises `OSError` for other failures (a full
    disk, no permission); nothing is then created.
    """
    path = Path(target)
    tmp = temporary_name(path)
    write_new(tmp, data, mode=mode)
    try:
        # The decision: link() creates the name only if it does not exist, atomically, and
        # the name appears with its complete, fsynced content.
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in NO_HARD_LINKS:
            raise
    else:
        fsync_dir(path.parent)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    # No hard links here: exclusive creation decides instead.
    try:
        write_new(path, data, mode=mode)
    except FileExistsError:
        return False
    fsync_dir(path.parent)
    return True


def remove_stale_temporaries(directory: Path, target_name: str) -> None:
    """Remove temporary files of `create_exclusive(directory / target_name)` left by crashes:
    they were never linked, so they decided nothing."""
    for leftover in directory.glob(f".{target_name}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
