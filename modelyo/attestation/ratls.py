"""RA-TLS: TLS certificates whose key is bound to a hardware quote.

A service makes a fresh TLS key, asks its platform for a quote with
REPORTDATA = binding.report_data(SPKI, nonce=b"") and puts the quote in a non-critical X.509
extension of its certificate (OID `QUOTE_OID`, the raw quote bytes as the extension value). A
client that sees the certificate in a TLS handshake checks the quote with `verify_certificate`.
For freshness the client may also send a 32-byte nonce to the service's attestation endpoint and
check the returned quote with `verify_challenge`, which binds the same key and that nonce.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import time
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from modelyo.attestation import binding
from modelyo.attestation.collateral import Collateral
from modelyo.attestation.policy import SgxPolicy, TdxPolicy
from modelyo.attestation.verify import TrustRoot, Verdict, verify_quote
from modelyo.tee.provider import QuoteProvider

# An OID derived from a UUID (ITU-T X.667 arc 2.25), so it needs no registration and cannot
# collide with Gramine's, Intel's or dstack's extensions.
QUOTE_OID = x509.ObjectIdentifier("2.25.202665804052297466163583535060445023491")
# How long a service certificate lives; services restart with a fresh key and quote far sooner.
DEFAULT_VALIDITY = dt.timedelta(days=365)


def new_tls_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 key for a TLS service or client."""
    return ec.generate_private_key(ec.SECP256R1())


def _subject_alt_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def create_certificate(
    provider: QuoteProvider,
    key: ec.EllipticCurvePrivateKey,
    *,
    common_name: str,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    validity: dt.timedelta = DEFAULT_VALIDITY,
) -> x509.Certificate:
    """A self-signed TLS server certificate for `key` carrying a quote that binds it."""
    quote = provider.get_quote(binding.report_data(binding.spki_der(key.public_key())))
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_subject_alt_names(hosts), critical=False)
        .add_extension(x509.UnrecognizedExtension(QUOTE_OID, quote), critical=False)
    )
    return builder.sign(key, hashes.SHA256())


def quote_from_certificate(cert: x509.Certificate) -> bytes | None:
    """The quote embedded in an RA-TLS certificate, or None when it carries none."""
    try:
        ext = cert.extensions.get_extension_for_oid(QUOTE_OID)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    return value.value if isinstance(value, x509.UnrecognizedExtension) else None


def verify_certificate(
    cert: x509.Certificate,
    collateral: Collateral,
    *,
    root: TrustRoot,
    policy: SgxPolicy | TdxPolicy | None,
    policy_name: str = "",
    now: int | None = None,
) -> Verdict:
    """Check that `cert` carries a valid quote that binds its own public key."""
    quote = quote_from_certificate(cert)
    if quote is None:
        verdict = Verdict(
            root=root.name,
            simulated=root.simulated,
            checked_at=int(time.time()) if now is None else now,
        )
        verdict.add(
            "certificate",
            False,
            "the certificate carries no Modelyo quote extension: the peer is not an attested "
            "Modelyo service (wrong address, or a machine in the middle)",
        )
        return verdict
    spki = binding.spki_der(cert.public_key())
    return verify_quote(
        quote,
        collateral,
        root=root,
        now=now,
        policy=policy,
        policy_name=policy_name,
        expected_report_data=binding.report_data(spki),
    )


def verify_challenge(
    quote: bytes,
    nonce: bytes,
    peer_cert: x509.Certificate,
    collateral: Collateral,
    *,
    root: TrustRoot,
    policy: SgxPolicy | TdxPolicy | None,
    policy_name: str = "",
    now: int | None = None,
) -> Verdict:
    """Check a fresh quote answering our `nonce` that binds the TLS key we are talking to."""
    spki = binding.spki_der(peer_cert.public_key())
    return verify_quote(
        quote,
        collateral,
        root=root,
        now=now,
        policy=policy,
        policy_name=policy_name,
        expected_report_data=binding.report_data(spki, nonce),
    )
