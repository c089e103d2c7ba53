"""The one formula that binds a TLS key (and a verifier's nonce) to a quote.

    REPORTDATA (64 bytes) = SHA-512(b"modelyo-ratls-v1:" || SubjectPublicKeyInfo DER || nonce)

The nonce is the verifier's 32 fresh random bytes, or empty for a quote embedded in a
certificate. The same formula serves SGX and TDX. Hashing the SPKI (not the certificate, which
contains the quote) is what Gramine, EGo and dstack do; the domain tag keeps our REPORTDATA from
ever meaning something in another protocol.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

DOMAIN = b"modelyo-ratls-v1:"
NONCE_SIZE = 32


def spki_der(public_key: PublicKeyTypes) -> bytes:
    """The DER SubjectPublicKeyInfo of a public key."""
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def new_nonce() -> bytes:
    """32 fresh random bytes for a challenge."""
    return secrets.token_bytes(NONCE_SIZE)


def report_data(spki: bytes, nonce: bytes = b"") -> bytes:
    """REPORTDATA binding `spki` (DER SubjectPublicKeyInfo) and an optional 32-byte nonce."""
    if len(nonce) not in (0, NONCE_SIZE):
        raise ValueError(f"a nonce is {NONCE_SIZE} random bytes (or empty), got {len(nonce)}")
    return hashlib.sha512(DOMAIN + spki + nonce).digest()


def matches(quoted: bytes, spki: bytes, nonce: bytes = b"") -> bool:
    """Whether a quote's REPORTDATA binds `spki` and `nonce` (constant-time comparison)."""
    return hmac.compare_digest(quoted, report_data(spki, nonce))
