"""Bytes, streams and single files: round trips, every tamper class, keys, memory."""

from __future__ import annotations

import io
import os
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelyo.encryption import (
    ReleasedKey,
    StaticKeySource,
    decrypt_bytes,
    decrypt_file,
    decrypt_stream,
    encrypt_bytes,
    encrypt_file,
    encrypt_stream,
    read_header,
)
from modelyo.encryption.format import TAG_SIZE
from modelyo.errors import EncryptionError, KeyUnavailableError, TamperError, WrongKeyError

KEY = bytes(range(32))
KEYS = StaticKeySource.single(KEY)
SEG = 16  # tiny segments make multi-segment files of a few bytes


def _segments(ct: bytes, seg: int = SEG) -> tuple[bytes, list[bytes]]:
    size = read_header(io.BytesIO(ct).read, label="x").size
    body = ct[size:]
    stride = seg + TAG_SIZE
    return ct[:size], [body[i : i + stride] for i in range(0, len(body), stride)]


@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 5 * SEG + 3, 6 * SEG])
def test_round_trip_bytes_and_streams(size: int) -> None:
    pt = os.urandom(size)
    ct = encrypt_bytes(pt, KEYS, segment_size=SEG)
    segments = max(1, -(-size // SEG))
    assert len(ct) == read_header(io.BytesIO(ct).read, label="x").size + size + 16 * segments
    assert decrypt_bytes(ct, KEYS) == pt
    out = io.BytesIO()
    decrypt_stream(io.BytesIO(ct), out, KEYS)
    assert out.getvalue() == pt
    enc = io.BytesIO()
    encrypt_stream(io.BytesIO(pt), enc, KEYS, segment_size=SEG)
    assert decrypt_bytes(enc.getvalue(), KEYS) == pt
    assert enc.getvalue() != ct  # a fresh salt every time


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1025, 10 * 1024 + 7])
def test_round_trip_files(tmp_path: Path, size: int, threads: int) -> None:
    src = tmp_path / "plain"
    src.write_bytes(os.urandom(size))
    src.chmod(0o640)
    encrypt_file(src, tmp_path / "enc", KEYS, segment_size=1024, threads=threads)
    assert (tmp_path / "enc").stat().st_mode & 0o777 == 0o640
    # The file engine and the bytes engine write the same format.
    assert decrypt_bytes((tmp_path / "enc").read_bytes(), KEYS) == src.read_bytes()
    decrypt_file(tmp_path / "enc", tmp_path / "dec", KEYS, threads=threads)
    assert (tmp_path / "dec").read_bytes() == src.read_bytes()
    assert (tmp_path / "dec").stat().st_mode & 0o777 == 0o640


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=3000), seg=st.integers(16, 700))
def test_round_trip_random_sizes(data: bytes, seg: int) -> None:
    ct = encrypt_bytes(data, KEYS, segment_size=seg)
    assert decrypt_bytes(ct, KEYS) == data
    out = io.BytesIO()
    decrypt_stream(io.BytesIO(ct), out, KEYS)
    assert out.getvalue() == data


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.binary(min_size=1, max_size=3000),
    seg=st.integers(16, 500),
    threads=st.sampled_from([1, 2]),
)
def test_round_trip_random_files(tmp_path: Path, data: bytes, seg: int, threads: int) -> None:
    src, enc, dec = tmp_path / "p", tmp_path / "e", tmp_path / "d"
    src.write_bytes(data)
    encrypt_file(src, enc, KEYS, segment_size=seg, threads=threads, force=True, fsync=False)
    decrypt_file(enc, dec, KEYS, threads=threads, force=True, fsync=False)
    assert dec.read_bytes() == data


_CT = encrypt_bytes(bytes(range(40)), KEYS, segment_size=SEG)  # 3 segments: 16, 16, 8


@settings(max_examples=150, deadline=None)
@given(
    action=st.sampled_from(["flip", "truncate", "insert", "replace"]),
    pos=st.integers(0, len(_CT) - 1),
    bit=st.integers(0, 7),
    junk=st.binary(min_size=1, max_size=40),
)
def test_random_tampering_is_detected(action: str, pos: int, bit: int, junk: bytes) -> None:
    b = bytearray(_CT)
    if action == "flip":
        b[pos] ^= 1 << bit
    elif action == "truncate":
        del b[pos:]
    elif action == "insert":
        b[pos:pos] = junk
    else:
        b[pos : pos + len(junk)] = junk
    if bytes(b) == _CT:
        return
    # An edit of the key id or version fields may name a key the source lacks: that is
    # refused too (KeyUnavailableError), before any segment is read.
    with pytest.raises((TamperError, KeyUnavailableError)):
        decrypt_bytes(bytes(b), KEYS)
    with pytest.raises((TamperError, KeyUnavailableError)):
        decrypt_stream(io.BytesIO(bytes(b)), io.BytesIO(), KEYS)


