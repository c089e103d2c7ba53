"""Single files: encrypt or decrypt a path into a new path, atomically.

The output is written where no one can see it (an O_TMPFILE inode, or a hidden temporary name
when the filesystem lacks O_TMPFILE), fsynced, and only then given its final name; decrypted
plaintext gets a name only once every segment has authenticated. Any failure discards it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag

from modelyo.encryption import _linux
from modelyo.encryption._aead import SegmentCipher
from modelyo.encryption.format import DEFAULT_SEGMENT_SIZE, TAG_SIZE, Header, Layout
from modelyo.encryption.keys import KeySource
from modelyo.encryption.stream import (
    _WRITE_CHUNK,
    DEFAULT_THREADS,
    NO_PROGRESS,
    KeyCache,
    Progress,
    _changed,
    _segment_failed,
    decrypt_layout,
    open_fd,
    read_header,
    seal_fd,
    start_decryption,
    start_encryption,
)
from modelyo.errors import EncryptionError

# Temporary names beside a destination: ".NAME.modelyo-KIND-PID-TOKEN". The pid lets the next
# run remove what a killed run left behind without touching a run still in progress.
_TEMP_RE = re.compile(r"\.modelyo-(tmp|staging|old)-(\d+)-[0-9a-f]{8}\Z")
_NAME_ROOM = 160  # keeps temporary names under NAME_MAX (255 bytes)
_MODE_MASK = 0o777  # modes are mirrored without setuid, setgid and sticky bits


def temp_name(final: str, kind: str) -> str:
    """A fresh hidden name beside `final` for a temporary of `kind` (tmp, staging or old)."""
    stem = os.fsencode(final)[:_NAME_ROOM].decode(errors="surrogateescape")
    return f".{stem}.modelyo-{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_entry(parent_fd: int, name: str) -> None:
    """Remove a file or a whole tree at `name` in `parent_fd`, whatever its folders' modes."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=parent_fd)
        return
    # Folders may have been given read-only modes: make each one ours before descending.
    _make_writable(parent_fd, name)
    for _root, dirs, _files, root_fd in os.fwalk(name, dir_fd=parent_fd):
        for d in dirs:
            _make_writable(root_fd, d)
    shutil.rmtree(name, dir_fd=parent_fd)


def _make_writable(dir_fd: int, name: str) -> None:
    """chmod 700 the folder `name`, never a symlink's target (fwalk lists links to folders
    among folders): O_PATH|O_NOFOLLOW pins the folder itself, then chmod goes through /proc."""
    if not hasattr(os, "O_PATH") or not UnnamedFile._tmpfile_ok:  # no /proc: check, then chmod
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                os.chmod(name, 0o700, dir_fd=dir_fd)
        return
    try:
        fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError:
        return  # a symlink, or gone
    try:
        os.chmod(f"/proc/self/fd/{fd}", 0o700)
    except OSError:
        pass
    finally:
        os.close(fd)


def clean_stale(parent_fd: int, final: str) -> None:
    """Remove temporaries beside `final` left by runs that died (SIGKILL, power loss)."""
    stem = "." + os.fsencode(final)[:_NAME_ROOM].decode(errors="surrogateescape") + "."
    for entry in os.scandir(parent_fd):
        if not entry.name.startswith(stem):
            continue
        m = _TEMP_RE.search(entry.name)
        if m is None or entry.name[: m.start()] + "." != stem:
            continue
        if not _pid_alive(int(m.group(2))):
            with contextlib.suppress(OSError):
                remove_entry(parent_fd, entry.name)


@dataclass
class Destination:
    """The folder a result goes into (an open fd) and the result's final name there."""

    path: str
    parent_fd: int
    name: str
    exists: bool


@contextlib.contextmanager
def destination(path: str | os.PathLike[str], *, force: bool) -> Iterator[Destination]:
    """Open the folder that will hold `path`; refuse an existing `path` without `force`."""
    shown = os.fsdecode(path)
    norm = os.path.normpath(shown)
    name = os.path.basename(norm)
    if name in ("", ".", "..") or norm == os.sep:
        raise EncryptionError(f"{shown}: give the name of a new file or folder as the destination")
    parent = os.path.dirname(norm) or "."
    try:
        parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise EncryptionError(
            f"cannot open the folder {parent} for {shown}: {exc.strerror}; create it first",
            path=shown,
        ) from None
    try:
        try:
            os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            exists = True
        except FileNotFoundError:
            exists = False
        if exists and not force:
            raise EncryptionError(
                f"{shown} already exists; pass --force (force=True) to replace it", path=shown
            )
        clean_stale(parent_fd, name)
        yield Destination(shown, parent_fd, name, exists)
    finally:
        os.close(parent_fd)


