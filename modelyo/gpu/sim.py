"""Simulated NVIDIA GPUs: a software device PKI and GPUs that sign genuine-layout reports.

For laptops and CI, where there is no GPU. Everything here says SIMULATED: the device root
("Modelyo SIMULATED NVIDIA Device Identity CA", P-384), an intermediate, and one leaf per GPU
(like NVIDIA's "GSP FMC LF" leaf) carrying the firmware id (FWID) in a TCG DICE TcbInfo
extension, as NVIDIA's do. A simulated GPU's attestation report has the byte layout of
`modelyo.gpu.report` and is signed with its leaf's key, so the same verifier runs on it; it
verifies only under this directory's root, never under NVIDIA's.

Measurements are SHA-384 digests derived from the simulated driver and VBIOS versions (there
is no GPU firmware to hash); the reference measurements ("RIM") for those versions are written
beside the keys. A GPU made with `tampered_measurements` reports different values at those
indexes, which verification must catch. Which indexes belong to the VBIOS and which to the
driver is a simulation choice (1-32 VBIOS, 33-64 driver).

State directory (mode 0700; private keys 0600), created on first use under an fcntl lock so
that concurrent processes end with one PKI; a GPU's leaf is created the first time that GPU
index is used, under the same lock:

    state.json            written last: marks a complete state
    device_root.{key,pem}  device_ica.{key,pem}  gpu<N>.{key,pem}
    references.json       reference measurements of the simulated driver and VBIOS
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import os
import secrets
import stat
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from modelyo import der
from modelyo.errors import GpuEvidenceError, PlatformError
from modelyo.files import atomic_write_bytes, atomic_write_text
from modelyo.gpu.reference import ComponentKind, DeviceRoot, ReferenceMeasurements, RimComponent
from modelyo.gpu.report import (
    NONCE_SIZE,
    OPAQUE_CHIP_SKU,
    OPAQUE_DRIVER_VERSION,
    OPAQUE_FWID,
    OPAQUE_MSRSCNT,
    OPAQUE_PROJECT,
    OPAQUE_VBIOS_VERSION,
    MeasurementBlock,
    MeasurementRequest,
    MeasurementsResponse,
    OpaqueField,
    encode_report,
    encode_unsigned,
)

SIMULATED = True
ORGANIZATION = "Modelyo SIMULATED GPU (not NVIDIA)"
ROOT_CN = "Modelyo SIMULATED NVIDIA Device Identity CA"
ICA_CN = "Modelyo SIMULATED GH100 Provisioner ICA"
LEAF_CN = "Modelyo SIMULATED GH100 A01 GSP FMC LF"

GPU_NAME = "NVIDIA H100 80GB HBM3 (SIMULATED)"
GPU_ARCH = "HOPPER"
DRIVER_VERSION = "550.127.05"
VBIOS_VERSION = "96.00.9F.00.04"
MEASUREMENT_COUNT = 64
VBIOS_INDEXES = range(1, 33)
DRIVER_INDEXES = range(33, MEASUREMENT_COUNT + 1)
CC_MODES = ("on", "off", "devtools")
# NVIDIA's request asks the GPU to sign with the certificate in slot 1.
REQUEST_SLOT = 1

# TCG DICE TcbInfo (the extension NVIDIA's verifier reads the FWID from) and SHA-384.
DICE_TCB_INFO_OID = "2.23.133.5.4.1"
SHA384_OID = "2.16.840.1.101.3.4.2.2"

CERT_NOT_BEFORE = dt.datetime(2023, 1, 1, tzinfo=dt.UTC)
CERT_NOT_AFTER = dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC)

STATE_FORMAT = 1
STATE_FILE = "state.json"
REFERENCES_FILE = "references.json"
ROOT_PEM = "device_root.pem"
LOCK_FILE = ".lock"


def default_state_dir() -> Path:
    """`gpu/` inside the simulated platform's directory (`$MODELYO_SIM_DIR`)."""
    from modelyo.tee.sim import default_state_dir as platform_dir

    return platform_dir() / "gpu"


# --- pure helpers: names, DER, measurements ---------------------------------------------------


def dice_tcb_info_der(fwid: bytes, *, vendor: str = ORGANIZATION, model: str = "GH100") -> bytes:
    """TcbInfo ::= SEQUENCE { vendor [0], model [1], fwids [6] SEQUENCE OF FWID } (implicit
    tags), one SHA-384 FWID, so its last 48 bytes are the FWID as NVIDIA's verifier reads it."""
    if len(fwid) != 48:
        raise ValueError("a SHA-384 FWID is 48 bytes")
    fwid_entry = der.tlv(0x30, der.oid(SHA384_OID) + der.tlv(0x04, fwid))
    return der.tlv(
        0x30,
        der.tlv(0x80, vendor.encode()) + der.tlv(0x81, model.encode()) + der.tlv(0xA6, fwid_entry),
    )