# Header bytes whose edit can name another key: key version (13-16), key id length (49) and
# key id (52-58, "default"). Any other header edit fails parsing or the commitment.
_KEY_FIELDS = {*range(13, 17), 49, *range(52, 59)}


def test_every_single_bit_flip_is_detected() -> None:
    header_size = read_header(io.BytesIO(_CT).read, label="x").size
    assert header_size == 91
    for pos in range(len(_CT)):
        for bit in range(8):
            b = bytearray(_CT)
            b[pos] ^= 1 << bit
            with pytest.raises(EncryptionError) as caught:
                decrypt_bytes(bytes(b), KEYS, label="f.myo")
            assert str(caught.value).startswith("f.myo: ")
            if pos >= header_size:
                assert isinstance(caught.value, TamperError)
                assert "segment" in str(caught.value)
            elif pos not in _KEY_FIELDS:
                assert isinstance(caught.value, TamperError)
            else:
                assert isinstance(caught.value, (TamperError, KeyUnavailableError))


def test_every_truncation_is_detected(tmp_path: Path) -> None:
    src = tmp_path / "ct"
    for cut in range(len(_CT)):
        with pytest.raises(TamperError):
            decrypt_bytes(_CT[:cut], KEYS)
        with pytest.raises(TamperError):
            decrypt_stream(io.BytesIO(_CT[:cut]), io.BytesIO(), KEYS)
        src.write_bytes(_CT[:cut])
        with pytest.raises(TamperError):
            decrypt_file(src, tmp_path / "out", KEYS, fsync=False)
        assert not (tmp_path / "out").exists()


def test_reordered_duplicated_dropped_segments() -> None:
    head, (s0, s1, s2) = _segments(_CT)
    for body in [
        s1 + s0 + s2,
        s0 + s2 + s1,
        s0 + s0 + s1 + s2,
        s0 + s1 + s1 + s2,
        s0 + s1 + s2 + s2,
        s0 + s2,
        s1 + s2,
        s0 + s1,
        s2,
    ]:
        with pytest.raises(TamperError, match="segment"):
            decrypt_bytes(head + body, KEYS)


def test_segments_from_another_file_are_refused() -> None:
    other = encrypt_bytes(bytes(range(40)), KEYS, segment_size=SEG)
    head, segs = _segments(_CT)
    _, others = _segments(other)
    with pytest.raises(TamperError, match="segment 1"):
        decrypt_bytes(head + segs[0] + others[1] + segs[2], KEYS)


