"""The simulated platform's fake Intel PKI: root CA, PCK Platform CA, PCK leaf, TCB signing.

The shapes copy Intel's SGX PKI (P-256, ECDSA-SHA256, the same extensions and key usages, a
DER-encoded SGX extension in the PCK leaf, CRL Distribution Points everywhere), so that the
same verifier that checks hardware quotes (dcap-qvl, and Intel's QVL) accepts the chain when,
and only when, it is told to trust the simulation root. Every subject name says SIMULATED, and
keeps the phrase Intel's QVL looks for in each role ("SGX Root CA", "CA", "SGX PCK
Certificate", "SGX TCB Signing"); the intermediate's name contains "Platform", which dcap-qvl
uses to pick the PCK CRL (`ca=platform`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from modelyo import der

SIMULATED = True

ORGANIZATION = "Modelyo SIMULATED platform (not Intel)"
ROOT_CA_CN = "Modelyo SIMULATED SGX Root CA"
PLATFORM_CA_CN = "Modelyo SIMULATED SGX PCK Platform CA"
PCK_CN = "Modelyo SIMULATED SGX PCK Certificate"
TCB_SIGNING_CN = "Modelyo SIMULATED SGX TCB Signing"

# `.invalid` is reserved (RFC 2606): nothing ever resolves, so no verifier can fetch these,
# yet Intel's QVL insists that every certificate carries a CRL Distribution Point.
ROOT_CRL_URL = "https://sim.modelyo.invalid/sgx/certification/v4/rootcacrl"
PCK_CRL_URL = "https://sim.modelyo.invalid/sgx/certification/v4/pckcrl?ca=platform&encoding=der"

# Certificates are valid from long before any plausible pinned verification time to Intel's own
# root expiry, so tests may verify at a fixed past `now` and a stored platform never expires.
CERT_NOT_BEFORE = dt.datetime(2018, 1, 1, tzinfo=dt.UTC)
CERT_NOT_AFTER = dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC)

SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"
SGX_TYPE_STANDARD = 0
SGX_TYPE_SCALABLE = 1


def _entry(oid: str, value: bytes) -> bytes:
    return der.sequence(der.oid(oid), value)


def sgx_extension_der(
    *,
    ppid: bytes,
    cpu_svn: bytes,
    pce_svn: int,
    pce_id: bytes,
    fmspc: bytes,
    sgx_type: int = SGX_TYPE_SCALABLE,
    platform_instance_id: bytes | None = None,
    dynamic_platform: bool = True,
    cached_keys: bool = True,
    smt_enabled: bool = True,
) -> bytes:
    """The DER value of the PCK certificate's SGX extension (OID 1.2.840.113741.1.13.1).

    A SEQUENCE of (OID, value) pairs, laid out like Intel's: PPID, TCB (16 component SVNs equal
    to the CPUSVN bytes, PCESVN, CPUSVN), PCE-ID, FMSPC, SGX type and, for Platform-CA
    certificates (`platform_instance_id` given), the instance id and configuration flags.
    """
    if len(ppid) != 16 or len(cpu_svn) != 16 or len(pce_id) != 2 or len(fmspc) != 6:
        raise ValueError("PPID and CPUSVN are 16 bytes, PCE-ID 2 and FMSPC 6")
    base = SGX_EXTENSION_OID
    tcb = [
        _entry(f"{base}.2.{i + 1}", der.tlv(0x02, der.unsigned(svn)))
        for i, svn in enumerate(cpu_svn)
    ]
    tcb.append(_entry(f"{base}.2.17", der.tlv(0x02, der.unsigned(pce_svn))))
    tcb.append(_entry(f"{base}.2.18", der.tlv(0x04, cpu_svn)))
    entries = [
        _entry(f"{base}.1", der.tlv(0x04, ppid)),
        _entry(f"{base}.2", der.sequence(*tcb)),
        _entry(f"{base}.3", der.tlv(0x04, pce_id)),
        _entry(f"{base}.4", der.tlv(0x04, fmspc)),
        _entry(f"{base}.5", der.tlv(0x0A, der.unsigned(sgx_type))),
    ]
    if platform_instance_id is not None:
        if len(platform_instance_id) != 16:
            raise ValueError("the platform instance id is 16 bytes")

        def flag(index: int, value: bool) -> bytes:
            return _entry(f"{base}.7.{index}", der.tlv(0x01, b"\xff" if value else b"\x00"))

        entries.append(_entry(f"{base}.6", der.tlv(0x04, platform_instance_id)))
        entries.append(
            _entry(
                f"{base}.7",
                der.sequence(flag(1, dynamic_platform), flag(2, cached_keys), flag(3, smt_enabled)),
            )
        )
    return der.sequence(*entries)


# --- certificates and CRLs ----------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        ]
    )


def _crl_dp(url: str) -> x509.CRLDistributionPoints:
    return x509.CRLDistributionPoints(
        [x509.DistributionPoint([x509.UniformResourceIdentifier(url)], None, None, None)]
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    # Intel's CAs: keyCertSign + cRLSign; its leaves: digitalSignature + nonRepudiation.
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=not ca,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def issue_certificate(
    *,
    subject_cn: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    ca_path_length: int | None,
    crl_url: str,
    extra: list[x509.ExtensionType] | None = None,
) -> x509.Certificate:
    """Issue one certificate of the simulated PKI (`issuer=None` makes it self-signed).

    `ca_path_length` None makes a leaf; an int makes a CA with that pathLen.
    """
    subject = _name(subject_cn)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(CERT_NOT_BEFORE)
        .not_valid_after(CERT_NOT_AFTER)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .add_extension(_crl_dp(crl_url), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_key_usage(ca=ca_path_length is not None), critical=True)
        .add_extension(
            x509.BasicConstraints(ca=ca_path_length is not None, path_length=ca_path_length),
            critical=True,
        )
    )
    for extension in extra or []:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def issue_crl(
    *,
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    number: int,
    this_update: dt.datetime,
    next_update: dt.datetime,
    revoked_serials: tuple[int, ...] = (),
) -> bytes:
    """A DER CRL with CRLNumber and AuthorityKeyIdentifier, as Intel's are."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    for serial in revoked_serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(this_update)
            .build()
        )
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 key, the only curve DCAP uses."""
    return ec.generate_private_key(ec.SECP256R1())


def sign_raw(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA-P256-SHA256 signature as DCAP stores it: raw r||s, 32 bytes each, big-endian."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def raw_public_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The public key as DCAP stores it: x||y without the 0x04 prefix."""
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return point[1:]


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class SimulatedPki:
    """The keys and certificates of the simulated Intel PKI."""

    root_key: ec.EllipticCurvePrivateKey
    root_cert: x509.Certificate
    platform_ca_key: ec.EllipticCurvePrivateKey
    platform_ca_cert: x509.Certificate
    pck_key: ec.EllipticCurvePrivateKey
    pck_cert: x509.Certificate
    tcb_signing_key: ec.EllipticCurvePrivateKey
    tcb_signing_cert: x509.Certificate

    def pairs(self) -> dict[str, tuple[ec.EllipticCurvePrivateKey, x509.Certificate]]:
        return {
            "root_ca": (self.root_key, self.root_cert),
            "platform_ca": (self.platform_ca_key, self.platform_ca_cert),
            "pck": (self.pck_key, self.pck_cert),
            "tcb_signing": (self.tcb_signing_key, self.tcb_signing_cert),
        }

    @classmethod
    def from_pairs(
        cls, pairs: dict[str, tuple[ec.EllipticCurvePrivateKey, x509.Certificate]]
    ) -> SimulatedPki:
        return cls(
            root_key=pairs["root_ca"][0],
            root_cert=pairs["root_ca"][1],
            platform_ca_key=pairs["platform_ca"][0],
            platform_ca_cert=pairs["platform_ca"][1],
            pck_key=pairs["pck"][0],
            pck_cert=pairs["pck"][1],
            tcb_signing_key=pairs["tcb_signing"][0],
            tcb_signing_cert=pairs["tcb_signing"][1],
        )

    def pck_chain_pem(self) -> bytes:
        """The quote's certification data: PCK leaf, Platform CA, root (PEM, NUL-terminated
        like the chains Intel's QE emits)."""
        return (
            cert_pem(self.pck_cert)
            + cert_pem(self.platform_ca_cert)
            + cert_pem(self.root_cert)
            + b"\0"
        )

    def pck_crl_issuer_chain(self) -> str:
        return (cert_pem(self.platform_ca_cert) + cert_pem(self.root_cert)).decode("ascii")

    def tcb_issuer_chain(self) -> str:
        return (cert_pem(self.tcb_signing_cert) + cert_pem(self.root_cert)).decode("ascii")

    def root_crl(self, this_update: dt.datetime, next_update: dt.datetime) -> bytes:
        """The root CA CRL (covers the Platform CA and the TCB signing certificate)."""
        return issue_crl(
            issuer=self.root_cert,
            issuer_key=self.root_key,
            number=_crl_number(this_update),
            this_update=this_update,
            next_update=next_update,
        )

    def pck_crl(
        self,
        this_update: dt.datetime,
        next_update: dt.datetime,
        revoked_serials: tuple[int, ...] = (),
    ) -> bytes:
        """The PCK Platform CA CRL (covers PCK leaf certificates)."""
        return issue_crl(
            issuer=self.platform_ca_cert,
            issuer_key=self.platform_ca_key,
            number=_crl_number(this_update),
            this_update=this_update,
            next_update=next_update,
            revoked_serials=revoked_serials,
        )