def firmware_id(vbios_version: str) -> bytes:
    """The simulated GSP firmware's id: a SHA-384 standing in for the firmware's hash."""
    return hashlib.sha384(f"Modelyo SIMULATED GSP FMC firmware {vbios_version}".encode()).digest()


def simulated_measurement(index: int, driver_version: str, vbios_version: str) -> bytes:
    """The value a genuine simulated GPU reports at `index`."""
    if index in VBIOS_INDEXES:
        component = f"vbios {vbios_version}"
    else:
        component = f"driver {driver_version}"
    return hashlib.sha384(
        f"Modelyo SIMULATED NVIDIA GPU | {component} | measurement {index}".encode()
    ).digest()


def reference_measurements(
    driver_version: str = DRIVER_VERSION, vbios_version: str = VBIOS_VERSION
) -> ReferenceMeasurements:
    """The SIMULATED reference measurements ("RIM") for a simulated driver and VBIOS."""

    def component(kind: ComponentKind, version: str, indexes: range) -> RimComponent:
        values = {i: (simulated_measurement(i, driver_version, vbios_version),) for i in indexes}
        return RimComponent(kind, version, values)

    return ReferenceMeasurements(
        name="Modelyo SIMULATED GPU reference measurements",
        components=(
            component("driver", driver_version, DRIVER_INDEXES),
            component("vbios", vbios_version, VBIOS_INDEXES),
        ),
        simulated=True,
    )


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        ]
    )


