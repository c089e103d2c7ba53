"""Directory trees: mirror a folder into an encrypted (or decrypted) folder, atomically.

Relative paths, empty folders and modes are mirrored. Nothing inside the tree is followed:
symlinks, devices, FIFOs and sockets are skipped with a message, folders are opened with
O_NOFOLLOW relative to their parent's descriptor, so a swap during the run cannot lead outside.
The result is built in a hidden staging folder (mode 0700) beside the destination, made
durable with one syncfs, and renamed into place: the destination appears complete or not at
all. Every file is bound to its relative path, so files swapped or moved in storage are refused.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from modelyo.encryption import _linux
from modelyo.encryption.files import (
    UnnamedFile,
    decrypt_fd,
    destination,
    encrypt_fd,
    open_source,
    publish,
    remove_entry,
    temp_name,
)
from modelyo.encryption.format import DEFAULT_SEGMENT_SIZE, MAX_NAME_LENGTH
from modelyo.encryption.keys import KeySource
from modelyo.encryption.stream import (
    DEFAULT_THREADS,
    NO_PROGRESS,
    KeyCache,
    Progress,
    decrypt_layout,
    read_header,
    start_decryption,
    start_encryption,
)
from modelyo.errors import EncryptionError

SkipHandler = Callable[[str, str], None]
"""Called with (relative path, reason) for each entry that is skipped."""

_MODE_MASK = 0o777
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PROBE_FILES = 32  # files timed one by one before deciding whether threads pay
_SLOW_FILE = 150e-6  # seconds per file above which a folder's files are shared by threads
_MIN_SHARED = 16  # fewer files left in a folder than this: not worth starting threads


def check_relative_path(path: str | bytes) -> tuple[str, ...]:
    """Split a relative path into its components, refusing any that could leave the root.

    Refused: absolute paths, empty, '.' and '..' components, NUL bytes, and paths longer than
    the format can bind. Callers that take names from data (bundles, archives) use this.
    """
    text = os.fsdecode(path)
    if "\x00" in text:
        raise EncryptionError(f"refused path {text!r}: it contains a NUL byte")
    if text.startswith("/"):
        raise EncryptionError(f"refused path {text!r}: it is absolute, so it would escape")
    parts = tuple(text.split("/"))
    for part in parts:
        if part in ("", ".", ".."):
            raise EncryptionError(
                f"refused path {text!r}: the component {part!r} could escape the destination"
            )
    if len(os.fsencode(text)) > MAX_NAME_LENGTH:
        raise EncryptionError(f"refused path {text!r}: longer than {MAX_NAME_LENGTH} bytes")
    return parts


@dataclass
class TreeResult:
    """What a tree run did."""

    files: int = 0
    folders: int = 0
    bytes: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Dir:
    name: str
    rel: str
    mode: int
    files: list[tuple[str, int]] = field(default_factory=list)  # (name, size)
    dirs: list[_Dir] = field(default_factory=list)


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def _scan(dir_fd: int, node: _Dir, result: TreeResult, skip: SkipHandler) -> None:
    with os.scandir(dir_fd) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        rel = _join(node.rel, entry.name)
        check_relative_path(rel)
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISREG(st.st_mode):
            node.files.append((entry.name, st.st_size))
            result.bytes += st.st_size
        elif stat.S_ISDIR(st.st_mode):
            child = _Dir(entry.name, rel, stat.S_IMODE(st.st_mode) & _MODE_MASK)
            fd = os.open(entry.name, _DIR_FLAGS, dir_fd=dir_fd)
            try:
                _scan(fd, child, result, skip)
            finally:
                os.close(fd)
            node.dirs.append(child)
        else:
            reason = (
                "is a symbolic link: not followed"
                if stat.S_ISLNK(st.st_mode)
                else "is a device, FIFO or socket: only regular files and folders are copied"
            )
            result.skipped.append((rel, reason))
            skip(rel, reason)


def _ignore_skip(rel: str, reason: str) -> None:
    pass


class _TreeRun:
    """One encrypt or decrypt run over a scanned tree, writing into a staging folder."""

    def __init__(
        self,
        src: str,
        encrypt: bool,
        keys: KeyCache,
        key_id: str,
        segment_size: int,
        threads: int,
        progress: Progress,
    ) -> None:
        self.src = src.rstrip("/") or "/"
        self.workers = max(1, threads)
        # None until _PROBE_FILES files were timed; then whether threads share the files.
        self._parallel: bool | None = None if self.workers > 1 else False
        self._probed = 0
        self._probe_time = 0.0
        self.encrypt = encrypt
        self.keys = keys
        self.key_id = key_id
        self.segment_size = segment_size
        self.threads = threads
        self.progress = progress
        self.dir_modes: list[tuple[str, int]] = []

    def run(self, node: _Dir, src_fd: int, dst_fd: int) -> None:
        self._files(node, src_fd, dst_fd)
        for child in node.dirs:
            os.mkdir(child.name, 0o700, dir_fd=dst_fd)
            self.dir_modes.append((child.rel, child.mode))
            csrc = os.open(child.name, _DIR_FLAGS, dir_fd=src_fd)
            try:
                cdst = os.open(child.name, _DIR_FLAGS, dir_fd=dst_fd)
                try:
                    self.run(child, csrc, cdst)
                finally:
                    os.close(cdst)
            finally:
                os.close(csrc)

    def _files(self, node: _Dir, src_fd: int, dst_fd: int) -> None:
        """Process the files of one folder: one by one, or shared by threads when files are
        slow to create.

        Threads pay only when most of a file's time is spent in system calls that release the
        GIL: on a filesystem where inode allocation is slow (ext4 without a journal skips,
        one by one, inodes freed in the last minute, ~200 us per new file) two threads nearly
        halve the time, while where a file takes ~50 us the GIL handoffs around each short
        system call made two threads twice as slow as one. So the first files are timed one
        by one and threads are used only past _SLOW_FILE per file. Outputs are O_TMPFILE
        inodes, which the kernel allocates without taking the folder's lock (O_CREAT takes
        it), so creation itself runs in parallel.
        """
        names = [name for name, _size in node.files]
        i = 0
        while i < len(names) and self._parallel is None:
            start = time.perf_counter()
            self.file(names[i], _join(node.rel, names[i]), src_fd, dst_fd)
            self._probe_time += time.perf_counter() - start
            self._probed += 1
            i += 1
            if self._probed >= _PROBE_FILES:
                self._parallel = self._probe_time / self._probed > _SLOW_FILE
        rest = names[i:]
        if not rest:
            return
        if not self._parallel or len(rest) < _MIN_SHARED:
            for name in rest:
                self.file(name, _join(node.rel, name), src_fd, dst_fd)
            return
        todo = iter(rest)  # next() on a list iterator is atomic under the GIL
        stop = threading.Event()
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for name in todo:
                    if stop.is_set():
                        return
                    self.file(name, _join(node.rel, name), src_fd, dst_fd)
            except BaseException as exc:
                errors.append(exc)
                stop.set()

        threads = [
            threading.Thread(target=work, name=f"modelyo-tree-{w}", daemon=True)
            for w in range(1, self.workers)
        ]
        for t in threads:
            t.start()
        try:
            work()  # this thread works too
        finally:
            # Also on Ctrl-C/SIGTERM (delivered to this thread): stop the others before the
            # caller removes the staging folder they write into.
            stop.set()
            for t in threads:
                t.join()
        if errors:
            raise errors[0]

    def file(self, name: str, rel: str, src_fd: int, dst_fd: int) -> None:
        label = f"{self.src}/{rel}"
        fd, st = open_source(name, dir_fd=src_fd)
        try:
            if self.encrypt:
                self._encrypt(fd, st, name, rel, label, dst_fd)
            else:
                self._decrypt(fd, st, name, rel, label, dst_fd)
        except OSError as exc:
            raise EncryptionError(f"{label}: {exc.strerror or exc}", path=label) from None
        finally:
            os.close(fd)
        self.progress.file_done()

    def _encrypt(
        self, fd: int, st: os.stat_result, name: str, rel: str, label: str, dst_fd: int
    ) -> None:
        header, cipher = start_encryption(
            self.keys, self.key_id, name=os.fsencode(rel), segment_size=self.segment_size
        )
        # An unnamed file linked once complete, like the plaintext below: O_TMPFILE inodes
        # are allocated without the folder's lock, so the workers create files in parallel.
        out = UnnamedFile(dst_fd, name)
        try:
            encrypt_fd(
                cipher,
                header,
                fd,
                st.st_size,
                out.fd,
                label=label,
                threads=self.threads,
                writeback=False,
                progress=self.progress,
            )
            os.fchmod(out.fd, st.st_mode & _MODE_MASK)
            out.link(name)
        except BaseException:
            out.discard()
            raise
        out.close()

    def _decrypt(
        self, fd: int, st: os.stat_result, name: str, rel: str, label: str, dst_fd: int
    ) -> None:
        header = read_header(lambda n: os.read(fd, n), label=label)
        cipher = start_decryption(self.keys, header, label=label, expected_name=os.fsencode(rel))
        lay = decrypt_layout(header, st.st_size, label=label)
        # Plaintext goes to an unnamed file and is linked into the staging folder only once
        # every segment authenticated.
        out = UnnamedFile(dst_fd, name)
        try:
            decrypt_fd(
                cipher,
                lay,
                fd,
                st.st_size,
                out.fd,
                label=label,
                threads=self.threads,
                writeback=False,
                progress=self.progress,
            )
            os.fchmod(out.fd, st.st_mode & _MODE_MASK)
            out.link(name)
        except BaseException:
            out.discard()
            raise
        out.close()


def _run_tree(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    encrypt: bool,
    keys: KeySource | KeyCache,
    key_id: str,
    force: bool,
    fsync: bool,
    segment_size: int,
    threads: int,
    progress: Progress,
    on_skip: SkipHandler | None,
    on_scanned: Callable[[TreeResult], None] | None,
) -> TreeResult:
    shown = os.fsdecode(src)
    try:
        src_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise EncryptionError(
            f"cannot open the folder {shown}: {exc.strerror}", path=shown
        ) from None
    try:
        _refuse_nested(shown, os.fsdecode(dst))
        cache = keys if isinstance(keys, KeyCache) else KeyCache(keys)
        if encrypt:
            cache.get(key_id, None)  # a missing key fails before anything is read or created
        with destination(dst, force=force) as dest:
            root_mode = stat.S_IMODE(os.fstat(src_fd).st_mode) & _MODE_MASK
            root = _Dir("", "", root_mode)
            result = TreeResult()
            try:
                _scan(src_fd, root, result, on_skip or _ignore_skip)
            except OSError as exc:
                raise EncryptionError(
                    f"cannot read the folder tree {shown}: {exc.strerror} ({exc.filename})",
                    path=shown,
                ) from None
            except RecursionError:
                raise EncryptionError(
                    f"{shown} is nested too deeply to mirror", path=shown
                ) from None
            result.files = sum(1 for _ in _walk_files(root))
            result.folders = sum(1 for _ in _walk_dirs(root))
            if on_scanned is not None:
                on_scanned(result)
            staging = temp_name(dest.name, "staging")
            os.mkdir(staging, 0o700, dir_fd=dest.parent_fd)
            try:
                staging_fd = os.open(staging, _DIR_FLAGS, dir_fd=dest.parent_fd)
                try:
                    job = _TreeRun(shown, encrypt, cache, key_id, segment_size, threads, progress)
                    job.run(root, src_fd, staging_fd)
                    # Folder modes last (deepest first): a read-only folder must not stop
                    # the files that go into it.
                    for rel, mode in reversed(job.dir_modes):
                        os.chmod(rel, mode, dir_fd=staging_fd)
                    os.fchmod(staging_fd, root_mode)
                    if fsync:
                        _linux.syncfs(staging_fd)
                finally:
                    os.close(staging_fd)
                publish(dest.parent_fd, staging, dest.name, replace=dest.exists)
            except BaseException:
                with contextlib.suppress(OSError):
                    remove_entry(dest.parent_fd, staging)
                raise
            if fsync:
                os.fsync(dest.parent_fd)
        return result
    finally:
        os.close(src_fd)


def _walk_files(node: _Dir):  # type: ignore[no-untyped-def]
    yield from node.files
    for child in node.dirs:
        yield from _walk_files(child)


def _walk_dirs(node: _Dir):  # type: ignore[no-untyped-def]
    for child in node.dirs:
        yield child
        yield from _walk_dirs(child)


def _refuse_nested(src: str, dst: str) -> None:
    a = os.path.realpath(src)
    b = os.path.realpath(dst)
    if a == b or b.startswith(a.rstrip("/") + "/") or a.startswith(b.rstrip("/") + "/"):
        raise EncryptionError(
            f"{dst} and {src} overlap (one is inside the other); choose a destination outside "
            "the source",
            path=dst,
        )


def encrypt_tree(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    keys: KeySource | KeyCache,
    key_id: str = "default",
    *,
    force: bool = False,
    fsync: bool = True,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    threads: int = DEFAULT_THREADS,
    progress: Progress = NO_PROGRESS,
    on_skip: SkipHandler | None = None,
    on_scanned: Callable[[TreeResult], None] | None = None,
) -> TreeResult:
    """Encrypt the folder `src` into the new folder `dst`, mirroring paths, folders and modes.

    Each file is bound to its relative path. `on_skip(path, reason)` hears of each symlink or
    special file left out; `on_scanned(result)` gets the totals before any work starts.
    """
    return _run_tree(
        src,
        dst,
        encrypt=True,
        keys=keys,
        key_id=key_id,
        force=force,
        fsync=fsync,
        segment_size=segment_size,
        threads=threads,
        progress=progress,
        on_skip=on_skip,
        on_scanned=on_scanned,
    )


def decrypt_tree(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    keys: KeySource | KeyCache,
    *,
    force: bool = False,
    fsync: bool = True,
    threads: int = DEFAULT_THREADS,
    progress: Progress = NO_PROGRESS,
    on_skip: SkipHandler | None = None,
    on_scanned: Callable[[TreeResult], None] | None = None,
) -> TreeResult:
    """Decrypt the folder `src` into the new folder `dst`, with the key each header names.

    Any file that fails (tampered, wrong key, moved within the tree) stops the run: `dst` is
    not created and no plaintext is left behind.
    """
    return _run_tree(
        src,
        dst,
        encrypt=False,
        keys=keys,
        key_id="default",
        force=force,
        fsync=fsync,
        segment_size=DEFAULT_SEGMENT_SIZE,
        threads=threads,
        progress=progress,
        on_skip=on_skip,
        on_scanned=on_scanned,
    )