def _crl_number(this_update: dt.datetime) -> int:
    # CRL numbers must grow with each issue; the issue time in seconds does, without state.
    return int(this_update.timestamp())


def create_pki(
    *,
    ppid: bytes,
    cpu_svn: bytes,
    pce_svn: int,
    pce_id: bytes,
    fmspc: bytes,
    platform_instance_id: bytes,
) -> SimulatedPki:
    """Generate a new simulated PKI whose PCK leaf certifies the given platform TCB."""
    root_key = new_key()
    root_cert = issue_certificate(
        subject_cn=ROOT_CA_CN,
        public_key=root_key.public_key(),
        issuer=None,
        issuer_key=root_key,
        ca_path_length=1,
        crl_url=ROOT_CRL_URL,
    )
    platform_ca_key = new_key()
    platform_ca_cert = issue_certificate(
        subject_cn=PLATFORM_CA_CN,
        public_key=platform_ca_key.public_key(),
        issuer=root_cert,
        issuer_key=root_key,
        ca_path_length=0,
        crl_url=ROOT_CRL_URL,
    )
    pck_key = new_key()
    extension = sgx_extension_der(
        ppid=ppid,
        cpu_svn=cpu_svn,
        pce_svn=pce_svn,
        pce_id=pce_id,
        fmspc=fmspc,
        platform_instance_id=platform_instance_id,
    )
    pck_cert = issue_certificate(
        subject_cn=PCK_CN,
        public_key=pck_key.public_key(),
        issuer=platform_ca_cert,
        issuer_key=platform_ca_key,
        ca_path_length=None,
        crl_url=PCK_CRL_URL,
        extra=[x509.UnrecognizedExtension(x509.ObjectIdentifier(SGX_EXTENSION_OID), extension)],
    )
    tcb_signing_key = new_key()
    tcb_signing_cert = issue_certificate(
        subject_cn=TCB_SIGNING_CN,
        public_key=tcb_signing_key.public_key(),
        issuer=root_cert,
        issuer_key=root_key,
        ca_path_length=None,
        crl_url=ROOT_CRL_URL,
    )
    return SimulatedPki(
        root_key=root_key,
        root_cert=root_cert,
        platform_ca_key=platform_ca_key,
        platform_ca_cert=platform_ca_cert,
        pck_key=pck_key,
        pck_cert=pck_cert,
        tcb_signing_key=tcb_signing_key,
        tcb_signing_cert=tcb_signing_cert,
    )
