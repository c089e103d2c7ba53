"""The simulated platform: a software "Intel" that emits genuine-layout DCAP quotes.

Its state (the fake PKI, the quoting enclaves' attestation keys and identities, FMSPC, SVNs
and a platform secret) lives in one directory, created on first use with mode 0700; private
keys and the secret are 0600. Creation happens under an fcntl lock, so two processes starting
at once (the CA and the agent under `modelyo dev up`) end with one platform; later instances
load the same keys, so quotes stay verifiable across restarts.

Quotes verify with dcap-qvl exactly like hardware quotes, under this platform's root CA and
never under Intel's. Everything a caller may display carries SIMULATED.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import secrets
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from modelyo.attestation.collateral import Collateral
from modelyo.attestation.quote import (
    ATT_KEY_TYPE_ECDSA_P256,
    CERT_TYPE_PCK_CHAIN,
    INTEL_QE_VENDOR_ID,
    SGX_ATTRIBUTE_DEBUG,
    TD_ATTRIBUTE_DEBUG,
    TD_ATTRIBUTE_SEPT_VE_DISABLE,
    TEE_TYPE_SGX,
    TEE_TYPE_TDX,
    QuoteHeader,
    SgxReportBody,
    SignatureData,
    TdReportBody,
    encode_quote,
    encode_signed_region,
    qe_report_data,
)
from modelyo.errors import PlatformError
from modelyo.files import atomic_write_bytes
from modelyo.tee.provider import QuoteProvider, Tee, check_report_data
from modelyo.tee.sim.collateral import PlatformTcb, QeIdentity, issue_collateral
from modelyo.tee.sim.pki import (
    SimulatedPki,
    cert_pem,
    create_pki,
    key_pem,
    new_key,
    raw_public_key,
    sign_raw,
)

SIMULATED = True
PLATFORM_NAME = "Modelyo SIMULATED platform (software, not Intel hardware)"

ENV_STATE_DIR = "MODELYO_SIM_DIR"
STATE_FORMAT = 1
STATE_FILE = "platform.json"  # written last: its presence marks a complete platform
SECRET_FILE = "platform_secret.bin"  # noqa: S105 (a file name, not a secret)
LOCK_FILE = ".lock"
PKI_NAMES = ("root_ca", "platform_ca", "pck", "tcb_signing")

# Platform TCB of a new simulated platform, shaped like real ones (CPUSVN bytes double as the
# 16 TCB component SVNs; TEE_TCB_SVN = TDX module ISVSVN 6, module major version 1, ...).
DEFAULT_CPU_SVN = bytes([3, 3, 2, 2, 4, 1, 0, 5] + [0] * 8)
DEFAULT_PCE_SVN = 13
DEFAULT_TEE_TCB_SVN = bytes([6, 1, 3] + [0] * 13)
PCE_ID = bytes(2)
QE_ISV_PROD_ID = {Tee.SGX: 1, Tee.TDX: 2}  # Intel's: QE is product 1, TD_QE product 2
QE_ISV_SVN = {Tee.SGX: 8, Tee.TDX: 4}

# The QE's own report: INIT | MODE64BIT | PROVISIONKEY, XFRM 0xE7, as Intel's QE reports.
QE_REPORT_ATTRIBUTES = bytes.fromhex("1500000000000000e700000000000000")
# Intel's QE fills its 32 bytes of auth data with 0..31; dcap-qvl accepts only 32 bytes.
QE_AUTH_DATA = bytes(range(32))
ENCLAVE_XFRM = 0xE7
TD_XFAM = bytes.fromhex("e702060000000000")


def default_state_dir() -> Path:
    """`$MODELYO_SIM_DIR`, else `~/.local/share/modelyo/sim`."""
    configured = os.environ.get(ENV_STATE_DIR)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".local" / "share" / "modelyo" / "sim"


@dataclass(frozen=True)
class _State:
    """Everything the platform persists."""

    pki: SimulatedPki
    tcb: PlatformTcb
    ppid: bytes
    platform_instance_id: bytes
    qe_id: bytes
    mr_seam: bytes
    quoting_enclaves: dict[Tee, QeIdentity]
    attestation_keys: dict[Tee, ec.EllipticCurvePrivateKey]
    secret: bytes


class SimulatedQuoteProvider(QuoteProvider):
    """Quotes from the simulated platform for one enclave or TD. SIMULATED, never hardware."""

    simulated = True
    SIMULATED = True

    def __init__(
        self,
        platform: SimulatedPlatform,
        tee: Tee,
        body: SgxReportBody | TdReportBody,
        label: str,
    ) -> None:
        self.tee = tee
        self._platform = platform
        self._body = body
        self._label = label

    @property
    def name(self) -> str:
        return f"SIMULATED {self.tee} {self._label} (Modelyo software platform, not hardware)"

    @property
    def platform(self) -> SimulatedPlatform:
        return self._platform

    @property
    def body(self) -> SgxReportBody | TdReportBody:
        """The report body every quote carries (with REPORTDATA zero here)."""
        return self._body

    def get_quote(self, report_data: bytes) -> bytes:
        """An SGX v3 or TDX v4 quote over `report_data`, signed by the simulated QE."""
        body = dataclasses.replace(self._body, report_data=check_report_data(report_data))
        return self._platform._quote(self.tee, body)

    def __repr__(self) -> str:
        return f"<SimulatedQuoteProvider {self.name}>"


class SimulatedPlatform:
    """A persistent software "Intel": PKI, quoting enclaves, collateral. SIMULATED.

    The state directory is read (or created) on first use, not on construction.
    """

    SIMULATED = True
    simulated = True
    name = PLATFORM_NAME

    def __init__(self, state_dir: Path | str | None = None) -> None:
        self._dir = Path(state_dir).expanduser() if state_dir is not None else None
        self._loaded: _State | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<SimulatedPlatform SIMULATED state_dir={str(self.state_dir)!r}>"

    @property
    def state_dir(self) -> Path:
        """Where the platform's keys and identity live."""
        return self._dir if self._dir is not None else default_state_dir()

    # --- public API ---------------------------------------------------------------------

    @property
    def platform_secret(self) -> bytes:
        """32 random bytes unique to this platform; simulated sealing keys derive from it."""
        return self._state.secret

    @property
    def fmspc(self) -> bytes:
        return self._state.tcb.fmspc

    def qe_identity(self, tee: Tee | str) -> QeIdentity:
        """The identity of the quoting enclave that signs this platform's `tee` quotes."""
        return self._state.quoting_enclaves[Tee(tee)]

    def root_certificate_der(self) -> bytes:
        """The SIMULATED root CA certificate (DER): the trust anchor for this platform only."""
        return self._state.pki.root_cert.public_bytes(serialization.Encoding.DER)

    def root_certificate_pem(self) -> bytes:
        """The SIMULATED root CA certificate (PEM)."""
        return cert_pem(self._state.pki.root_cert)

    def pck_certificate_chain_pem(self) -> bytes:
        """The PCK chain the quotes carry: leaf, Platform CA, root."""
        return self._state.pki.pck_chain_pem()

    def collateral(
        self,
        tee: Tee | str,
        *,
        now: int | None = None,
        tcb_status: str = "UpToDate",
        advisory_ids: Sequence[str] | None = None,
    ) -> Collateral:
        """Collateral for this platform's `tee` quotes, issued at `now` (default: the clock).

        It is valid for 30 days from `now`. `tcb_status` picks the TCB level the platform
        matches ("UpToDate", "SWHardeningNeeded", "ConfigurationNeeded", "OutOfDate",
        "Revoked", ...); `advisory_ids` overrides the advisories listed at that level.
        """
        tee = Tee(tee)
        state = self._state
        return issue_collateral(
            state.pki,
            state.tcb,
            state.quoting_enclaves[tee],
            tee,
            now=int(time.time()) if now is None else int(now),
            tcb_status=tcb_status,
            advisory_ids=advisory_ids,
        )

    def sgx_enclave(
        self,
        mr_enclave: bytes,
        mr_signer: bytes,
        isv_prod_id: int = 0,
        isv_svn: int = 0,
        debug: bool = False,
    ) -> SimulatedQuoteProvider:
        """A provider of SGX v3 quotes for an enclave with these measurements."""
        _check_size("MRENCLAVE", mr_enclave, 32)
        _check_size("MRSIGNER", mr_signer, 32)
        _check_u16("ISVPRODID", isv_prod_id)
        _check_u16("ISVSVN", isv_svn)
        flags = 0x05 | (SGX_ATTRIBUTE_DEBUG if debug else 0)  # INIT | MODE64BIT (| DEBUG)
        body = SgxReportBody(
            cpu_svn=self._state.tcb.cpu_svn,
            attributes=flags.to_bytes(8, "little") + ENCLAVE_XFRM.to_bytes(8, "little"),
            mr_enclave=bytes(mr_enclave),
            mr_signer=bytes(mr_signer),
            isv_prod_id=isv_prod_id,
            isv_svn=isv_svn,
        )
        label = f"enclave MRENCLAVE={bytes(mr_enclave).hex()[:16]}…" + (" DEBUG" if debug else "")
        return SimulatedQuoteProvider(self, Tee.SGX, body, label)

    def tdx_guest(
        self,
        mr_td: bytes,
        rtmrs: tuple[bytes, bytes, bytes, bytes] = (bytes(48),) * 4,
        mr_config_id: bytes = bytes(48),
        debug: bool = False,
    ) -> SimulatedQuoteProvider:
        """A provider of TDX v4 quotes for a TD with these measurements."""
        _check_size("MRTD", mr_td, 48)
        if len(rtmrs) != 4:
            raise PlatformError(f"a TD has 4 RTMRs, got {len(rtmrs)}; pass a tuple of four")
        for index, rtmr in enumerate(rtmrs):
            _check_size(f"RTMR{index}", rtmr, 48)
        _check_size("MRCONFIGID", mr_config_id, 48)
        state = self._state
        attributes = TD_ATTRIBUTE_SEPT_VE_DISABLE | (TD_ATTRIBUTE_DEBUG if debug else 0)
        body = TdReportBody(
            tee_tcb_svn=state.tcb.tee_tcb_svn,
            mr_seam=state.mr_seam,
            mr_signer_seam=state.tcb.mr_signer_seam,
            seam_attributes=state.tcb.seam_attributes,
            td_attributes=attributes.to_bytes(8, "little"),
            xfam=TD_XFAM,
            mr_td=bytes(mr_td),
            mr_config_id=bytes(mr_config_id),
            rtmr0=bytes(rtmrs[0]),
            rtmr1=bytes(rtmrs[1]),
            rtmr2=bytes(rtmrs[2]),
            rtmr3=bytes(rtmrs[3]),
        )
        label = f"TD MRTD={bytes(mr_td).hex()[:16]}…" + (" DEBUG" if debug else "")
        return SimulatedQuoteProvider(self, Tee.TDX, body, label)

    # --- quoting --------------------------------------------------------------------------

    def _quote(self, tee: Tee, body: SgxReportBody | TdReportBody) -> bytes:
        state = self._state
        attestation_key = state.attestation_keys[tee]
        attestation_pub = raw_public_key(attestation_key)
        qe = state.quoting_enclaves[tee]
        qe_report = SgxReportBody(
            cpu_svn=state.tcb.cpu_svn,
            attributes=QE_REPORT_ATTRIBUTES,
            mr_enclave=qe.mr_enclave,
            mr_signer=qe.mr_signer,
            isv_prod_id=qe.isv_prod_id,
            isv_svn=qe.isv_svn,
            report_data=qe_report_data(attestation_pub, QE_AUTH_DATA),
        )
        sgx = tee is Tee.SGX
        header = QuoteHeader(
            version=3 if sgx else 4,
            att_key_type=ATT_KEY_TYPE_ECDSA_P256,
            tee_type=TEE_TYPE_SGX if sgx else TEE_TYPE_TDX,
            # SGX quotes carry the QE and PCE SVNs here; TDX hardware leaves them zero.
            qe_svn=qe.isv_svn if sgx else 0,
            pce_svn=state.tcb.pce_svn if sgx else 0,
            qe_vendor_id=INTEL_QE_VENDOR_ID,
            user_data=state.qe_id + bytes(4),
        )
        signed = encode_signed_region(header, body)
        signature_data = SignatureData(
            signature=sign_raw(attestation_key, signed),
            attestation_key=attestation_pub,
            qe_report=qe_report,
            qe_report_signature=sign_raw(state.pki.pck_key, qe_report.to_bytes()),
            qe_auth_data=QE_AUTH_DATA,
            cert_type=CERT_TYPE_PCK_CHAIN,
            cert_data=state.pki.pck_chain_pem(),
        )
        return encode_quote(signed, signature_data, header.version)

    # --- state ----------------------------------------------------------------------------

    @property
    def _state(self) -> _State:
        if self._loaded is None:
            with self._lock:
                if self._loaded is None:
                    self._loaded = _open_state(self.state_dir)
        return self._loaded


