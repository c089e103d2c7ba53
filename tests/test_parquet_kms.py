"""Parquet Modular Encryption with the Modelyo CA as the KMS: real PME files, dtypes, refusals
(another CA, tampered wrapped keys, plain files), and the whole path through a real local CA
including a key rotation."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from modelyo.cli.main import main
from modelyo.client.ca import CaClient
from modelyo.client.keys import CaKeySource
from modelyo.encryption import ReleasedKey, StaticKeySource
from modelyo.errors import (
    EncryptionError,
    KeyUnavailableError,
    NotAttestedError,
    TamperError,
    WrongKeyError,
)
from modelyo.workspace import Workspace
from modelyo_jupyter import dataframes  # noqa: F401  (registers df.modelyo)
from modelyo_jupyter.parquet_kms import (
    ModelyoKmsClient,
    WrappedKey,
    read_encrypted_parquet,
    unwrap,
    wrap,
    write_encrypted_parquet,
)

KEYS = StaticKeySource(
    {"default": {1: bytes(range(32))}, "pii": {1: bytes(range(32, 64))}}, origin="test keys"
)
OTHER_CA = StaticKeySource(
    {"default": {1: os.urandom(32)}, "pii": {1: os.urandom(32)}}, origin="another CA"
)
SECRET = "SECRET-MARKER-7f3a"


def _frame(rows: int = 50) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    return pd.DataFrame(
        {
            "count": np.arange(rows, dtype="int64"),
            "score": np.where(np.arange(rows) % 5 == 0, np.nan, rng.random(rows)),
            "name": [f"{SECRET}-{i}" if i % 3 == 0 else f"n{i}" for i in range(rows)],
            "maybe": pd.array([None if i % 4 == 0 else i for i in range(rows)], dtype="Int64"),
            "when": pd.date_range("2024-03-30", periods=rows, freq="h", tz="Europe/Paris"),
            "kind": pd.Categorical(["a", "b", "c", "a", "b"] * (rows // 5), ordered=True),
        },
        index=pd.Index(np.arange(100, 100 + rows), name="row_id"),
    )


def _wrapped_keys(path: Path) -> list[dict]:
    """The Modelyo wrapped keys visible in a file's (clear) key material."""
    raw = path.read_bytes()
    found = re.findall(rb'"wrappedDEK":"((?:[^"\\]|\\.)*)"', raw)
    return [json.loads(json.loads(b'"' + text + b'"')) for text in found]


# --- The wrapped-key format -----------------------------------------------------------------


def test_wrap_round_trip_records_key_id_and_version():
    released = ReleasedKey(bytes(32), 3)
    blob = wrap(b"k" * 16, released, "default")
    decoded = WrappedKey.decode(blob.encode())
    assert (decoded.key_id, decoded.key_version) == ("default", 3)
    assert unwrap(decoded, released) == b"k" * 16
    # Fresh salt per wrap: the same key never wraps to the same text.
    assert wrap(b"k" * 16, released, "default").encode() != blob.encode()


def test_wrong_key_is_told_apart_from_tampering():
    blob = wrap(b"k" * 32, ReleasedKey(bytes(32), 1), "default")
    with pytest.raises(WrongKeyError, match="another CA"):
        unwrap(blob, ReleasedKey(b"\x01" * 32, 1))
    flipped = blob.wrapped[:-1] + bytes([blob.wrapped[-1] ^ 1])
    altered = WrappedKey(blob.key_id, blob.key_version, blob.salt, blob.commitment, flipped)
    with pytest.raises(TamperError, match="failed authentication") as info:
        unwrap(altered, ReleasedKey(bytes(32), 1))
    assert not isinstance(info.value, WrongKeyError)


def test_the_description_is_authenticated():
    key = ReleasedKey(bytes(32), 1)
    blob = wrap(b"k" * 32, key, "default")
    fields = json.loads(blob.encode())
    fields["key_version"] = 2  # claim another version: its commitment cannot match
    moved = WrappedKey.decode(json.dumps(fields))
    with pytest.raises(WrongKeyError):
        unwrap(moved, ReleasedKey(bytes(32), 2))


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"format": "something-else", "version": 1}',
        '{"format": "modelyo-pme-wrap", "version": 9}',
        '{"format": "modelyo-pme-wrap", "version": 1, "key_id": "default", "key_version": true}',
        '{"format": "modelyo-pme-wrap", "version": 1, "key_id": "../x", "key_version": 1}',
    ],
)
def test_malformed_wrapped_keys_are_refused(text):
    with pytest.raises(TamperError, match="malformed"):
        WrappedKey.decode(text)