def _issue(
    *,
    cn: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    path_length: int | None,
    extra: list[x509.ExtensionType] | None = None,
) -> x509.Certificate:
    """One certificate of the simulated device PKI (`path_length` None makes a leaf)."""
    subject = _name(cn)
    ca = path_length is not None
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(CERT_NOT_BEFORE)
        .not_valid_after(CERT_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    for extension in extra or []:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(issuer_key, hashes.SHA384())


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def sign_p384(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA-P384-SHA384 as SPDM stores it: raw r||s, 48 bytes each, big-endian."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA384())))
    return r.to_bytes(48, "big") + s.to_bytes(48, "big")


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


# --- a simulated GPU --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Identity:
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...]  # leaf, intermediate, root


class SimulatedGpu:
    """One SIMULATED GPU: its identity, versions, CC mode and signed attestation reports."""

    simulated = True
    SIMULATED = True

    def __init__(
        self,
        index: int,
        identity: _Identity,
        *,
        driver_version: str = DRIVER_VERSION,
        vbios_version: str = VBIOS_VERSION,
        cc_mode: str = "on",
        tampered_measurements: Iterable[int] = (),
    ) -> None:
        if cc_mode not in CC_MODES:
            raise PlatformError(f"CC mode must be one of {', '.join(CC_MODES)}, got {cc_mode!r}")
        self.index = index
        self._identity = identity
        self.driver_version = driver_version
        self.vbios_version = vbios_version
        self.cc_mode = cc_mode
        self.tampered_measurements = frozenset(tampered_measurements)
        unknown = sorted(i for i in self.tampered_measurements if not 1 <= i <= MEASUREMENT_COUNT)
        if unknown:
            raise PlatformError(
                f"a simulated GPU has measurements 1..{MEASUREMENT_COUNT}; cannot tamper {unknown}"
            )
        self.name = GPU_NAME
        self.arch = GPU_ARCH

    def __repr__(self) -> str:
        tampered = f" TAMPERED {sorted(self.tampered_measurements)}" if self.tampered else ""
        return f"<SimulatedGpu {self.index} SIMULATED {self.uuid} CC {self.cc_mode}{tampered}>"

    @property
    def tampered(self) -> bool:
        return bool(self.tampered_measurements)

    @property
    def uuid(self) -> str:
        """Stable per GPU: derived from its leaf key, like a serial number."""
        point = self._identity.key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return f"GPU-{uuid.UUID(bytes=hashlib.sha256(point).digest()[:16])}"

    @property
    def fwid(self) -> bytes:
        return firmware_id(self.vbios_version)

    def measurements(self) -> dict[int, bytes]:
        """Index -> SHA-384 value this GPU reports (differing where it was tampered with)."""
        values = {}
        for index in range(1, MEASUREMENT_COUNT + 1):
            value = simulated_measurement(index, self.driver_version, self.vbios_version)
            if index in self.tampered_measurements:
                value = hashlib.sha384(b"TAMPERED " + value).digest()
            values[index] = value
        return values

    def certificate_chain_pem(self) -> list[str]:
        """The device chain as NVML gives it: leaf first, then intermediate, then root."""
        return [_pem(cert) for cert in self._identity.chain]

    def attestation_report(self, nonce: bytes) -> bytes:
        """A signed SPDM GET_MEASUREMENTS request || MEASUREMENTS response over `nonce`."""
        if not isinstance(nonce, bytes | bytearray) or len(nonce) != NONCE_SIZE:
            raise GpuEvidenceError(
                f"the GPU nonce must be exactly {NONCE_SIZE} bytes (REPORTDATA[0:32])"
            )
        request = MeasurementRequest(nonce=bytes(nonce), slot_id=REQUEST_SLOT)
        counts = b"".join((1).to_bytes(4, "little") for _ in range(MEASUREMENT_COUNT))
        response = MeasurementsResponse(
            blocks=tuple(
                MeasurementBlock(index=i, value=v) for i, v in sorted(self.measurements().items())
            ),
            nonce=secrets.token_bytes(NONCE_SIZE),
            opaque=(
                OpaqueField(OPAQUE_DRIVER_VERSION, self.driver_version.encode() + b"\0"),
                OpaqueField(OPAQUE_VBIOS_VERSION, self.vbios_version.encode() + b"\0"),
                OpaqueField(OPAQUE_PROJECT, b"SIMULATED\0"),
                OpaqueField(OPAQUE_CHIP_SKU, b"SIM\0"),
                OpaqueField(OPAQUE_FWID, self.fwid),
                OpaqueField(OPAQUE_MSRSCNT, counts),
            ),
            param2=REQUEST_SLOT,
        )
        signature = sign_p384(self._identity.key, encode_unsigned(request, response))
        return encode_report(request, dataclasses.replace(response, signature=signature))


# --- the state directory ----------------------------------------------------------------------


class SimulatedGpuPlatform:
    """A persistent SIMULATED device PKI and its GPUs. State is read or created on first use."""

    simulated = True
    SIMULATED = True

    def __init__(self, state_dir: Path | str | None = None) -> None:
        self._dir = Path(state_dir).expanduser() if state_dir is not None else None
        self._lock = threading.Lock()
        self._cas: tuple[_Identity, _Identity] | None = None
        self._leaves: dict[int, _Identity] = {}

    def __repr__(self) -> str:
        return f"<SimulatedGpuPlatform SIMULATED state_dir={str(self.state_dir)!r}>"

    @property
    def state_dir(self) -> Path:
        return self._dir if self._dir is not None else default_state_dir()

    @property
    def root_path(self) -> Path:
        """The SIMULATED device root certificate (PEM), to configure as a trusted root."""
        self._authorities()
        return self.state_dir / ROOT_PEM

    @property
    def references_path(self) -> Path:
        """The SIMULATED reference measurements file, to configure as the references."""
        self._authorities()
        return self.state_dir / REFERENCES_FILE

    def device_root(self) -> DeviceRoot:
        """The SIMULATED device root, trusted only by explicit choice."""
        root = self._authorities()[1].chain[0]
        return DeviceRoot(f"SIMULATED GPU device root ({self.state_dir})", root, simulated=True)

    def reference_measurements(self) -> ReferenceMeasurements:
        return ReferenceMeasurements.from_file(self.references_path)

    def gpu(
        self,
        index: int,
        *,
        cc_mode: str = "on",
        tampered_measurements: Iterable[int] = (),
    ) -> SimulatedGpu:
        """GPU `index` (its identity is created on first use and kept)."""
        if not isinstance(index, int) or not 0 <= index < 64:
            raise PlatformError(f"a simulated GPU index is 0..63, got {index!r}")
        return SimulatedGpu(
            index,
            self._leaf(index),
            cc_mode=cc_mode,
            tampered_measurements=tampered_measurements,
        )

    # --- loading and creating -----------------------------------------------------------

    def _authorities(self) -> tuple[_Identity, _Identity]:
        """(intermediate, root) identities."""
        if self._cas is None:
            with self._lock:
                if self._cas is None:
                    with self._locked_dir() as directory:
                        if not (directory / STATE_FILE).exists():
                            _create_state(directory)
                        self._cas = _load_authorities(directory)
        return self._cas

    def _leaf(self, index: int) -> _Identity:
        ica, root = self._authorities()
        with self._lock:
            if index not in self._leaves:
                with self._locked_dir() as directory:
                    self._leaves[index] = _load_or_create_leaf(directory, index, ica, root)
            return self._leaves[index]

    @contextlib.contextmanager
    def _locked_dir(self) -> Iterator[Path]:
        directory = self.state_dir
        try:
            # Every directory created here is private, parents too: the default state lives
            # inside the simulated platform's directory, which must stay 0700.
            missing = [d for d in (directory, *directory.parents) if not d.exists()]
            for created in reversed(missing):
                created.mkdir(mode=0o700, exist_ok=True)
                os.chmod(created, 0o700)  # a umask can only remove bits; make sure of ours
            mode = stat.S_IMODE(directory.stat().st_mode)
            if mode & 0o077:
                raise PlatformError(
                    f"simulated GPU directory {directory} is open to other users (mode "
                    f"{mode:03o}); run `chmod 700 {directory}`"
                )
            fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise PlatformError(
                f"cannot use the simulated GPU directory {directory}: {exc.strerror or exc}; "
                "check its permissions or choose another state directory"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield directory
        finally:
            os.close(fd)  # closing releases the lock


def _write_pair(
    directory: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> None:
    # The key first: a certificate on disk always has its key beside it.
    atomic_write_bytes(directory / f"{stem}.key", _key_pem(key), mode=0o600)
    atomic_write_text(directory / f"{stem}.pem", _pem(cert), mode=0o644)


def _create_state(directory: Path) -> None:
    root_key = _new_key()
    root = _issue(
        cn=ROOT_CN,
        public_key=root_key.public_key(),
        issuer=None,
        issuer_key=root_key,
        path_length=2,
    )
    ica_key = _new_key()
    ica = _issue(
        cn=ICA_CN,
        public_key=ica_key.public_key(),
        issuer=root,
        issuer_key=root_key,
        path_length=0,
    )
    _write_pair(directory, "device_root", root_key, root)
    _write_pair(directory, "device_ica", ica_key, ica)
    atomic_write_text(directory / REFERENCES_FILE, reference_measurements().to_json())
    document = {
        "format": STATE_FORMAT,
        "SIMULATED": True,
        "description": "Modelyo SIMULATED NVIDIA GPUs: their reports verify only under this "
        f"directory's {ROOT_PEM}, never under NVIDIA's device root",
        "driver_version": DRIVER_VERSION,
        "vbios_version": VBIOS_VERSION,
    }
    atomic_write_text(directory / STATE_FILE, json.dumps(document, indent=2) + "\n")


def _corrupt(directory: Path, what: str) -> PlatformError:
    return PlatformError(
        f"simulated GPU state in {directory} is damaged ({what}); remove the directory to "
        "create new simulated GPUs (evidence of the old ones will no longer verify)"
    )


def _load_pair(directory: Path, stem: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_path = directory / f"{stem}.key"
    try:
        mode = stat.S_IMODE(key_path.stat().st_mode)
        if mode & 0o077:
            raise PlatformError(
                f"private key {key_path} is readable by other users (mode {mode:03o}); "
                f"run `chmod 600 {key_path}`"
            )
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        cert = x509.load_pem_x509_certificate((directory / f"{stem}.pem").read_bytes())
    except FileNotFoundError as exc:
        raise _corrupt(directory, f"{Path(exc.filename).name} is missing") from None
    except (ValueError, TypeError) as exc:
        raise _corrupt(directory, f"{stem}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp384r1":
        raise _corrupt(directory, f"{stem}.key is not a P-384 key")
    if cert.public_key() != key.public_key():
        raise _corrupt(directory, f"{stem}.key does not match {stem}.pem")
    return key, cert


def _load_authorities(directory: Path) -> tuple[_Identity, _Identity]:
    try:
        doc = json.loads((directory / STATE_FILE).read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise _corrupt(directory, f"{STATE_FILE}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise PlatformError(
            f"simulated GPU state in {directory} has another format; remove the directory to "
            "create new simulated GPUs"
        )
    root_key, root = _load_pair(directory, "device_root")
    ica_key, ica = _load_pair(directory, "device_ica")
    return _Identity(ica_key, (ica, root)), _Identity(root_key, (root,))


def _load_or_create_leaf(directory: Path, index: int, ica: _Identity, root: _Identity) -> _Identity:
    stem = f"gpu{index}"
    if not (directory / f"{stem}.pem").exists():
        key = _new_key()
        tcb_info = x509.UnrecognizedExtension(
            x509.ObjectIdentifier(DICE_TCB_INFO_OID), dice_tcb_info_der(firmware_id(VBIOS_VERSION))
        )
        cert = _issue(
            cn=f"{LEAF_CN} (GPU {index})",
            public_key=key.public_key(),
            issuer=ica.chain[0],
            issuer_key=ica.key,
            path_length=None,
            extra=[tcb_info],
        )
        _write_pair(directory, stem, key, cert)
    key, cert = _load_pair(directory, stem)
    return _Identity(key, (cert, ica.chain[0], root.chain[0]))
