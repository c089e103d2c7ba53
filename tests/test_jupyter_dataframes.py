"""`df.modelyo.encrypt` / `read_encrypted`: DataFrames in Modelyo's encrypted-file format."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from modelyo.cli.main import main
from modelyo.encryption import StaticKeySource, decrypt_stream, encrypt_bytes, read_header
from modelyo.errors import (
    CodecError,
    EncryptionError,
    KeyUnavailableError,
    NotAttestedError,
    TamperError,
    WrongKeyError,
)
from modelyo_jupyter import dataframes
from modelyo_jupyter.dataframes import default_key_source, read_encrypted, write_encrypted

KEYS = StaticKeySource.single(bytes(range(32)))
SECRET = "PLAINTEXT-MARKER-91c2"


def _frame(rows: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    return pd.DataFrame(
        {
            "ints": np.arange(rows, dtype="int64") * 7,
            "floats": np.where(np.arange(rows) % 4 == 1, np.nan, rng.normal(size=rows)),
            "strings": [f"{SECRET}{i}" if i % 2 else f"s{i}" for i in range(rows)],
            "nullable": pd.array([None if i % 3 == 0 else i for i in range(rows)], dtype="Int64"),
            "when": pd.date_range("2024-10-27", periods=rows, freq="15min", tz="Europe/Berlin"),
            "category": pd.Categorical(["low", "high", "mid"] * (rows // 3)),
        },
        index=pd.Index([f"r{i}" for i in range(rows)], name="record"),
    )


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_accessor_round_trip_keeps_every_dtype(tmp_path):
    df = _frame()
    path = df.modelyo.encrypt(tmp_path / "frame.enc", keys=KEYS)
    assert path == tmp_path / "frame.enc"
    back = read_encrypted(path, keys=KEYS)
    pd.testing.assert_frame_equal(back, df)
    assert dict(back.dtypes) == dict(df.dtypes)
    assert back.index.name == "record"
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_the_file_is_modelyo_ciphertext_without_plaintext(tmp_path):
    path = _frame().modelyo.encrypt(tmp_path / "frame.enc", "team-a", keys=_team_keys())
    raw = path.read_bytes()
    assert SECRET.encode() not in raw and b"PAR1" not in raw
    header = read_header(io.BytesIO(raw).read, label="x")
    assert (header.key_id, header.key_version) == ("team-a", 4)
    # It is the ordinary format: the library decrypts it to Parquet.
    plain = io.BytesIO()
    decrypt_stream(io.BytesIO(raw), plain, _team_keys())
    assert plain.getvalue().startswith(b"PAR1") and SECRET.encode() in plain.getvalue()


def _team_keys() -> StaticKeySource:
    return StaticKeySource({"team-a": {3: bytes(32), 4: b"\x04" * 32}})


def test_a_large_frame_streams_across_many_segments(tmp_path):
    df = pd.DataFrame({"x": np.arange(600_000), "y": np.arange(600_000) * 0.5})
    path = df.modelyo.encrypt(tmp_path / "big.enc", keys=KEYS)
    assert path.stat().st_size > 3 * (1 << 20)  # several 1 MiB segments
    pd.testing.assert_frame_equal(read_encrypted(path, keys=KEYS), df)


def test_series_round_trip(tmp_path):
    s = pd.Series(pd.array([1, None, 3], dtype="Int64"), name="counts", index=["a", "b", "c"])
    path = s.modelyo.encrypt(tmp_path / "s.enc", keys=KEYS)
    pd.testing.assert_series_equal(read_encrypted(path, keys=KEYS), s)


def test_wrong_key_names_the_file(tmp_path):
    path = _frame().modelyo.encrypt(tmp_path / "frame.enc", keys=KEYS)
    other = StaticKeySource.single(b"\x09" * 32)
    with pytest.raises(WrongKeyError, match=r"frame\.enc: the key 'default' version 1") as info:
        read_encrypted(path, keys=other)
    assert info.value.path == str(path)
    with pytest.raises(KeyUnavailableError, match=r"frame\.enc"):
        read_encrypted(path, keys=StaticKeySource.single(bytes(32), "elsewhere"))


@pytest.mark.parametrize("cut", ["half", "last byte", "header"])
def test_truncated_file_is_tamper_and_returns_nothing(tmp_path, cut):
    df = pd.DataFrame({"x": np.arange(400_000)})
    path = df.modelyo.encrypt(tmp_path / "frame.enc", keys=KEYS)
    raw = path.read_bytes()
    keep = {"half": len(raw) // 2, "last byte": len(raw) - 1, "header": 20}[cut]
    path.write_bytes(raw[:keep])
    result = None
    with pytest.raises(TamperError, match=r"frame\.enc") as info:
        result = read_encrypted(path, keys=KEYS)
    assert result is None
    assert not isinstance(info.value, WrongKeyError)
    assert _listing(tmp_path) == ["frame.enc"]


def test_a_flipped_byte_is_tamper(tmp_path):
    path = _frame().modelyo.encrypt(tmp_path / "frame.enc", keys=KEYS)
    raw = bytearray(path.read_bytes())
    raw[-40] ^= 0x20
    path.write_bytes(raw)
    with pytest.raises(TamperError, match="failed authentication"):
        read_encrypted(path, keys=KEYS)


def test_overwrite_is_refused_without_force(tmp_path):
    path = _frame().modelyo.encrypt(tmp_path / "frame.enc", keys=KEYS)
    before = path.read_bytes()
    with pytest.raises(EncryptionError, match=r"frame\.enc already exists; pass --force"):
        _frame(3).modelyo.encrypt(path, keys=KEYS)
    assert path.read_bytes() == before
    _frame(3).modelyo.encrypt(path, keys=KEYS, force=True)
    assert len(read_encrypted(path, keys=KEYS)) == 3
    assert _listing(tmp_path) == ["frame.enc"]


def test_a_frame_parquet_cannot_hold_leaves_no_file(tmp_path):
    bad = pd.DataFrame({1: [1, 2]})  # a non-str column name
    with pytest.raises(CodecError, match="not a str"):
        bad.modelyo.encrypt(tmp_path / "bad.enc", keys=KEYS)
    mixed = pd.DataFrame({"x": [1, 2], "y": [1, "text"]})
    with pytest.raises(CodecError):
        write_encrypted(mixed, tmp_path / "mixed.enc", keys=KEYS)
    with pytest.raises(KeyUnavailableError):
        _frame().modelyo.encrypt(tmp_path / "nokey.enc", "absent", keys=KEYS)
    assert _listing(tmp_path) == []


def test_an_encrypted_file_that_is_not_a_frame(tmp_path):
    path = tmp_path / "notes.enc"
    path.write_bytes(encrypt_bytes(b"just some text", KEYS))
    with pytest.raises(CodecError, match=r"notes\.enc decrypted, but it does not hold"):
        read_encrypted(path, keys=KEYS)


def test_before_attestation_the_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = r"run `%modelyo attest` in a notebook, or `modelyo attest` in a shell"
    with pytest.raises(NotAttestedError, match=message):
        _frame().modelyo.encrypt(tmp_path / "frame.enc")
    with pytest.raises(NotAttestedError, match=message):
        read_encrypted(tmp_path / "frame.enc")
    assert _listing(tmp_path) == []


@pytest.mark.slow
def test_the_workspace_ca_is_the_default_and_is_cached(stack, tmp_path, monkeypatch, capsys):
    home = tmp_path / "project"
    home.mkdir()
    monkeypatch.chdir(home)
    assert main(["attest"]) == 0
    capsys.readouterr()
    assert default_key_source() is default_key_source()
    df = _frame()
    path = df.modelyo.encrypt("frame.enc")
    pd.testing.assert_frame_equal(read_encrypted("frame.enc"), df)
    assert read_header(io.BytesIO(path.read_bytes()).read, label="x").key_version == 1
    # A static key is not the CA's key.
    with pytest.raises(WrongKeyError):
        read_encrypted(path, keys=KEYS)


def test_a_failure_midway_through_the_stream_leaves_no_file(tmp_path, monkeypatch):
    def write_then_fail(df, sink):
        sink.write(b"PAR1" + b"x" * (5 << 20))  # several segments already encrypted
        raise CodecError("failed halfway")

    monkeypatch.setattr(dataframes, "write_dataframe", write_then_fail)
    with pytest.raises(CodecError, match="failed halfway"):
        _frame().modelyo.encrypt(tmp_path / "frame.enc", keys=KEYS)
    assert _listing(tmp_path) == []


class _FullDisk(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_an_output_failure_stops_the_writer_and_is_reported():
    df = pd.DataFrame({"x": np.arange(2_000_000)})
    out = io.BufferedWriter(_FullDisk())
    with pytest.raises(OSError, match="No space left") as info:
        dataframes._stream_encrypted(df, out, KEYS, "default")
    assert not isinstance(info.value, BrokenPipeError)