def test_kms_client_refuses_key_material_naming_another_key_id():
    client = ModelyoKmsClient(KEYS)
    wrapped = client.wrap_key(b"k" * 16, "default")
    assert client.unwrap_key(wrapped, "default") == b"k" * 16
    with pytest.raises(TamperError, match="names key id 'default'"):
        client.unwrap_key(wrapped, "pii")


# --- Files ----------------------------------------------------------------------------------


def test_a_real_pme_file_round_trips_with_dtypes(tmp_path):
    df = _frame()
    path = write_encrypted_parquet(df, tmp_path / "data.parquet", keys=KEYS)
    assert path == tmp_path / "data.parquet"
    raw = path.read_bytes()
    assert raw.endswith(b"PARE")  # Parquet's magic for an encrypted footer
    assert SECRET.encode() not in raw
    # The clear key material names the master key id; the wrapped key names id and version.
    assert b'"masterKeyID":"default"' in raw
    assert [(w["key_id"], w["key_version"]) for w in _wrapped_keys(path)] == [("default", 1)]
    # Single wrapping: the CA's key wraps the 256-bit data key itself.
    assert b'"doubleWrapping":false' in raw
    [text] = [json.dumps(w) for w in _wrapped_keys(path)]
    assert len(unwrap(WrappedKey.decode(text), KEYS.key("default", 1))) == 32
    # pyarrow without decryption properties cannot read it.
    with pytest.raises(OSError, match="encrypted"):
        pq.read_table(path)
    back = read_encrypted_parquet(path, keys=KEYS)
    pd.testing.assert_frame_equal(back, df)
    assert dict(back.dtypes) == dict(df.dtypes)
    assert back.index.name == "row_id"
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_column_keys_with_a_plaintext_footer(tmp_path):
    df = _frame()
    path = tmp_path / "cols.parquet"
    df.modelyo.to_parquet_encrypted(
        path, column_keys={"pii": ["name"]}, keys=KEYS, plaintext_footer=True
    )
    raw = path.read_bytes()
    assert raw.endswith(b"PAR1")  # legacy readers see the footer
    assert b'"masterKeyID":"pii"' in raw and b'"masterKeyID":"default"' in raw
    assert SECRET.encode() not in raw
    # Columns not listed are not encrypted (PME's rule): readable without keys.
    assert pq.read_table(path, columns=["count"]).column("count").to_pylist() == list(range(50))
    pd.testing.assert_frame_equal(read_encrypted_parquet(path, keys=KEYS), df)
    only_default = StaticKeySource({"default": {1: bytes(range(32))}})
    with pytest.raises(KeyUnavailableError, match=r"cols\.parquet.*'pii'"):
        read_encrypted_parquet(path, keys=only_default)


def test_bad_column_keys_are_refused_before_writing(tmp_path):
    path = tmp_path / "x.parquet"
    with pytest.raises(ValueError, match="'nope', which the frame does not have"):
        write_encrypted_parquet(_frame(), path, column_keys={"pii": ["nope"]}, keys=KEYS)
    with pytest.raises(ValueError, match="both"):
        write_encrypted_parquet(
            _frame(), path, column_keys={"pii": ["name"], "default": ["name"]}, keys=KEYS
        )
    with pytest.raises(ValueError, match="invalid key id"):
        write_encrypted_parquet(_frame(), path, footer_key="no spaces", keys=KEYS)
    assert list(tmp_path.iterdir()) == []


def test_another_ca_cannot_read_it(tmp_path):
    path = write_encrypted_parquet(_frame(), tmp_path / "d.parquet", keys=KEYS)
    with pytest.raises(WrongKeyError, match=r"d\.parquet: key 'default' version 1 .*another CA"):
        read_encrypted_parquet(path, keys=OTHER_CA)
    with pytest.raises(KeyUnavailableError, match=r"d\.parquet"):
        read_encrypted_parquet(path, keys=StaticKeySource.single(bytes(32), "other"))


def test_a_tampered_wrapped_key_is_refused(tmp_path):
    path = write_encrypted_parquet(_frame(), tmp_path / "d.parquet", keys=KEYS)
    raw = path.read_bytes()
    [wrapped] = _wrapped_keys(path)
    # Change one base64 character of the wrapped bytes in place (the file keeps its layout).
    old = wrapped["wrapped"].encode()
    new = old[:5] + (b"A" if old[5:6] != b"A" else b"B") + old[6:]
    assert raw.count(old) == 1
    path.write_bytes(raw.replace(old, new))
    with pytest.raises(TamperError, match=r"d\.parquet: .*failed authentication"):
        read_encrypted_parquet(path, keys=KEYS)


