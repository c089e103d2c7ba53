"""The encrypted-file format, version 1: vectors, key schedule, header, nonces, limits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from modelyo import errors
from modelyo.encryption import StaticKeySource, decrypt_bytes, decrypt_file
from modelyo.encryption._aead import nonce
from modelyo.encryption.format import (
    COMMITMENT_LABEL,
    FILE_KEY_LABEL,
    MAGIC,
    MAX_SEGMENTS,
    Header,
    HeaderError,
    check_key_id,
    derive,
    layout,
    parse_header,
    seal_header,
)
from modelyo.encryption.stream import seal_bytes_with

VECTORS = json.loads(
    (Path(__file__).parent / "vectors" / "encryption" / "vectors.json").read_text()
)


def _keys(spec: dict[str, dict[str, str]]) -> StaticKeySource:
    return StaticKeySource(
        {
            kid: {int(v): bytes.fromhex(k) for v, k in versions.items()}
            for kid, versions in spec.items()
        }
    )


def _independent_encrypt(v: dict[str, object]) -> bytes:
    """The format re-implemented from the spec with `cryptography` alone (no project code)."""
    key = bytes.fromhex(str(v["key"]))
    salt = bytes.fromhex(str(v["salt"]))
    name = bytes.fromhex(str(v["name"]))
    key_id = str(v["key_id"]).encode()
    seg = int(v["segment_size"])  # type: ignore[arg-type]
    h = (
        MAGIC
        + bytes([1])
        + seg.to_bytes(4, "big")
        + int(v["key_version"]).to_bytes(4, "big")  # type: ignore[arg-type]
        + salt
        + bytes([len(key_id)])
        + len(name).to_bytes(2, "big")
        + key_id
        + name
    )

    def hkdf(label: bytes) -> bytes:
        return HKDF(hashes.SHA256(), 32, salt, label + h).derive(key)

    file_key = hkdf(b"modelyo enc v1 file key\x00")
    commitment = hkdf(b"modelyo enc v1 commitment\x00")
    aead = AESGCM(file_key)
    pt = bytes.fromhex(str(v["plaintext"]))
    chunks = [pt[i : i + seg] for i in range(0, len(pt), seg)] or [b""]
    out = h + commitment
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        out += aead.encrypt(i.to_bytes(11, "big") + bytes([last]), chunk, None)
    return out


@pytest.mark.parametrize("v", VECTORS["positive"], ids=lambda v: v["description"])
def test_positive_vectors_byte_for_byte(v: dict[str, object]) -> None:
    key = bytes.fromhex(str(v["key"]))
    draft = Header(
        str(v["key_id"]),
        int(v["key_version"]),  # type: ignore[arg-type]
        bytes.fromhex(str(v["salt"])),
        int(v["segment_size"]),  # type: ignore[arg-type]
        bytes.fromhex(str(v["name"])),
    )
    file_key, commitment = derive(key, draft)
    assert file_key.hex() == v["file_key"]
    assert commitment.hex() == v["commitment"]
    header, _ = seal_header(key, draft)
    assert header.encode().hex() == v["header"]
    assert seal_bytes_with(key, draft, bytes.fromhex(str(v["plaintext"]))).hex() == v["ciphertext"]
    assert _independent_encrypt(v).hex() == v["ciphertext"]
    keys = StaticKeySource({str(v["key_id"]): {int(v["key_version"]): key}})  # type: ignore[arg-type]
    assert decrypt_bytes(bytes.fromhex(str(v["ciphertext"])), keys).hex() == v["plaintext"]


@pytest.mark.parametrize("v", VECTORS["negative"], ids=lambda v: v["description"])
def test_negative_vectors_are_refused(v: dict[str, object], tmp_path: Path) -> None:
    error = getattr(errors, str(v["error"]))
    ct = bytes.fromhex(str(v["ciphertext"]))
    keys = _keys(v["keys"])  # type: ignore[arg-type]
    with pytest.raises(error, match=str(v["reason"]).replace("(", r"\(")) as caught:
        decrypt_bytes(ct, keys, label="vec.myo")
    assert "vec.myo" in str(caught.value)
    # The file path gives the same verdict, names the file and leaves no output behind.
    src = tmp_path / "vec.myo"
    src.write_bytes(ct)
    with pytest.raises(error) as caught:
        decrypt_file(src, tmp_path / "out", keys)
    assert str(src) in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vec.myo"]


def test_negative_vectors_cover_every_tamper_class() -> None:
    descriptions = " | ".join(v["description"] for v in VECTORS["negative"])
    for word in ("flipped", "truncated", "dropped", "swapped", "duplicated", "edited", "wrong key"):
        assert word in descriptions


def test_key_schedule_matches_rfc5869_hkdf() -> None:
    key, salt = bytes(range(32)), bytes(32)
    header = Header("default", 3, salt, 1 << 20, b"x/y")
    h = header.authenticated_bytes()
    file_key, commitment = derive(key, header)
    assert file_key == HKDF(hashes.SHA256(), 32, salt, FILE_KEY_LABEL + h).derive(key)
    assert commitment == HKDF(hashes.SHA256(), 32, salt, COMMITMENT_LABEL + h).derive(key)
    assert file_key != commitment


def test_every_header_field_changes_the_keys() -> None:
    base = Header("default", 1, bytes(32), 1 << 20, b"")
    variants = [
        Header("default2", 1, bytes(32), 1 << 20, b""),
        Header("default", 2, bytes(32), 1 << 20, b""),
        Header("default", 1, bytes(31) + b"\x01", 1 << 20, b""),
        Header("default", 1, bytes(32), 1 << 19, b""),
        Header("default", 1, bytes(32), 1 << 20, b"a"),
    ]
    key = bytes(32)
    seen = {derive(key, base)}
    for v in variants:
        seen.add(derive(key, v))
    assert len(seen) == len(variants) + 1


def test_header_round_trip_and_size() -> None:
    header, _ = seal_header(bytes(32), Header("k.1:a_b-c", 2**32 - 1, b"s" * 32, 16, b"\xff/x"))
    encoded = header.encode()
    assert len(encoded) == header.size
    assert parse_header(encoded) == header


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("key_id", ""),
        ("key_id", "-leading"),
        ("key_id", "has space"),
        ("key_id", "x" * 129),
        ("key_version", -1),
        ("key_version", 2**32),
        ("salt", b"short"),
        ("segment_size", 15),
        ("segment_size", (1 << 24) + 1),
        ("name", b"n" * 4097),
    ],
)
def test_header_limits(field: str, value: object) -> None:
    fields: dict[str, object] = {
        "key_id": "default",
        "key_version": 1,
        "salt": bytes(32),
        "segment_size": 1 << 20,
        "name": b"",
    }
    fields[field] = value
    with pytest.raises(ValueError):
        Header(**fields)  # type: ignore[arg-type]


def test_parse_refuses_out_of_range_fields() -> None:
    header, _ = seal_header(bytes(32), Header("default", 1, bytes(32)))
    good = header.encode()
    bad_segment = good[:9] + (1 << 25).to_bytes(4, "big") + good[13:]
    with pytest.raises(HeaderError, match="segment size"):
        parse_header(bad_segment)
    bad_id_len = good[:49] + b"\x00" + good[50:]
    with pytest.raises(HeaderError, match="key id length"):
        parse_header(bad_id_len)
    bad_id = good[:52] + b"de\xffault" + good[59:]
    with pytest.raises(HeaderError, match="key id"):
        parse_header(bad_id)


def test_check_key_id() -> None:
    assert check_key_id("project-x.v2") == "project-x.v2"
    with pytest.raises(ValueError, match="invalid key id"):
        check_key_id("a/b")


def test_nonce_rule() -> None:
    assert nonce(0, False) == bytes(12)
    assert nonce(0, True) == bytes(11) + b"\x01"
    assert nonce(0x0102, False) == bytes(9) + b"\x01\x02\x00"
    assert nonce(MAX_SEGMENTS - 1, True)[-5:] == b"\xff\xff\xff\xff\x01"
    with pytest.raises(ValueError):
        nonce(MAX_SEGMENTS, False)
    with pytest.raises(ValueError):
        nonce(-1, False)
    # Never reused within a file: distinct for every (index, last) pair.
    assert len({nonce(i, last) for i in range(300) for last in (False, True)}) == 600


def test_layout() -> None:
    lay = layout(100 + 16, 100, 16)
    assert (lay.segments, lay.last_plaintext, lay.plaintext_size) == (1, 0, 0)
    lay = layout(100 + 32 + 32 + 17, 100, 16)
    assert (lay.segments, lay.last_plaintext, lay.plaintext_size) == (3, 1, 33)
    for total, reason in [
        (100 + 15, "no complete segment"),
        (100 + 32 + 5, "inside its last segment"),
        (100 + 32 + 16, "final segment is empty"),
    ]:
        with pytest.raises(ValueError, match=reason):
            layout(total, 100, 16)
