"""Generate vectors.json once; the tests then check the library against it byte for byte.

    .venv/bin/python tests/vectors/encryption/make_vectors.py

Run again only when the format version changes (the tests would fail otherwise: that is the
point). Salts and keys are fixed here so the output is deterministic.
"""

from __future__ import annotations

import json
from pathlib import Path

from modelyo.encryption._aead import SegmentCipher
from modelyo.encryption.format import Header, derive, seal_header
from modelyo.encryption.stream import seal_bytes_with

KEY = bytes(range(32))
OTHER_KEY = bytes(range(32, 64))
HERE = Path(__file__).parent


def _salt(n: int) -> bytes:
    return bytes([n]) * 32


POSITIVE = [
    # (description, key id, version, segment size, name, salt byte, plaintext)
    ("empty plaintext: one empty final segment", "default", 1, 1 << 20, b"", 1, b""),
    ("one byte", "default", 1, 1 << 20, b"", 2, b"A"),
    ("three segments of 16, last one short", "default", 1, 16, b"", 3, bytes(range(40))),
    ("two full segments: the last is full, not empty", "default", 1, 16, b"", 4, bytes(32)),
    (
        "bound name, other key id and version, segment 64",
        "project-x",
        7,
        64,
        b"data/a.csv",
        5,
        b"name,value\n" * 10,
    ),
]


def positive() -> list[dict[str, object]]:
    out = []
    for desc, key_id, version, seg, name, salt_byte, plaintext in POSITIVE:
        draft = Header(key_id, version, _salt(salt_byte), seg, name)
        header, file_key = seal_header(KEY, draft)
        _, commitment = derive(KEY, draft)
        out.append(
            {
                "description": desc,
                "key": KEY.hex(),
                "key_id": key_id,
                "key_version": version,
                "segment_size": seg,
                "name": name.hex(),
                "salt": _salt(salt_byte).hex(),
                "plaintext": plaintext.hex(),
                "file_key": file_key.hex(),
                "commitment": commitment.hex(),
                "header": header.encode().hex(),
                "ciphertext": seal_bytes_with(KEY, draft, plaintext).hex(),
            }
        )
    return out


def negative(base: dict[str, object]) -> list[dict[str, object]]:
    """Negative cases built from the three-segment vector (header 91 bytes, segments 32/32/24)."""
    ct = bytes.fromhex(str(base["ciphertext"]))
    hlen = len(bytes.fromhex(str(base["header"])))
    s0, s1, s2 = ct[hlen : hlen + 32], ct[hlen + 32 : hlen + 64], ct[hlen + 64 :]
    head = ct[:hlen]
    default_keys = {"default": {"1": KEY.hex()}}

    def flip(data: bytes, pos: int) -> bytes:
        b = bytearray(data)
        b[pos] ^= 0x01
        return bytes(b)

    # Only a key holder can write an empty final segment after full ones; readers must refuse it.
    draft = Header("default", 1, _salt(3), 16, b"")
    header, file_key = seal_header(KEY, draft)
    c = SegmentCipher(file_key)
    pt = bytes(range(32))
    noncanonical = header.encode() + c.seal(0, False, pt[:16]) + c.seal(1, False, pt[16:])
    noncanonical += c.seal(2, True, b"")

    edited_version = bytearray(head)
    edited_version[13:17] = (2).to_bytes(4, "big")
    edited_id = bytearray(head)
    edited_id[52:59] = b"defaulu"
    cases = [
        ("bit flipped in segment 1's tag", flip(ct, hlen + 63), "TamperError", "segment 1"),
        ("bit flipped in the final segment", flip(ct, hlen + 70), "TamperError", "final segment 2"),
        ("truncated at a segment boundary", head + s0 + s1, "TamperError", "final segment 1"),
        ("truncated inside the final segment", ct[:-5], "TamperError", "final segment 2"),
        (
            "truncated inside a tag: 15 bytes left",
            head + s0 + s1 + s2[:15],
            "TamperError",
            "truncated",
        ),
        ("truncated after the header", head, "TamperError", "truncated"),
        ("truncated inside the header", head[:60], "TamperError", "truncated"),
        ("segment 1 dropped", head + s0 + s2, "TamperError", "final segment 1"),
        ("segments 0 and 1 swapped", head + s1 + s0 + s2, "TamperError", "segment 0"),
        ("segment 0 duplicated", head + s0 + s0 + s1 + s2, "TamperError", "segment 1"),
        ("one byte appended", ct + b"\x00", "TamperError", "final segment 2"),
        (
            "empty final segment after full ones",
            noncanonical,
            "TamperError",
            "final segment is empty",
        ),
        ("magic edited", flip(ct, 0), "TamperError", "magic"),
        ("format version 2", head[:8] + b"\x02" + ct[9:], "TamperError", "version 2"),
        ("commitment edited", flip(ct, hlen - 1), "WrongKeyError", "commitment"),
        ("salt edited", flip(ct, 20), "WrongKeyError", "commitment"),
        ("segment size edited", head[:12] + b"\x20" + ct[13:], "WrongKeyError", "commitment"),
    ]
    out = [
        {"description": d, "ciphertext": c.hex(), "keys": default_keys, "error": e, "reason": r}
        for d, c, e, r in cases
    ]
    out.append(
        {
            "description": "key version edited 1 -> 2 (the source holds both)",
            "ciphertext": (bytes(edited_version) + ct[hlen:]).hex(),
            "keys": {"default": {"1": KEY.hex(), "2": KEY.hex()}},
            "error": "WrongKeyError",
            "reason": "version 2",
        }
    )
    out.append(
        {
            "description": "key id edited default -> defaulu (the source holds both)",
            "ciphertext": (bytes(edited_id) + ct[hlen:]).hex(),
            "keys": {"default": {"1": KEY.hex()}, "defaulu": {"1": KEY.hex()}},
            "error": "WrongKeyError",
            "reason": "'defaulu'",
        }
    )
    out.append(
        {
            "description": "wrong key for the right key id and version",
            "ciphertext": ct.hex(),
            "keys": {"default": {"1": OTHER_KEY.hex()}},
            "error": "WrongKeyError",
            "reason": "commitment",
        }
    )
    out.append(
        {
            "description": "key version the source does not hold",
            "ciphertext": (bytes(edited_version) + ct[hlen:]).hex(),
            "keys": default_keys,
            "error": "KeyUnavailableError",
            "reason": "version 2",
        }
    )
    return out


def main() -> None:
    pos = positive()
    doc = {
        "format": "Modelyo encrypted file, version 1 (docs/encrypted-file-format.md)",
        "note": "hex everywhere; keys maps key id -> version -> key",
        "positive": pos,
        "negative": negative(pos[2]),
    }
    (HERE / "vectors.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
