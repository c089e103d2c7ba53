"""Key-encryption keys: HKDF over the master key with an unambiguous, fixed-layout info."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ca_enclave.keyring import KEK_DOMAIN, Keyring, KeyVersionError, derive_kek, kek_info

MASTER = bytes(range(32))


def _hkdf_sha256(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 written out with hmac, to check the library-based derivation independently."""
    prk = hmac.new(b"\0" * 32, ikm, hashlib.sha256).digest()  # salt=None means 32 zero bytes
    out, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
    return out[:length]


def test_info_layout_is_exactly_as_documented():
    assert kek_info("file", "default", 1) == (
        b"modelyo-kek-v1\0" + b"\x04file" + b"\x07default" + b"\x00\x00\x00\x01"
    )
    assert kek_info("file", "x", 0xFFFFFFFF).endswith(b"\xff\xff\xff\xff")
    assert KEK_DOMAIN == b"modelyo-kek-v1\0"


def test_kek_is_hkdf_sha256_of_the_master_with_that_info():
    expected = _hkdf_sha256(MASTER, kek_info("file", "default", 1))
    assert derive_kek(MASTER, key_id="default", version=1) == expected


def test_kek_is_deterministic_and_differs_per_key_id_version_purpose_and_master():
    base = derive_kek(MASTER, key_id="default", version=1)
    assert derive_kek(MASTER, key_id="default", version=1) == base
    others = {
        derive_kek(MASTER, key_id="other", version=1),
        derive_kek(MASTER, key_id="default", version=2),
        derive_kek(MASTER, key_id="default", version=1, purpose="parquet"),
        derive_kek(bytes(32), key_id="default", version=1),
    }
    assert base not in others and len(others) == 4


def test_length_prefixes_keep_shifted_fields_apart():
    assert kek_info("ab", "c", 1) != kek_info("a", "bc", 1)
    assert derive_kek(MASTER, key_id="c", version=1, purpose="ab") != derive_kek(
        MASTER, key_id="bc", version=1, purpose="a"
    )


_field = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1)


@given(
    st.tuples(_field, _field, st.integers(1, 2**32 - 1)),
    st.tuples(_field, _field, st.integers(1, 2**32 - 1)),
)
def test_info_is_injective(a, b):
    if a != b:
        assert kek_info(*a) != kek_info(*b)


@pytest.mark.parametrize(
    ("purpose", "key_id", "version"),
    [
        ("file", "", 1),
        ("file", "x" * 256, 1),
        ("file", "dé", 1),
        ("file", "a b", 1),
        ("", "default", 1),
        ("file", "default", 0),
        ("file", "default", 2**32),
    ],
)
def test_invalid_fields_are_refused(purpose, key_id, version):
    with pytest.raises(ValueError):
        kek_info(purpose, key_id, version)


def test_keyring_versions_and_refusals():
    ring = Keyring({1: MASTER, 2: bytes(32)})
    assert ring.current == 2 and ring.versions == [1, 2]
    assert ring.kek("default", None) == (2, derive_kek(bytes(32), key_id="default", version=2))
    assert ring.kek("default", 1) == (1, derive_kek(MASTER, key_id="default", version=1))
    with pytest.raises(KeyVersionError, match="key version 3 does not exist"):
        ring.kek("default", 3)
    assert MASTER.hex() not in repr(ring)
    with pytest.raises(ValueError):
        Keyring({})
    with pytest.raises(ValueError):
        derive_kek(b"short", key_id="default", version=1)
