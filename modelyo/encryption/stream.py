"""Streaming encryption and decryption: byte strings, file objects and file descriptors.

Two engines share the format rules:

* a sequential one for streams (pipes, stdin/stdout, BytesIO): a reader thread fills reused
  buffers one segment ahead while the caller's thread seals or opens and writes;
* a parallel one for regular files: every segment's offsets follow from the file size, so
  worker threads each take every n-th segment and use pread/pwrite into their own reused
  buffers. `cryptography` >= 50 releases the GIL in AES-GCM and the os module in pread/pwrite,
  so the threads run on separate cores.

Memory is a few segments per thread whatever the file size.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import IO, Protocol

from cryptography.exceptions import InvalidTag

from modelyo.encryption import _linux
from modelyo.encryption._aead import SegmentCipher
from modelyo.encryption.format import (
    COMMITMENT_SIZE,
    DEFAULT_SEGMENT_SIZE,
    FIXED_SIZE,
    SALT_SIZE,
    TAG_SIZE,
    Header,
    HeaderError,
    Layout,
    layout,
    open_header,
    parse_fixed,
    parse_header,
    seal_header,
    segment_count,
)
from modelyo.encryption.keys import KeySource, ReleasedKey
from modelyo.errors import EncryptionError, KeyUnavailableError, TamperError, WrongKeyError

DEFAULT_THREADS = max(1, min(4, os.cpu_count() or 1))
_WRITEBACK_EVERY = 8  # segments between sync_file_range calls when the output will be fsynced


class Progress(Protocol):
    """Receives progress from worker threads (so implementations must be thread-safe)."""

    def advance(self, nbytes: int) -> None:
        """`nbytes` more source bytes were processed (plaintext when encrypting, ciphertext
        when decrypting, so totals are the sizes of the files being read)."""
        ...

    def file_done(self) -> None:
        """One more file was completed (trees only)."""
        ...


class NullProgress:
    """A Progress that ignores everything."""

    def advance(self, nbytes: int) -> None:
        """Ignore."""

    def file_done(self) -> None:
        """Ignore."""


NO_PROGRESS = NullProgress()


class KeyCache:
    """Wraps a KeySource so that a tree asks it once per (key id, version), not once per file."""

    def __init__(self, source: KeySource) -> None:
        self.source = source
        self._cache: dict[tuple[str, int | None], ReleasedKey] = {}
        self._lock = threading.Lock()

    def get(self, key_id: str, version: int | None) -> ReleasedKey:
        """The key for `key_id` at `version` (None: current), from the cache when possible."""
        with self._lock:
            found = self._cache.get((key_id, version))
        if found is None:
            found = self.source.key(key_id, version)
            if not isinstance(found, ReleasedKey):
                raise TypeError("a KeySource must return a ReleasedKey")
            with self._lock:
                self._cache[(key_id, version)] = found
                self._cache[(key_id, found.version)] = found
        return found


def _as_cache(keys: KeySource | KeyCache) -> KeyCache:
    return keys if isinstance(keys, KeyCache) else KeyCache(keys)


# --- Starting a file: header and cipher ---------------------------------------------------


def start_encryption(
    keys: KeySource | KeyCache,
    key_id: str,
    *,
    name: bytes = b"",
    segment_size: int = DEFAULT_SEGMENT_SIZE,
) -> tuple[Header, SegmentCipher]:
    """A fresh header (new random salt, current key version) and the cipher for its segments."""
    released = _as_cache(keys).get(key_id, None)
    draft = Header(
        key_id=key_id,
        key_version=released.version,
        salt=os.urandom(SALT_SIZE),
        segment_size=segment_size,
        name=name,
    )
    header, file_key = seal_header(released.key, draft)
    return header, SegmentCipher(file_key)


def start_decryption(
    keys: KeySource | KeyCache,
    header: Header,
    *,
    label: str,
    expected_name: bytes | None = None,
) -> SegmentCipher:
    """Check the released key against the header's commitment; return the segment cipher.

    Fails before any segment is read: `KeyUnavailableError` when the source has no key for the
    header's key id and version, `WrongKeyError` when the key does not match the commitment,
    `TamperError` when the file is bound to another name than `expected_name`.
    """
    try:
        released = _as_cache(keys).get(header.key_id, header.key_version)
    except KeyUnavailableError as exc:
        raise KeyUnavailableError(f"{label}: {exc}", path=label) from None
    if released.version != header.key_version:
        raise KeyUnavailableError(
            f"{label}: the key source returned version {released.version} of key "
            f"{header.key_id!r} when version {header.key_version} was asked for",
            path=label,
        )
    file_key = open_header(released.key, header)
    if file_key is None:
        raise WrongKeyError(
            f"{label}: the key {header.key_id!r} version {header.key_version} does not match "
            "this file's key commitment: it is the wrong key, or the file's header was "
            "altered; nothing was decrypted",
            path=label,
        )
    if expected_name is not None and header.name and header.name != expected_name:
        raise TamperError(
            f"{label}: this file was encrypted as {os.fsdecode(header.name)!r}, so it was "
            "moved or swapped in storage; nothing was decrypted (decrypt it on its own with "
            "`modelyo decrypt FILE OUT` if the rename was intended)",
            path=label,
        )
    return SegmentCipher(file_key)


def read_header(read: Callable[[int], bytes], *, label: str) -> Header:
    """Read and parse a header with `read(n)` (which may return fewer bytes only at EOF)."""
    fixed = _read_exact(read, FIXED_SIZE)
    try:
        key_id_len, name_len = parse_fixed(fixed)
        rest = _read_exact(read, key_id_len + name_len + COMMITMENT_SIZE)
        if len(rest) != key_id_len + name_len + COMMITMENT_SIZE:
            raise HeaderError("the header is truncated")
        return parse_header(fixed + rest)
    except HeaderError as exc:
        raise TamperError(f"{label}: {exc}", path=label) from None


def _read_exact(read: Callable[[int], bytes], n: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < n:
        chunk = read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _segment_failed(label: str, index: int, last: bool) -> TamperError:
    where = "final segment" if last else "segment"
    return TamperError(
        f"{label}: {where} {index} failed authentication: the file was altered, truncated, "
        "or its segments were reordered, duplicated or dropped; none of its plaintext was kept",
        path=label,
    )


# --- Sequential engine (streams) ----------------------------------------------------------


def _fill(readinto: Callable[[memoryview], int | None], buf: bytearray) -> int:
    """Read into `buf` until it is full or the stream ends; return the byte count."""
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        n = readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _chunks(
    readinto: Callable[[memoryview], int | None], size: int, *, background: bool
) -> Iterator[tuple[memoryview, bool]]:
    """Yield (chunk, is_last) for a stream cut into `size`-byte chunks (the last may be short,
    and is empty only for an empty stream). A chunk's buffer is reused once the consumer asks
    for the next one. With `background`, a thread reads one chunk ahead."""
    if not background:
        bufs = (bytearray(size), bytearray(size))
        cur = 0
        n = _fill(readinto, bufs[0])
        while True:
            nxt = 1 - cur
            m = _fill(readinto, bufs[nxt]) if n == size else 0
            yield memoryview(bufs[cur])[:n], m == 0
            if m == 0:
                return
            cur, n = nxt, m

    free: queue.Queue[bytearray | None] = queue.Queue()
    full: queue.Queue[tuple[bytearray, int] | BaseException] = queue.Queue()
    stop = threading.Event()
    for _ in range(4):
        free.put(bytearray(size))

    def reader() -> None:
        try:
            while True:
                buf = free.get()
                if buf is None or stop.is_set():
                    return
                got = _fill(readinto, buf)
                full.put((buf, got))
                if got < size:
                    return
        except BaseException as exc:
            full.put(exc)

    def take() -> tuple[bytearray, int]:
        item = full.get()
        if isinstance(item, BaseException):
            raise item
        return item

    # A daemon thread: if the consumer fails while the reader waits on a silent pipe, the
    # process must still be able to exit.
    thread = threading.Thread(target=reader, name="modelyo-read", daemon=True)
    thread.start()
    try:
        buf, n = take()
        while True:
            if n < size:
                yield memoryview(buf)[:n], True
                return
            nbuf, m = take()
            yield memoryview(buf)[:n], m == 0
            if m == 0:
                return
            free.put(buf)
            buf, n = nbuf, m
    finally:
        stop.set()
        free.put(None)


def _write_all(write: Callable[[memoryview], int | None], data: memoryview) -> None:
    while data:
        n = write(data[:_WRITE_CHUNK])
        if n is None:  # a file-like object that returns nothing wrote everything
            n = min(len(data), _WRITE_CHUNK)
        data = data[n:]


def seal_sequential(
    cipher: SegmentCipher,
    segment_size: int,
    readinto: Callable[[memoryview], int | None],
    write: Callable[[memoryview], int | None],
    *,
    background: bool = True,
    progress: Progress = NO_PROGRESS,
) -> int:
    """Encrypt a stream segment by segment; return the plaintext length."""
    out = bytearray(segment_size + TAG_SIZE)
    outv = memoryview(out)
    total = 0
    for index, (chunk, last) in enumerate(_chunks(readinto, segment_size, background=background)):
        n = len(chunk)
        cipher.seal_into(index, last, chunk, outv[: n + TAG_SIZE])
        _write_all(write, outv[: n + TAG_SIZE])
        total += n
        progress.advance(n)
    return total


def open_sequential(
    cipher: SegmentCipher,
    segment_size: int,
    readinto: Callable[[memoryview], int | None],
    write: Callable[[memoryview], int | None],
    *,
    label: str,
    background: bool = True,
    progress: Progress = NO_PROGRESS,
) -> int:
    """Decrypt a stream's segments (after its header); write each only once authenticated."""
    out = bytearray(segment_size)
    outv = memoryview(out)
    total = 0
    stride = segment_size + TAG_SIZE
    for index, (chunk, last) in enumerate(_chunks(readinto, stride, background=background)):
        n = len(chunk)
        if n < TAG_SIZE:
            raise TamperError(
                f"{label}: it is truncated "
                + ("after its header" if index == 0 and n == 0 else f"inside segment {index}")
                + "; none of its plaintext was kept",
                path=label,
            )
        if n == TAG_SIZE and index > 0:
            raise TamperError(
                f"{label}: its final segment is empty, which no writer produces", path=label
            )
        try:
            cipher.open_into(index, last, chunk, outv[: n - TAG_SIZE])
        except InvalidTag:
            raise _segment_failed(label, index, last) from None
        _write_all(write, outv[: n - TAG_SIZE])
        total += n - TAG_SIZE
        progress.advance(n)
    return total