_default_platforms: dict[Path, SimulatedPlatform] = {}
_default_lock = threading.Lock()


def default_platform() -> SimulatedPlatform:
    """The process-wide simulated platform in the default state directory."""
    directory = default_state_dir().absolute()
    with _default_lock:
        platform = _default_platforms.get(directory)
        if platform is None:
            platform = _default_platforms[directory] = SimulatedPlatform(directory)
        return platform


# --- persistence ------------------------------------------------------------------------------


def _check_size(name: str, value: bytes, size: int) -> None:
    if not isinstance(value, bytes | bytearray) or len(value) != size:
        got = f"{len(value)} bytes" if isinstance(value, bytes | bytearray) else type(value)
        raise PlatformError(f"{name} must be {size} bytes, got {got}")


def _check_u16(name: str, value: int) -> None:
    if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise PlatformError(f"{name} must be an integer from 0 to 65535, got {value!r}")


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _open_state(directory: Path) -> _State:
    try:
        existed = directory.exists()
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not existed:
            os.chmod(directory, 0o700)  # a umask can only remove bits; make sure of ours
        mode = stat.S_IMODE(directory.stat().st_mode)
        if mode & 0o077:
            raise PlatformError(
                f"simulated platform directory {directory} is open to other users (mode "
                f"{mode:03o}); run `chmod 700 {directory}` or point ${ENV_STATE_DIR} elsewhere"
            )
        with _locked(directory):
            if not (directory / STATE_FILE).exists():
                _create_state(directory)
            return _load_state(directory)
    except OSError as exc:
        where = exc.filename or directory
        raise PlatformError(
            f"cannot use the simulated platform directory {directory}: {exc.strerror or exc} "
            f"({where}); check its permissions, or set ${ENV_STATE_DIR} to a writable directory"
        ) from None


