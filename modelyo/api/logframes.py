"""Log frames: a container's stdout and stderr in one byte stream, apart and in order.

`GET /v1/containers/{name}/logs?streams=framed` answers with a sequence of frames (the
default, `streams=merged`, is the bare output with both streams mixed). Each frame is

    offset  size  field
    0       1     stream: 1 stdout, 2 stderr
    1       3     zero
    4       4     length of the data, unsigned big-endian, 1..MAX_FRAME
    8       len   data (bytes as the container wrote them; not necessarily whole lines or
                  whole UTF-8 characters)

This is the layout of the Docker engine's own multiplexed stream, kept on purpose (well
known, easy to read with any tool), with stricter rules: only streams 1 and 2, zero padding,
no empty frames and at most MAX_FRAME data bytes per frame. The body ends after the last
frame; a body that ends inside a frame was cut off, and the reader says so.

Pure: `encode_frame` on the agent, `FrameDecoder` (chunks in any sizes) or `decode_frames`
on the client.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

from modelyo.errors import ModelyoError

STDOUT = "stdout"
STDERR = "stderr"
STREAM_CODES = {STDOUT: 1, STDERR: 2}
STREAM_NAMES = {code: name for name, code in STREAM_CODES.items()}
HEADER = struct.Struct(">B3sL")
MAX_FRAME = 1 << 20  # longer data is split into several frames
MEDIA_TYPE = "application/vnd.modelyo.log-frames"
_PAD = b"\0\0\0"


class FrameError(ModelyoError):
    """A log-frame stream that breaks the rules above (cut off, or not frames at all)."""


def encode_frame(stream: str, data: bytes) -> bytes:
    """`data` of `stream` ("stdout" or "stderr") as frames (none when `data` is empty)."""
    try:
        code = STREAM_CODES[stream]
    except KeyError:
        raise ValueError(f"unknown stream {stream!r}: use 'stdout' or 'stderr'") from None
    view = memoryview(data)
    parts = []
    for start in range(0, len(view), MAX_FRAME):
        piece = view[start : start + MAX_FRAME]
        parts += [HEADER.pack(code, _PAD, len(piece)), piece]
    return b"".join(parts)


class FrameDecoder:
    """Turns chunks of a framed stream, cut anywhere, into (stream, data) pairs."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> list[tuple[str, bytes]]:
        """The frames `chunk` completes, in order; a partial frame waits for the next chunk."""
        self._buffer += chunk
        frames: list[tuple[str, bytes]] = []
        offset = 0
        buffer = self._buffer
        while len(buffer) - offset >= HEADER.size:
            code, pad, length = HEADER.unpack_from(buffer, offset)
            if code not in STREAM_NAMES or pad != _PAD or not 0 < length <= MAX_FRAME:
                header = bytes(buffer[offset : offset + HEADER.size])
                raise FrameError(
                    f"the log stream is not in frames (header {header!r} at byte {offset}); is "
                    "the agent older than this tool? Update it, or read the logs without "
                    "separating the streams"
                )
            end = offset + HEADER.size + length
            if len(buffer) < end:
                break
            frames.append((STREAM_NAMES[code], bytes(buffer[offset + HEADER.size : end])))
            offset = end
        del buffer[:offset]
        return frames

    def close(self) -> None:
        """The stream ended: refuse it if it ended inside a frame."""
        if self._buffer:
            left = len(self._buffer)
            self._buffer.clear()
            raise FrameError(
                f"the log stream was cut off inside a frame ({left} byte(s) of an unfinished "
                "frame); the connection to the agent broke, read the logs again"
            )


def decode_frames(chunks: Iterable[bytes]) -> Iterator[tuple[str, bytes]]:
    """(stream, data) pairs from the chunks of a framed stream; `FrameError` if cut off."""
    decoder = FrameDecoder()
    for chunk in chunks:
        yield from decoder.feed(chunk)
    decoder.close()
