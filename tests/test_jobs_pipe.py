"""The in-process pipe between a producer thread and a consumer (modelyo.jobs.pipe)."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from modelyo.jobs.pipe import through_pipe


def test_a_large_stream_arrives_intact_in_order():
    data = os.urandom(5 << 20)

    def produce(sink):
        for start in range(0, len(data), 12_345):
            sink.write(data[start : start + 12_345])
        return "done"

    produced, digest = through_pipe(produce, lambda src: hashlib.sha256(src.read()).digest())
    assert (produced, digest) == ("done", hashlib.sha256(data).digest())


def test_what_the_consumer_leaves_unread_is_drained():
    produced, head = through_pipe(lambda sink: sink.write(b"x" * (20 << 20)), lambda s: s.read(4))
    assert (produced, head) == (20 << 20, b"xxxx")


def test_the_producers_failure_wins_and_the_consumer_never_sees_a_normal_end():
    seen: list[str] = []

    def consume(source):
        try:
            source.read()
        except BrokenPipeError:
            seen.append("broken")
            raise RuntimeError("a consequence") from None
        seen.append("eof")  # a cut-short stream taken as complete: must not happen

    def produce(sink):
        sink.write(b"x" * (3 << 20))
        raise ValueError("the producer failed")

    with pytest.raises(ValueError, match="the producer failed"):
        through_pipe(produce, consume)
    assert seen == ["broken"]


def test_the_consumers_failure_wins_and_stops_the_producer():
    stopped = threading.Event()

    def produce(sink):
        try:
            while True:
                sink.write(b"x" * 65536)
        except BrokenPipeError:
            stopped.set()
            raise OSError("a consequence") from None

    def consume(source):
        source.read(1 << 20)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        through_pipe(produce, consume)
    assert stopped.is_set()


def test_an_interrupt_in_the_consumer_stops_the_producer_and_propagates():
    ended = threading.Event()

    def produce(sink):
        try:
            while True:
                sink.write(b"x" * 65536)
        finally:
            ended.set()

    def consume(source):
        source.read(1 << 20)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        through_pipe(produce, consume)
    assert ended.is_set()


def test_a_producer_busy_without_writing_can_see_that_the_consumer_stopped():
    checked = threading.Event()

    def produce(sink):
        while True:  # e.g. encoding a large input into memory before writing it
            try:
                sink.check()
            except BrokenPipeError:
                checked.set()
                raise

    def consume(source):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        through_pipe(produce, consume)
    assert checked.is_set()