def publish(parent_fd: int, temp: str, final: str, *, replace: bool) -> None:
    """Rename `temp` to `final` in one step: never over an existing entry unless `replace`, and
    then atomically (RENAME_EXCHANGE for folders), removing what was replaced afterwards."""
    if not replace:
        if _linux.renameat2(parent_fd, temp, parent_fd, final, _linux.RENAME_NOREPLACE):
            return
        # No renameat2: check, then rename (a tiny race only where the call is missing).
        with contextlib.suppress(FileNotFoundError):
            os.stat(final, dir_fd=parent_fd, follow_symlinks=False)
            raise FileExistsError(errno.EEXIST, "already exists", final)
        os.rename(temp, final, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        return
    try:
        old = os.stat(final, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        publish(parent_fd, temp, final, replace=False)
        return
    new = os.stat(temp, dir_fd=parent_fd, follow_symlinks=False)
    if not stat.S_ISDIR(old.st_mode) and not stat.S_ISDIR(new.st_mode):
        os.rename(temp, final, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)  # atomic replace
        return
    if _linux.renameat2(parent_fd, temp, parent_fd, final, _linux.RENAME_EXCHANGE):
        remove_entry(parent_fd, temp)  # `temp` now names what was replaced
        return
    aside = temp_name(final, "old")
    os.rename(final, aside, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
    os.rename(temp, final, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
    remove_entry(parent_fd, aside)


class UnnamedFile:
    """A new file in a folder that has no name until `link`; `discard` makes it vanish.

    O_TMPFILE gives an inode with no directory entry at all, so even a SIGKILL leaves nothing;
    without it (some filesystems) a hidden temporary name with mode 0600 stands in.
    """

    _tmpfile_ok = os.path.isdir("/proc/self/fd") and hasattr(os, "O_TMPFILE")

    def __init__(self, dir_fd: int, final: str) -> None:
        self.dir_fd = dir_fd
        self.temp: str | None = None
        flags = os.O_WRONLY | os.O_CLOEXEC
        if UnnamedFile._tmpfile_ok:
            try:
                self.fd = os.open(".", flags | os.O_TMPFILE, 0o600, dir_fd=dir_fd)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                    raise
        self.temp = temp_name(final, "tmp")
        self.fd = os.open(
            self.temp, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd
        )

    def link(self, name: str) -> None:
        """Give the file `name` in its folder; fails if `name` exists."""
        if self.temp is None:
            os.link(f"/proc/self/fd/{self.fd}", name, dst_dir_fd=self.dir_fd)
        else:
            publish(self.dir_fd, self.temp, name, replace=False)
            self.temp = None

    def publish(self, name: str, *, replace: bool) -> None:
        """Give the file `name`, replacing an existing entry if `replace`."""
        if not replace:
            self.link(name)
            return
        if self.temp is None:
            self.temp = temp_name(name, "tmp")
            os.link(f"/proc/self/fd/{self.fd}", self.temp, dst_dir_fd=self.dir_fd)
        publish(self.dir_fd, self.temp, name, replace=True)
        self.temp = None

    def close(self) -> None:
        """Close the descriptor (the file stays if it was linked)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        """Close and remove: nothing of the file remains under any name."""
        self.close()
        if self.temp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp, dir_fd=self.dir_fd)
            self.temp = None


def open_source(
    path: str | os.PathLike[str], *, dir_fd: int | None = None
) -> tuple[int, os.stat_result]:
    """Open a regular file for reading without following a symlink at its last component
    (when `dir_fd` is given) and without blocking on a FIFO; refuse anything else."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
    if dir_fd is not None:
        flags |= os.O_NOFOLLOW
    shown = os.fsdecode(path)
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except OSError as exc:
        raise EncryptionError(f"cannot open {shown}: {exc.strerror}", path=shown) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise EncryptionError(f"{shown} is {kind}; give a regular file, a folder or -", path=shown)
    return fd, st


def encrypt_fd(
    cipher: SegmentCipher,
    header: Header,
    src_fd: int,
    size: int,
    dst_fd: int,
    *,
    label: str,
    threads: int,
    writeback: bool,
    progress: Progress,
) -> None:
    """Encrypt a regular file's `size` bytes into `dst_fd`; small files take a short path."""
    if size <= header.segment_size:
        data = os.pread(src_fd, size + 1, 0)
        if len(data) != size:
            raise _changed(label)
        _write_all_fd(dst_fd, header.encode() + cipher.seal(0, True, data))
        progress.advance(size)
        return
    seal_fd(
        cipher,
        header.encode(),
        header.segment_size,
        src_fd,
        size,
        dst_fd,
        label=label,
        threads=threads,
        writeback=writeback,
        progress=progress,
    )


def decrypt_fd(
    cipher: SegmentCipher,
    lay: Layout,
    src_fd: int,
    size: int,
    dst_fd: int,
    *,
    label: str,
    threads: int,
    writeback: bool,
    progress: Progress,
) -> None:
    """Decrypt a regular file laid out as `lay` into the unnamed `dst_fd`.

    Progress counts ciphertext bytes here (the tree's totals are the sizes it scanned).
    """
    if lay.segments == 1:
        data = os.pread(src_fd, lay.last_plaintext + TAG_SIZE + 1, lay.header_size)
        if len(data) != lay.last_plaintext + TAG_SIZE:
            raise _changed(label)
        try:
            plain = cipher.open(0, True, data)
        except InvalidTag:
            raise _segment_failed(label, 0, True) from None
        _write_all_fd(dst_fd, plain)
        progress.advance(size)
        return
    progress.advance(lay.header_size)
    open_fd(
        cipher,
        lay,
        src_fd,
        size,
        dst_fd,
        label=label,
        threads=threads,
        writeback=writeback,
        progress=progress,
    )


def _write_all_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view[:_WRITE_CHUNK]) :]


@contextlib.contextmanager
def atomic_output(
    dst: str | os.PathLike[str],
    *,
    force: bool,
    fsync: bool,
    mode: int,
    source: os.stat_result | None = None,
) -> Iterator[int]:
    """Yield the descriptor of an unnamed new file that becomes `dst` (with `mode`) when the
    block ends without an exception, and vanishes otherwise.

    With `fsync` the data is on disk before the name appears. `source`, if given, is the input
    file's status: replacing the input with its own output is refused.
    """
    with destination(dst, force=force) as dest:
        if dest.exists and source is not None:
            _refuse_same(source, dest)
        out = UnnamedFile(dest.parent_fd, dest.name)
        try:
            yield out.fd
            os.fchmod(out.fd, mode & _MODE_MASK)
            if fsync:
                os.fsync(out.fd)
            out.publish(dest.name, replace=dest.exists)
        except BaseException:
            out.discard()
            raise
        out.close()
        if fsync:
            os.fsync(dest.parent_fd)


def encrypt_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    keys: KeySource | KeyCache,
    key_id: str = "default",
    *,
    force: bool = False,
    fsync: bool = True,
    name: bytes = b"",
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    threads: int = DEFAULT_THREADS,
    progress: Progress = NO_PROGRESS,
) -> Header:
    """Encrypt the file `src` into the new file `dst` (same mode) under `key_id`.

    `dst` appears complete or not at all; an existing `dst` is replaced only with `force`.
    `fsync` makes the result durable before it gets its name (power-loss safe).
    """
    label = os.fsdecode(src)
    src_fd, st = open_source(src)
    try:
        header, cipher = start_encryption(keys, key_id, name=name, segment_size=segment_size)
        with atomic_output(dst, force=force, fsync=fsync, mode=st.st_mode, source=st) as out:
            encrypt_fd(
                cipher,
                header,
                src_fd,
                st.st_size,
                out,
                label=label,
                threads=threads,
                writeback=fsync,
                progress=progress,
            )
        return header
    finally:
        os.close(src_fd)


def decrypt_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    keys: KeySource | KeyCache,
    *,
    force: bool = False,
    fsync: bool = True,
    expected_name: bytes | None = None,
    threads: int = DEFAULT_THREADS,
    progress: Progress = NO_PROGRESS,
) -> Header:
    """Decrypt the file `src` into the new file `dst` (same mode), with the key its header names.

    The key is checked against the header's commitment before anything is created; the
    plaintext is written to an unnamed file and named only once every segment authenticated.
    """
    label = os.fsdecode(src)
    src_fd, st = open_source(src)
    try:
        header = read_header(lambda n: os.read(src_fd, n), label=label)
        cipher = start_decryption(keys, header, label=label, expected_name=expected_name)
        lay = decrypt_layout(header, st.st_size, label=label)
        with atomic_output(dst, force=force, fsync=fsync, mode=st.st_mode, source=st) as out:
            decrypt_fd(
                cipher,
                lay,
                src_fd,
                st.st_size,
                out,
                label=label,
                threads=threads,
                writeback=fsync,
                progress=progress,
            )
        return header
    finally:
        os.close(src_fd)


def _refuse_same(src: os.stat_result, dest: Destination) -> None:
    st = os.stat(dest.name, dir_fd=dest.parent_fd, follow_symlinks=False)
    if (st.st_dev, st.st_ino) == (src.st_dev, src.st_ino):
        raise EncryptionError(
            f"{dest.path} is the source itself; write the result to another path",
            path=dest.path,
        )