# --- Parallel engine (regular files) ------------------------------------------------------


def _pread_full(fd: int, buf: memoryview, offset: int) -> int:
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


# Page-aligned writes are cut to 512 KiB: on Linux 6.x a 1 MiB page-aligned buffered write
# gets 1 MiB page-cache folios, and allocating those made every other 1 GiB decryption take
# twice the system time here (0.45 s instead of 0.2 s), while 512 KiB writes took 0.2 s every
# time. Unaligned writes (encryption's segments start at odd offsets) were steady whole, and
# slower when cut, so they are left whole.
_WRITE_CHUNK = 512 << 10


def _pwrite_full(fd: int, data: memoryview, offset: int) -> None:
    while data:
        piece = data if offset % _WRITE_CHUNK else data[:_WRITE_CHUNK]
        n = os.pwrite(fd, piece, offset)
        data = data[n:]
        offset += n


def _read_ahead(fd: int) -> None:
    # The workers' preads interleave but move forward together: tell the kernel to read
    # ahead aggressively, which matters when the input is not in the page cache.
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)


def _run_workers(count: int, work: Callable[[int, threading.Event], None]) -> None:
    """Run work(worker index, stop event) on `count` threads (inline for one); re-raise the
    first failure after every thread has stopped."""
    stop = threading.Event()
    if count == 1:
        work(0, stop)
        return
    errors: list[BaseException] = []

    def run(worker: int) -> None:
        try:
            work(worker, stop)
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [
        threading.Thread(target=run, args=(w,), name=f"modelyo-crypt-{w}") for w in range(count)
    ]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except BaseException:
        # Ctrl-C (or SIGTERM turned into an exception) lands here: stop the workers before
        # the caller closes and discards the descriptors they write to.
        stop.set()
        for t in threads:
            t.join()
        raise
    if errors:
        raise errors[0]


