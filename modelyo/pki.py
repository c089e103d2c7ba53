"""X.509 for Modelyo: keys, CSRs, the certificates the CA and the agent issue, and their roles.

Who holds what:
- The CA has a root (self-signed, persistent, sealed). It issues its own TLS server certificate,
  the owner's client certificate (role `owner`), and for each attested TDX VM a server
  certificate (role `vm-server`), a client certificate for key access (role `vm`) and an
  intermediate CA (pathLen 0) with which the VM signs its own owner's client certificate
  (role `vm-owner`).
- A certificate's role is the OrganizationalUnit of its subject. Roles are trusted only after
  the certificate has been verified to chain to the issuer the service pins, so a role is never
  taken from a certificate that someone else could have made.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from modelyo.errors import ConfigError, ModelyoError
from modelyo.files import atomic_write_bytes

ORGANIZATION = "Modelyo"
# Long enough not to bother users, short enough that a lost laptop's key does not live forever.
CLIENT_VALIDITY = dt.timedelta(days=397)
SERVER_VALIDITY = dt.timedelta(days=397)
ROOT_VALIDITY = dt.timedelta(days=20 * 365)
# Tolerate clock skew between the CA, the VM and the user's machine.
BACKDATE = dt.timedelta(minutes=5)


class Role(StrEnum):
    """What a certificate may do, written in its subject's OU."""

    CA_ROOT = "ca-root"
    CA_SERVER = "ca-server"
    OWNER = "owner"  # the tool, towards the CA
    VM = "vm"  # a TDX VM, towards the CA (key access)
    VM_SERVER = "vm-server"  # a TDX VM's TLS server certificate
    VM_ISSUER = "vm-issuer"  # a TDX VM's intermediate CA for its owner's certificate
    VM_OWNER = "vm-owner"  # the tool, towards a TDX VM


class CertificateError(ModelyoError):
    """A certificate or CSR is invalid, of the wrong role, or not issued by the expected CA."""


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str, role: Role) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_csr(key: ec.EllipticCurvePrivateKey, common_name: str) -> x509.CertificateSigningRequest:
    """A CSR for `key`; the issuer decides the role, so the CSR carries only a name."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())


def load_csr(pem: str | bytes) -> x509.CertificateSigningRequest:
    """Parse a PEM CSR and check its self-signature (proof the requester holds the key)."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        raise CertificateError("the CSR is not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise CertificateError("the CSR's signature does not verify: it was altered")
    if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey):
        raise CertificateError("the CSR's key must be an EC key (P-256)")
    return csr


def _subject_alt_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def create_root(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new self-signed root CA key and certificate."""
    key = new_key()
    name = _name(common_name, Role.CA_ROOT)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + ROOT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=True,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def issue(
    public_key: ec.EllipticCurvePublicKey,
    *,
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer_cert: x509.Certificate,
    role: Role,
    common_name: str,
    hosts: Sequence[str] = (),
    validity: dt.timedelta | None = None,
    extensions: Sequence[x509.ExtensionType] = (),
) -> x509.Certificate:
    """Issue a certificate of `role` for `public_key`, signed by the issuer.

    Server roles get serverAuth and the `hosts` as SANs; client roles get clientAuth;
    `VM_ISSUER` is an intermediate CA that may only sign end-entity certificates.
    """
    now = dt.datetime.now(dt.UTC)
    is_ca = role is Role.VM_ISSUER
    server = role in (Role.CA_SERVER, Role.VM_SERVER)
    if validity is None:
        validity = SERVER_VALIDITY if server else CLIENT_VALIDITY
    # Never outlive the issuer: a chain is only as valid as its shortest link.
    not_after = min(now + validity, issuer_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, role))
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(
            x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), critical=True
        )
        .add_extension(_ca_key_usage() if is_ca else _leaf_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if not is_ca:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if hosts:
        builder = builder.add_extension(_subject_alt_names(hosts), critical=False)
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def role_of(cert: x509.Certificate) -> Role | None:
    """The role written in a certificate's subject (only meaningful once its chain is checked)."""
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(units) != 1:
        return None
    try:
        return Role(str(units[0].value))
    except ValueError:
        return None


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lowercase hex: what users compare and logs record."""
    return cert.fingerprint(hashes.SHA256()).hex()


def issued_by(
    cert: x509.Certificate, issuer: x509.Certificate, *, now: dt.datetime | None = None
) -> bool:
    """Whether `issuer` signed `cert` and `cert` is within its validity period."""
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    at = now or dt.datetime.now(dt.UTC)
    return cert.not_valid_before_utc <= at <= cert.not_valid_after_utc


def verify_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    root: x509.Certificate,
    *,
    role: Role | None = None,
) -> None:
    """Check that `leaf` chains to `root` through `intermediates` (in order) and has `role`."""
    chain = [leaf, *intermediates]
    for child, parent in zip(chain, [*intermediates, root], strict=True):
        if not issued_by(child, parent):
            raise CertificateError(
                f"certificate {common_name(child)!r} is not validly issued by "
                f"{common_name(parent)!r} (wrong CA, expired, or altered)"
            )
    if role is not None and role_of(leaf) is not role:
        raise CertificateError(
            f"certificate {common_name(leaf)!r} has role {role_of(leaf)}, expected {role}"
        )


# --- PEM and files --------------------------------------------------------------------------


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def csr_pem(csr: x509.CertificateSigningRequest) -> str:
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def load_cert(pem: str | bytes) -> x509.Certificate:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CertificateError("not a PEM X.509 certificate") from None


def load_certs(pem: str | bytes) -> list[x509.Certificate]:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateError("not a PEM X.509 certificate chain") from None


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise CertificateError("not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError("the private key must be an EC key (P-256)")
    return key


def write_private_key(path: str | os.PathLike[str], key: ec.EllipticCurvePrivateKey) -> None:
    """Write a private key atomically with mode 0600 (never readable by others, even briefly)."""
    atomic_write_bytes(path, private_key_pem(key), mode=0o600)


def read_private_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePrivateKey:
    """Read a private key, refusing one that others may read."""
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o777
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read private key {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise ConfigError(
            f"private key {path} is readable by others (mode {mode:o}); run `chmod 600 {path}`"
        )
    return load_private_key(data)


def write_cert(path: str | os.PathLike[str], *certs: x509.Certificate) -> None:
    """Write one certificate or a chain (leaf first) as PEM, atomically."""
    atomic_write_bytes(path, "".join(cert_pem(c) for c in certs).encode("ascii"))