def test_tampered_or_truncated_data_is_refused(tmp_path):
    path = write_encrypted_parquet(_frame(2000), tmp_path / "d.parquet", keys=KEYS)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 1
    (tmp_path / "flipped.parquet").write_bytes(raw)
    with pytest.raises(TamperError, match=r"flipped\.parquet could not be read"):
        read_encrypted_parquet(tmp_path / "flipped.parquet", keys=KEYS)
    (tmp_path / "short.parquet").write_bytes(path.read_bytes()[: len(raw) // 2])
    with pytest.raises(TamperError, match=r"short\.parquet"):
        read_encrypted_parquet(tmp_path / "short.parquet", keys=KEYS)


def test_a_plain_parquet_file_is_refused(tmp_path):
    path = tmp_path / "plain.parquet"
    _frame().to_parquet(path)
    with pytest.raises(EncryptionError, match=r"plain\.parquet is not an encrypted Parquet"):
        read_encrypted_parquet(path, keys=KEYS)


def test_overwrite_needs_force_and_a_failure_leaves_nothing(tmp_path):
    path = write_encrypted_parquet(_frame(), tmp_path / "d.parquet", keys=KEYS)
    before = path.read_bytes()
    with pytest.raises(EncryptionError, match="already exists"):
        write_encrypted_parquet(_frame(10), path, keys=KEYS)
    assert path.read_bytes() == before
    write_encrypted_parquet(_frame(10), path, keys=KEYS, force=True)
    assert len(read_encrypted_parquet(path, keys=KEYS)) == 10
    # A key the source does not have: nothing is written.
    with pytest.raises(KeyUnavailableError):
        write_encrypted_parquet(_frame(), tmp_path / "e.parquet", footer_key="nope", keys=KEYS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.parquet"]


def test_rotation_with_static_keys_keeps_old_files_readable(tmp_path):
    v1 = StaticKeySource({"default": {1: bytes(32)}})
    both = StaticKeySource({"default": {1: bytes(32), 2: b"\x02" * 32}})
    old = write_encrypted_parquet(_frame(), tmp_path / "old.parquet", keys=v1)
    new = write_encrypted_parquet(_frame(), tmp_path / "new.parquet", keys=both)
    assert _wrapped_keys(new)[0]["key_version"] == 2
    pd.testing.assert_frame_equal(read_encrypted_parquet(old, keys=both), _frame())
    pd.testing.assert_frame_equal(read_encrypted_parquet(new, keys=both), _frame())
    with pytest.raises(KeyUnavailableError, match="version 2"):
        read_encrypted_parquet(new, keys=v1)


def test_without_a_workspace_it_asks_for_attestation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NotAttestedError, match=r"`%modelyo attest` in a notebook, or `modelyo"):
        write_encrypted_parquet(_frame(), tmp_path / "d.parquet")
    assert not (tmp_path / "d.parquet").exists()


# --- Through the real CA ----------------------------------------------------------------------


@pytest.mark.slow
def test_through_the_ca_including_rotation(stack, tmp_path, monkeypatch, capsys):
    home = tmp_path / "project"
    home.mkdir()
    monkeypatch.chdir(home)
    assert main(["attest"]) == 0
    capsys.readouterr()
    df = _frame()

    # The workspace's CA is the default key source.
    old = df.modelyo.to_parquet_encrypted(home / "old.parquet")
    assert [(w["key_id"], w["key_version"]) for w in _wrapped_keys(old)] == [("default", 1)]
    pd.testing.assert_frame_equal(read_encrypted_parquet(old), df)

    # Another CA (another stack's keys, or any other source) cannot read it.
    with pytest.raises(WrongKeyError, match=r"old\.parquet"):
        read_encrypted_parquet(old, keys=OTHER_CA)

    assert main(["ca", "rotate"]) == 0
    assert "new key version: 2" in capsys.readouterr().out
    # A fresh source (the default one re-asks for the current version after its TTL).
    with CaClient.for_owner(Workspace.here()) as client:
        keys = CaKeySource(client)
        new = write_encrypted_parquet(df, home / "new.parquet", keys=keys)
        assert [w["key_version"] for w in _wrapped_keys(new)] == [2]
        pd.testing.assert_frame_equal(read_encrypted_parquet(old, keys=keys), df)
        pd.testing.assert_frame_equal(read_encrypted_parquet(new, keys=keys), df)
    pd.testing.assert_frame_equal(read_encrypted_parquet(new), df)