class _CountingReader(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.consumed = 0

    def read(self, n: int | None = -1) -> bytes:
        chunk = super().read(n)
        self.consumed += len(chunk)
        return chunk

    def readinto(self, buf):  # type: ignore[no-untyped-def, override]
        n = super().readinto(buf)
        self.consumed += n
        return n


def test_wrong_key_fails_on_the_header_alone(tmp_path: Path) -> None:
    ct = encrypt_bytes(os.urandom(5000), KEYS, segment_size=SEG)
    header_size = read_header(io.BytesIO(ct).read, label="x").size
    wrong = StaticKeySource.single(bytes(32))
    reader = _CountingReader(ct)
    out = io.BytesIO()
    with pytest.raises(WrongKeyError, match="commitment"):
        decrypt_stream(reader, out, wrong, label="f.myo")
    assert reader.consumed == header_size
    assert out.getvalue() == b""
    # For files, nothing is created at all.
    (tmp_path / "f.myo").write_bytes(ct)
    with pytest.raises(WrongKeyError, match=r"f\.myo"):
        decrypt_file(tmp_path / "f.myo", tmp_path / "out", wrong)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.myo"]


def test_key_id_and_version_come_from_the_header() -> None:
    old, new = os.urandom(32), os.urandom(32)
    keys_v1 = StaticKeySource({"proj": {1: old}})
    ct_v1 = encrypt_bytes(b"before rotation", keys_v1, "proj")
    assert read_header(io.BytesIO(ct_v1).read, label="x").key_version == 1
    rotated = StaticKeySource({"proj": {1: old, 2: new}})
    ct_v2 = encrypt_bytes(b"after rotation", rotated, "proj")
    header = read_header(io.BytesIO(ct_v2).read, label="x")
    assert (header.key_id, header.key_version) == ("proj", 2)
    assert decrypt_bytes(ct_v1, rotated) == b"before rotation"
    assert decrypt_bytes(ct_v2, rotated) == b"after rotation"
    with pytest.raises(KeyUnavailableError, match="version 2"):
        decrypt_bytes(ct_v2, keys_v1)
    with pytest.raises(KeyUnavailableError, match="'proj'"):
        decrypt_bytes(ct_v1, KEYS)


def test_a_source_returning_the_wrong_version_or_key_is_caught() -> None:
    ct = encrypt_bytes(b"x", KEYS)

    class Liar:
        def __init__(self, version: int, key: bytes) -> None:
            self.released = ReleasedKey(key, version)

        def key(self, key_id: str, version: int | None) -> ReleasedKey:
            return self.released

    with pytest.raises(KeyUnavailableError, match="returned version 2"):
        decrypt_bytes(ct, Liar(2, KEY))
    with pytest.raises(WrongKeyError):
        decrypt_bytes(ct, Liar(1, os.urandom(32)))


def test_bound_name_is_checked_only_when_expected() -> None:
    ct = encrypt_bytes(b"data", KEYS, name=b"a/b.csv")
    assert decrypt_bytes(ct, KEYS) == b"data"
    assert decrypt_bytes(ct, KEYS, expected_name=b"a/b.csv") == b"data"
    with pytest.raises(TamperError, match="moved or swapped"):
        decrypt_bytes(ct, KEYS, expected_name=b"a/c.csv")
    unbound = encrypt_bytes(b"data", KEYS)
    assert decrypt_bytes(unbound, KEYS, expected_name=b"anything") == b"data"


def test_stream_releases_only_authenticated_segments() -> None:
    pt = bytes(range(40))
    head, (s0, s1, s2) = _segments(encrypt_bytes(pt, KEYS, segment_size=SEG))
    bad = bytearray(s1)
    bad[0] ^= 1
    out = io.BytesIO()
    with pytest.raises(TamperError, match="segment 1"):
        decrypt_stream(io.BytesIO(head + s0 + bytes(bad) + s2), out, KEYS)
    assert out.getvalue() == pt[:SEG]  # segment 0 only: it authenticated


def test_tampered_large_file_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "p"
    src.write_bytes(os.urandom(300_000))
    encrypt_file(src, tmp_path / "e", KEYS, segment_size=4096)
    data = bytearray((tmp_path / "e").read_bytes())
    data[-100] ^= 0x80  # in the final segment: every earlier one was fine and got written
    (tmp_path / "e").write_bytes(bytes(data))
    with pytest.raises(TamperError, match="final segment"):
        decrypt_file(tmp_path / "e", tmp_path / "d", KEYS, threads=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "p"]


def test_file_that_grows_while_read_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelyo.encryption import stream

    src = tmp_path / "p"
    src.write_bytes(os.urandom(50_000))
    real = stream._pread_full
    grown = False

    def pread_then_grow(fd: int, buf: memoryview, offset: int) -> int:
        nonlocal grown
        if not grown:
            grown = True
            with src.open("ab") as f:
                f.write(b"more")
        return real(fd, buf, offset)

    monkeypatch.setattr(stream, "_pread_full", pread_then_grow)
    with pytest.raises(Exception, match="changed size"):
        encrypt_file(src, tmp_path / "e", KEYS, segment_size=4096, threads=1)
    assert not (tmp_path / "e").exists()


def test_memory_does_not_grow_with_file_size(tmp_path: Path) -> None:
    peaks = []
    for mib in (8, 24):
        src = tmp_path / f"p{mib}"
        with src.open("wb") as f:
            f.write(os.urandom(mib << 20))
        for encrypt in (True, False):
            tracemalloc.start()
            if encrypt:
                encrypt_file(src, tmp_path / "e", KEYS, force=True, fsync=False, threads=2)
            else:
                decrypt_file(tmp_path / "e", tmp_path / "d", KEYS, force=True, fsync=False)
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
        src.unlink()
    # Two threads hold one segment in and one out each (~4 MiB with 1 MiB segments), whatever
    # the file size.
    assert max(peaks) < 6 << 20, peaks


def test_stream_engine_memory_is_bounded() -> None:
    class Zeros(io.RawIOBase):
        def __init__(self, total: int) -> None:
            self.left = total

        def readable(self) -> bool:
            return True

        def readinto(self, buf):  # type: ignore[no-untyped-def, override]
            n = min(len(buf), self.left, 1 << 16)
            buf[:n] = bytes(n)
            self.left -= n
            return n

    class Sink(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, b):  # type: ignore[no-untyped-def, override]
            return len(b)

    tracemalloc.start()
    encrypt_stream(Zeros(24 << 20), Sink(), KEYS)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20, peak
