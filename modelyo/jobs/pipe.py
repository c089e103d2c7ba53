"""An in-process pipe between a producer thread and a consumer, so a stream (a bundle, a
Parquet file being encrypted) is never held whole in memory.

    produced, consumed = through_pipe(
        lambda sink: write_dataframe(df, sink),               # in a thread
        lambda source: encrypt_stream(source, out, keys, key_id),  # here
    )

A bounded queue of byte chunks, not an OS pipe: no file descriptors to leak or close under a
blocked reader, and the side that failed first is known. When one side fails, the other is
stopped at once (its next read or write raises BrokenPipeError) rather than seeing a
cut-short stream as a normal end, and the first failure is the one raised: the other side's
error is only its consequence.
"""

from __future__ import annotations

import io
import queue
import threading
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

T = TypeVar("T")
U = TypeVar("U")

CHUNK = 1 << 20  # writes are coalesced into, and split to, chunks of at most this size
DEPTH = 8  # chunks in flight: memory stays near DEPTH * CHUNK whatever the stream's size
_WAIT = 0.1  # how often a blocked side looks whether the other one stopped

_EOF = object()


class _Pipe:
    """The queue and the stop flag both sides share."""

    def __init__(self, depth: int) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self.stopped_by = ""  # the side that stopped first: "producer" or "consumer"
        self._pending = memoryview(b"")
        self._eof = False

    def stop(self, side: str) -> None:
        """Stop both sides: a blocked or later put/readinto raises BrokenPipeError."""
        with self._lock:
            self.stopped_by = self.stopped_by or side
        self._stopped.set()

    def _broken(self) -> BrokenPipeError:
        other = "consumer" if self.stopped_by == "consumer" else "producer"
        return BrokenPipeError(f"the other end of the pipe (the {other}) stopped")

    def check(self) -> None:
        if self._stopped.is_set():
            raise self._broken()

    def put(self, item: object) -> None:
        while True:
            self.check()
            try:
                self._queue.put(item, timeout=_WAIT)
                return
            except queue.Full:
                continue

    def readinto(self, view: memoryview) -> int:
        while not self._pending:
            if self._eof:
                return 0
            self.check()
            try:
                item = self._queue.get(timeout=_WAIT)
            except queue.Empty:
                continue
            if item is _EOF:
                self._eof = True
                return 0
            self._pending = memoryview(item)  # type: ignore[arg-type]
        n = min(len(view), len(self._pending))
        view[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


class _Writer(io.RawIOBase):
    def __init__(self, pipe: _Pipe) -> None:
        self._pipe = pipe

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        # Copied (the caller may reuse its buffer once we return), one chunk at a time.
        for start in range(0, len(view), CHUNK):
            self._pipe.put(bytes(view[start : start + CHUNK]))
        return len(view)


class _Reader(io.RawIOBase):
    def __init__(self, pipe: _Pipe) -> None:
        self._pipe = pipe

    def readable(self) -> bool:
        return True

    def readinto(self, view: Any) -> int:
        return self._pipe.readinto(memoryview(view).cast("B"))


class PipeSink(io.BufferedWriter):
    """The producer's end of the pipe: a buffered binary writer."""

    def __init__(self, pipe: _Pipe) -> None:
        super().__init__(_Writer(pipe), buffer_size=CHUNK)
        self._pipe = pipe

    def check(self) -> None:
        """Raise BrokenPipeError if the consumer stopped: for a producer busy with work that
        does not write (encoding into memory first), so it stops early too."""
        self._pipe.check()

    def end(self) -> None:
        """Flush, then mark the end of the stream."""
        self.flush()
        self._pipe.put(_EOF)


def through_pipe(
    produce: Callable[[PipeSink], T],
    consume: Callable[[BinaryIO], U],
    *,
    depth: int = DEPTH,
) -> tuple[T, U]:
    """Run `produce(sink)` in a thread and `consume(source)` here, connected by a pipe;
    return both results.

    The end of `produce` is the end of the stream; what `consume` leaves unread is drained.
    The first side to fail stops the other, and its exception is raised (the other side's,
    a consequence, is dropped); KeyboardInterrupt here stops the producer before it
    propagates. The producer's thread has ended when this returns or raises.
    """
    pipe = _Pipe(depth)
    sink = PipeSink(pipe)
    source = io.BufferedReader(_Reader(pipe), buffer_size=CHUNK)
    produced: list[T] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            produced.append(produce(sink))
            sink.end()
        except BaseException as exc:  # handed to the calling thread below
            failed.append(exc)
            pipe.stop("producer")

    thread = threading.Thread(target=run, name="modelyo-pipe", daemon=True)
    thread.start()
    try:
        consumed = consume(source)  # type: ignore[arg-type]
        while source.read(CHUNK):  # drain, so the producer can finish
            pass
        thread.join()
    except BaseException:
        pipe.stop("consumer")
        thread.join()
        if failed and pipe.stopped_by == "producer":
            raise failed[0] from None
        raise
    if failed:
        raise failed[0]
    return produced[0], consumed