def _create_state(directory: Path) -> None:
    ppid = secrets.token_bytes(16)
    fmspc = secrets.token_bytes(6)
    platform_instance_id = secrets.token_bytes(16)
    pki = create_pki(
        ppid=ppid,
        cpu_svn=DEFAULT_CPU_SVN,
        pce_svn=DEFAULT_PCE_SVN,
        pce_id=PCE_ID,
        fmspc=fmspc,
        platform_instance_id=platform_instance_id,
    )
    atomic_write_bytes(directory / SECRET_FILE, secrets.token_bytes(32), mode=0o600)
    for name, (key, cert) in pki.pairs().items():
        atomic_write_bytes(directory / f"{name}.key", key_pem(key), mode=0o600)
        atomic_write_bytes(directory / f"{name}.pem", cert_pem(cert), mode=0o644)
    quoting_enclaves: dict[str, Any] = {}
    for tee in Tee:
        atomic_write_bytes(directory / f"qe_{tee}_attestation.key", key_pem(new_key()), mode=0o600)
        quoting_enclaves[str(tee)] = {
            "mr_signer": secrets.token_hex(32),
            "mr_enclave": secrets.token_hex(32),
            "isv_prod_id": QE_ISV_PROD_ID[tee],
            "isv_svn": QE_ISV_SVN[tee],
        }
    document = {
        "format": STATE_FORMAT,
        "SIMULATED": True,
        "description": f"{PLATFORM_NAME}: its quotes verify only under this directory's "
        "root_ca.pem, never under Intel's root",
        "fmspc": fmspc.hex(),
        "pce_id": PCE_ID.hex(),
        "ppid": ppid.hex(),
        "platform_instance_id": platform_instance_id.hex(),
        "cpu_svn": DEFAULT_CPU_SVN.hex(),
        "pce_svn": DEFAULT_PCE_SVN,
        "tee_tcb_svn": DEFAULT_TEE_TCB_SVN.hex(),
        "mr_seam": secrets.token_hex(48),
        "qe_id": secrets.token_hex(16),
        "quoting_enclaves": quoting_enclaves,
    }
    atomic_write_bytes(
        directory / STATE_FILE, (json.dumps(document, indent=2) + "\n").encode(), mode=0o644
    )


