"""Linux system calls the standard library lacks (syncfs, renameat2, sync_file_range).

Each returns False (or does nothing) where the call is unavailable, so callers fall back to a
portable way; `ctypes` is imported on first use because it costs ~10 ms of start-up.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_SYNC_FILE_RANGE_WRITE = 2
_AT_FDCWD = -100


@functools.cache
def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    for name, argtypes in (
        ("syncfs", [ctypes.c_int]),
        (
            "renameat2",
            [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint],
        ),
        ("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]),
    ):
        func = getattr(libc, name, None)
        if func is not None:
            func.argtypes = argtypes
            func.restype = ctypes.c_int
    return libc


def _errno() -> int:
    import ctypes

    return ctypes.get_errno()


def syncfs(fd: int) -> None:
    """Flush every file of the filesystem holding `fd` (one journal commit for a whole tree,
    instead of one fsync per file); falls back to sync()."""
    libc = _libc()
    func = getattr(libc, "syncfs", None) if libc is not None else None
    if func is None or func(fd) != 0:
        os.sync()


def renameat2(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str, flags: int) -> bool:
    """renameat2(2) with `flags`; False if the system has no such call (or the filesystem does
    not support the flag), OSError for any other failure (EEXIST with RENAME_NOREPLACE)."""
    libc = _libc()
    func = getattr(libc, "renameat2", None) if libc is not None else None
    if func is None:
        return False
    if func(src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst), flags) == 0:
        return True
    err = _errno()
    if err in (38, 22, 95):  # ENOSYS, EINVAL (flag unsupported by the filesystem), EOPNOTSUPP
        return False
    raise OSError(err, os.strerror(err), dst)


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk now (SYNC_FILE_RANGE_WRITE), so the
    final fsync waits for a short tail instead of the whole file."""
    libc = _libc()
    func = getattr(libc, "sync_file_range", None) if libc is not None else None
    if func is not None:
        func(fd, offset, length, _SYNC_FILE_RANGE_WRITE)
