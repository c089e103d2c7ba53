"""Connect a writer and a reader through an OS pipe, so a bundle is never held whole twice."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import BinaryIO, TypeVar

T = TypeVar("T")
U = TypeVar("U")


def through_pipe(produce: Callable[[BinaryIO], T], consume: Callable[[BinaryIO], U]) -> tuple[T, U]:
    """Run `produce(writer)` in a thread and `consume(reader)` here, over one pipe.

    The producer's exception wins (the consumer then saw a cut-short stream, which must not be
    used); otherwise the consumer's exception propagates.
    """
    read_fd, write_fd = os.pipe()
    reader = os.fdopen(read_fd, "rb")
    produced: list[T] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            with os.fdopen(write_fd, "wb") as writer:
                produced.append(produce(writer))
        except BrokenPipeError:
            pass  # the consumer stopped reading: its own error says why
        except BaseException as exc:  # handed to the calling thread below
            failed.append(exc)

    thread = threading.Thread(target=run, name="modelyo-pipe", daemon=True)
    thread.start()
    try:
        with reader:
            consumed = consume(reader)
            # Drain whatever the consumer did not read, so the producer can finish.
            while reader.read(1 << 16):
                pass
    except BaseException:
        thread.join()
        if failed:
            raise failed[0] from None
        raise
    thread.join()
    if failed:
        raise failed[0]
    return produced[0], consumed