def _corrupt(directory: Path, what: str) -> PlatformError:
    return PlatformError(
        f"simulated platform state in {directory} is damaged ({what}); remove the directory "
        "to create a new simulated platform (quotes and sealed data of the old one will no "
        "longer verify or unseal)"
    )


def _read_private(directory: Path, filename: str) -> bytes:
    path = directory / filename
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PlatformError(
            f"private file {path} is readable by other users (mode {mode:03o}); "
            f"run `chmod 600 {path}`"
        )
    return path.read_bytes()


def _load_key(directory: Path, filename: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(_read_private(directory, filename), None)
    except (ValueError, TypeError) as exc:
        raise _corrupt(directory, f"{filename}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise _corrupt(directory, f"{filename} is not a P-256 key")
    return key


def _load_state(directory: Path) -> _State:
    try:
        doc = json.loads((directory / STATE_FILE).read_text("utf-8"))
        if doc.get("format") != STATE_FORMAT:
            raise PlatformError(
                f"simulated platform state in {directory} has format {doc.get('format')!r}, "
                f"this Modelyo reads format {STATE_FORMAT}; upgrade Modelyo or remove the "
                "directory to start a new simulated platform"
            )
        pairs = {}
        for name in PKI_NAMES:
            key = _load_key(directory, f"{name}.key")
            cert = x509.load_pem_x509_certificate((directory / f"{name}.pem").read_bytes())
            if cert.public_key() != key.public_key():
                raise _corrupt(directory, f"{name}.key does not match {name}.pem")
            pairs[name] = (key, cert)
        secret = _read_private(directory, SECRET_FILE)
        if len(secret) != 32:
            raise _corrupt(directory, f"{SECRET_FILE} is not 32 bytes")
        quoting_enclaves = {}
        attestation_keys = {}
        for tee in Tee:
            qe = doc["quoting_enclaves"][str(tee)]
            quoting_enclaves[tee] = QeIdentity(
                mr_signer=bytes.fromhex(qe["mr_signer"]),
                mr_enclave=bytes.fromhex(qe["mr_enclave"]),
                isv_prod_id=int(qe["isv_prod_id"]),
                isv_svn=int(qe["isv_svn"]),
            )
            attestation_keys[tee] = _load_key(directory, f"qe_{tee}_attestation.key")
        return _State(
            pki=SimulatedPki.from_pairs(pairs),
            tcb=PlatformTcb(
                fmspc=bytes.fromhex(doc["fmspc"]),
                pce_id=bytes.fromhex(doc["pce_id"]),
                cpu_svn=bytes.fromhex(doc["cpu_svn"]),
                pce_svn=int(doc["pce_svn"]),
                tee_tcb_svn=bytes.fromhex(doc["tee_tcb_svn"]),
            ),
            ppid=bytes.fromhex(doc["ppid"]),
            platform_instance_id=bytes.fromhex(doc["platform_instance_id"]),
            qe_id=bytes.fromhex(doc["qe_id"]),
            mr_seam=bytes.fromhex(doc["mr_seam"]),
            quoting_enclaves=quoting_enclaves,
            attestation_keys=attestation_keys,
            secret=secret,
        )
    except FileNotFoundError as exc:
        raise _corrupt(directory, f"{Path(exc.filename).name} is missing") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _corrupt(directory, f"{type(exc).__name__}: {exc}") from None