def seal_fd(
    cipher: SegmentCipher,
    header: bytes,
    segment_size: int,
    src_fd: int,
    src_size: int,
    dst_fd: int,
    *,
    label: str,
    threads: int = DEFAULT_THREADS,
    writeback: bool = False,
    progress: Progress = NO_PROGRESS,
) -> None:
    """Encrypt the regular file `src_fd` (`src_size` bytes) into `dst_fd` from offset 0."""
    segments = segment_count(src_size, segment_size)
    stride = segment_size + TAG_SIZE
    base = len(header)
    _read_ahead(src_fd)
    _pwrite_full(dst_fd, memoryview(header), 0)

    def work(worker: int, stop: threading.Event) -> None:
        buf = memoryview(bytearray(segment_size))
        out = memoryview(bytearray(stride))
        for index in range(worker, segments, workers):
            if stop.is_set():
                return
            last = index == segments - 1
            n = src_size - index * segment_size if last else segment_size
            if _pread_full(src_fd, buf[:n], index * segment_size) != n:
                raise _changed(label)
            cipher.seal_into(index, last, buf[:n], out[: n + TAG_SIZE])
            _pwrite_full(dst_fd, out[: n + TAG_SIZE], base + index * stride)
            progress.advance(n)
            if writeback and index % _WRITEBACK_EVERY == _WRITEBACK_EVERY - 1:
                start = max(0, index - 2 * _WRITEBACK_EVERY + 1)
                _linux.start_writeback(dst_fd, base + start * stride, _WRITEBACK_EVERY * stride)

    workers = max(1, min(threads, segments // 2))
    _run_workers(workers, work)
    # A file that grew while it was read would be silently cut short: refuse instead.
    if os.fstat(src_fd).st_size != src_size or os.pread(src_fd, 1, src_size):
        raise _changed(label)


def _changed(label: str) -> EncryptionError:
    return EncryptionError(
        f"{label} changed size while it was being read; nothing was written, run again once "
        "it is no longer being written to",
        path=label,
    )


def open_fd(
    cipher: SegmentCipher,
    lay: Layout,
    src_fd: int,
    src_size: int,
    dst_fd: int,
    *,
    label: str,
    threads: int = DEFAULT_THREADS,
    writeback: bool = False,
    progress: Progress = NO_PROGRESS,
) -> None:
    """Decrypt the segments of the regular file `src_fd` (laid out as `lay`) into `dst_fd`.

    Later segments may be written before earlier ones are checked, so `dst_fd` must be a file
    no one can see (O_TMPFILE, or a private temporary) that is discarded on any failure.
    """
    seg = lay.segment_size
    stride = seg + TAG_SIZE
    segments = lay.segments
    _read_ahead(src_fd)

    def work(worker: int, stop: threading.Event) -> None:
        buf = memoryview(bytearray(stride))
        out = memoryview(bytearray(seg))
        for index in range(worker, segments, workers):
            if stop.is_set():
                return
            last = index == segments - 1
            n = lay.last_plaintext if last else seg
            if _pread_full(src_fd, buf[: n + TAG_SIZE], lay.header_size + index * stride) != (
                n + TAG_SIZE
            ):
                raise _segment_failed(label, index, last)
            try:
                cipher.open_into(index, last, buf[: n + TAG_SIZE], out[:n])
            except InvalidTag:
                raise _segment_failed(label, index, last) from None
            _pwrite_full(dst_fd, out[:n], index * seg)
            progress.advance(n + TAG_SIZE)
            if writeback and index % _WRITEBACK_EVERY == _WRITEBACK_EVERY - 1:
                start = max(0, index - 2 * _WRITEBACK_EVERY + 1)
                _linux.start_writeback(dst_fd, start * seg, _WRITEBACK_EVERY * seg)

    workers = max(1, min(threads, segments // 2))
    _run_workers(workers, work)
    if os.fstat(src_fd).st_size != src_size:
        raise TamperError(
            f"{label} changed size while it was being decrypted; none of its plaintext was kept",
            path=label,
        )


def decrypt_layout(header: Header, total_size: int, *, label: str) -> Layout:
    """The segment layout of a ciphertext file of `total_size` bytes, or a TamperError."""
    try:
        return layout(total_size, header.size, header.segment_size)
    except ValueError as exc:
        raise TamperError(f"{label}: {exc}; none of its plaintext was kept", path=label) from None


# --- Public stream and bytes API ----------------------------------------------------------


def _readinto_of(stream: IO[bytes]) -> Callable[[memoryview], int | None]:
    readinto = getattr(stream, "readinto", None)
    if readinto is not None:
        return readinto

    def fallback(view: memoryview) -> int:
        data = stream.read(len(view))
        view[: len(data)] = data
        return len(data)

    return fallback


def encrypt_stream(
    src: IO[bytes],
    dst: IO[bytes],
    keys: KeySource,
    key_id: str = "default",
    *,
    name: bytes = b"",
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    progress: Progress = NO_PROGRESS,
) -> Header:
    """Encrypt everything `src` yields into `dst` under the current version of `key_id`.

    `name`, if given, is bound into the header (tree decryption checks it). Returns the header.
    """
    header, cipher = start_encryption(keys, key_id, name=name, segment_size=segment_size)
    encoded = header.encode()
    _write_all(dst.write, memoryview(encoded))
    seal_sequential(cipher, segment_size, _readinto_of(src), dst.write, progress=progress)
    dst.flush()
    return header


def decrypt_stream(
    src: IO[bytes],
    dst: IO[bytes],
    keys: KeySource,
    *,
    label: str = "<stream>",
    expected_name: bytes | None = None,
    progress: Progress = NO_PROGRESS,
) -> Header:
    """Decrypt `src` into `dst`, asking `keys` for the key id and version in its header.

    Each segment is written only after it authenticated, but a stream cannot take back what it
    already wrote: on TamperError the caller must discard `dst` (the file functions do).
    """
    header = read_header(src.read, label=label)
    cipher = start_decryption(keys, header, label=label, expected_name=expected_name)
    open_sequential(
        cipher, header.segment_size, _readinto_of(src), dst.write, label=label, progress=progress
    )
    dst.flush()
    return header


def encrypt_bytes(
    plaintext: bytes,
    keys: KeySource,
    key_id: str = "default",
    *,
    name: bytes = b"",
    segment_size: int = DEFAULT_SEGMENT_SIZE,
) -> bytes:
    """Encrypt a byte string (same format as files)."""
    released = _as_cache(keys).get(key_id, None)
    draft = Header(
        key_id=key_id,
        key_version=released.version,
        salt=os.urandom(SALT_SIZE),
        segment_size=segment_size,
        name=name,
    )
    return seal_bytes_with(released.key, draft, plaintext)


def seal_bytes_with(key: bytes, draft: Header, plaintext: bytes) -> bytes:
    """Encrypt `plaintext` under `draft` (whose salt the caller chose) and the released `key`.

    Only for test vectors and `encrypt_bytes`: a caller-chosen salt must never repeat.
    """
    header, file_key = seal_header(key, draft)
    cipher = SegmentCipher(file_key)
    view = memoryview(plaintext)
    seg = header.segment_size
    segments = segment_count(len(view), seg)
    parts = [header.encode()]
    for index in range(segments):
        parts.append(
            cipher.seal(index, index == segments - 1, view[index * seg : (index + 1) * seg])
        )
    return b"".join(parts)


def decrypt_bytes(
    ciphertext: bytes,
    keys: KeySource,
    *,
    label: str = "<bytes>",
    expected_name: bytes | None = None,
) -> bytes:
    """Decrypt a byte string; raises TamperError/WrongKeyError if it is not genuine."""
    view = memoryview(ciphertext)
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        chunk = bytes(view[pos : pos + n])
        pos += len(chunk)
        return chunk

    header = read_header(read, label=label)
    cipher = start_decryption(keys, header, label=label, expected_name=expected_name)
    lay = decrypt_layout(header, len(view), label=label)
    stride = lay.segment_size + TAG_SIZE
    parts = []
    for index in range(lay.segments):
        last = index == lay.segments - 1
        start = lay.header_size + index * stride
        try:
            parts.append(cipher.open(index, last, view[start : start + stride]))
        except InvalidTag:
            raise _segment_failed(label, index, last) from None
    return b"".join(parts)
