"""Log frames (modelyo.api.logframes): the agent's framing of stdout and stderr, and the
jobs' byte-progress throttle. Pure: no stack, no Docker."""

from __future__ import annotations

import pytest

from modelyo.api.logframes import (
    HEADER,
    MAX_FRAME,
    FrameDecoder,
    FrameError,
    decode_frames,
    encode_frame,
)
from modelyo.jobs.client import TRANSFER_INTERVAL, _Transfer

PAIRS = [
    ("stdout", b"line 1\n"),
    ("stderr", b"Traceback (most recent call last):\n"),
    ("stdout", "é and 字\n".encode()),
    ("stderr", b"x" * 5000),
]


def _stream(pairs: list[tuple[str, bytes]]) -> bytes:
    return b"".join(encode_frame(stream, data) for stream, data in pairs)


def test_a_frame_is_docker_s_layout():
    assert encode_frame("stdout", b"hi") == b"\x01\0\0\0\0\0\0\x02hi"
    assert encode_frame("stderr", b"oops\n") == b"\x02\0\0\0\0\0\0\x05oops\n"
    assert encode_frame("stdout", b"") == b""  # no empty frames


def test_frames_round_trip_in_order():
    assert list(decode_frames([_stream(PAIRS)])) == PAIRS


@pytest.mark.parametrize("size", [1, 3, 7, 8, 9, 13, 4096])
def test_frames_split_across_chunks_at_any_place(size):
    data = _stream(PAIRS)
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    assert list(decode_frames(chunks)) == PAIRS


def test_a_decoder_hands_out_only_whole_frames():
    data = _stream(PAIRS[:2])
    decoder = FrameDecoder()
    cut = HEADER.size + len(PAIRS[0][1]) + 3  # the first frame and 3 bytes of the next header
    assert decoder.feed(data[:cut]) == [PAIRS[0]]
    assert decoder.feed(data[cut:-1]) == []
    assert decoder.feed(data[-1:]) == [PAIRS[1]]
    decoder.close()


def test_long_data_is_split_into_frames_of_at_most_max_frame():
    data = bytes(range(256)) * (MAX_FRAME // 128 + 1)
    pairs = list(decode_frames([encode_frame("stdout", data)]))
    assert [len(d) for _, d in pairs] == [MAX_FRAME, MAX_FRAME, len(data) - 2 * MAX_FRAME]
    assert b"".join(d for _, d in pairs) == data


@pytest.mark.parametrize("cut", [1, HEADER.size - 1, HEADER.size, HEADER.size + 2])
def test_a_truncated_final_frame_is_refused(cut):
    data = _stream(PAIRS[:1]) + encode_frame("stderr", b"the end\n")[:cut]
    got = []
    with pytest.raises(FrameError, match=r"cut off inside a frame .* read the logs again"):
        for pair in decode_frames([data]):
            got.append(pair)
    assert got == PAIRS[:1]  # what came whole was handed out first


@pytest.mark.parametrize(
    "data",
    [
        b"plain output from an older agent\n",
        b"\x03\0\0\0\0\0\0\x01x",  # no such stream
        b"\x01\0\x01\0\0\0\0\x01x",  # padding not zero
        b"\x01\0\0\0\0\0\0\0",  # empty frame
        b"\x01\0\0\0\xff\xff\xff\xff",  # longer than MAX_FRAME
    ],
)
def test_what_is_not_frames_is_refused(data):
    with pytest.raises(FrameError, match=r"not in frames .* without separating the streams"):
        list(decode_frames([data]))


def test_an_unknown_stream_cannot_be_encoded():
    with pytest.raises(ValueError, match="unknown stream 'stdin'"):
        encode_frame("stdin", b"x")


class _Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_transfers_are_throttled_and_end_with_the_total():
    seen: list[tuple[str, int, int | None]] = []

    class Events:
        def transfer(self, phase: str, done: int, total: int | None) -> None:
            seen.append((phase, done, total))

    clock = _Clock()
    progress = _Transfer(Events(), "uploading", 1000, clock=clock)  # type: ignore[arg-type]
    for _ in range(10):
        progress.add(100)
        clock.now += TRANSFER_INTERVAL / 4
    progress.finish()
    progress.finish()  # nothing new: no second report
    done = [done for _, done, _ in seen]
    # 10 additions over 2.5 intervals: the first, about one an interval, and the end.
    assert done[0] == 100 and done[-1] == 1000 and 3 <= len(done) <= 4
    assert done == sorted(set(done))
    assert all(phase == "uploading" and total == 1000 for phase, _, total in seen)


def test_events_without_transfer_are_fine():
    class Events:
        def phase(self, phase: str, detail: str = "") -> None:
            pass

    progress = _Transfer(Events(), "collecting")  # type: ignore[arg-type]
    assert b"".join(progress.counted([b"ab", b"c"])) == b"abc" and progress.done == 3
