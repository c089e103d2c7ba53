"""GPU confidential-computing evidence: collect it (NVML or simulated) and verify it.

The nonce is always exactly 32 bytes: REPORTDATA[0:32] of the TD quote it travels with, so a
GPU report is as fresh as the quote and cannot be moved to another one.

`verify` never trusts what the evidence says about itself (`verified`, `problems`,
`simulated`): it recomputes them. Per GPU, `verify_gpu` returns a `GpuVerdict` listing every
check: report format; certificate chain up to one of the configured device roots; FWID of the
leaf against the report's; the report's signature by the leaf key; the nonce (in the signed
request and in the evidence); every measurement against the reference for the driver and VBIOS
versions the GPU signed; those versions against the ones the evidence states; CC mode on. A
missing root or missing references is a failure that says so, never a silent pass.

Not checked: OCSP revocation of the device chain (recorded as not checked), and the signatures
of NVIDIA's RIM files (see `modelyo.gpu.reference`). GPU evidence alone does not prove the GPU is
attached to this TD (NVIDIA's caveat until TDISP); the nonce binds it to this quote's time only.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hmac
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from modelyo.api.agent import GpuEvidence, GpuReport
from modelyo.attestation.verify import Check
from modelyo.errors import GpuEvidenceError
from modelyo.gpu import nvml
from modelyo.gpu.reference import DeviceRoot, ReferenceMeasurements
from modelyo.gpu.report import (
    MAX_REPORT_SIZE,
    NONCE_SIZE,
    SHA384_SIZE,
    AttestationReport,
    parse_report,
)
from modelyo.gpu.sim import DICE_TCB_INFO_OID, SimulatedGpuPlatform

# The measurement a GPU listed in `SimulatedSource.tampered` reports differently.
TAMPERED_MEASUREMENT = 2
# NVIDIA's chain has 5 certificates (NVML's buffer holds 5 KiB); more is not a device chain.
MAX_CHAIN_LENGTH = 8


@dataclass(frozen=True)
class SimulatedSource:
    """Simulated GPUs (SIMULATED, software): `count` of them, kept in `state_dir`.

    `tampered` lists GPU indexes whose measurement TAMPERED_MEASUREMENT differs from the
    reference; `cc_mode` applies to every GPU ("on", "off" or "devtools").
    """

    state_dir: Path | str | None = None
    count: int = 1
    cc_mode: str = "on"
    tampered: tuple[int, ...] = ()


@dataclass(frozen=True)
class NvmlSource:
    """The VM's NVIDIA GPUs through NVML. `library` replaces `pynvml` (for tests)."""

    library: Any = None


GpuSource = SimulatedSource | NvmlSource


def check_nonce(nonce: bytes) -> bytes:
    """`nonce` if it is exactly 32 bytes, else GpuEvidenceError."""
    if not isinstance(nonce, bytes | bytearray) or len(nonce) != NONCE_SIZE:
        got = f"{len(nonce)} bytes" if isinstance(nonce, bytes | bytearray) else type(nonce)
        raise GpuEvidenceError(
            f"the GPU nonce must be exactly {NONCE_SIZE} bytes (REPORTDATA[0:32] of the TD "
            f"quote), got {got}"
        )
    return bytes(nonce)


# --- collection -------------------------------------------------------------------------------

_platforms: dict[Path, SimulatedGpuPlatform] = {}
_platforms_lock = threading.Lock()


def simulated_platform(state_dir: Path | str | None = None) -> SimulatedGpuPlatform:
    """The process-wide simulated GPU platform for `state_dir` (keys loaded once)."""
    platform = SimulatedGpuPlatform(state_dir)
    key = platform.state_dir.absolute()
    with _platforms_lock:
        return _platforms.setdefault(key, platform)


def collect(nonce: bytes, *, source: GpuSource) -> GpuReport:
    """Evidence of every GPU from `source`, over `nonce` (32 bytes), not yet verified."""
    nonce = check_nonce(nonce)
    if isinstance(source, NvmlSource):
        return nvml.collect(nonce, source.library)
    if not isinstance(source, SimulatedSource):
        raise TypeError(f"source must be SimulatedSource or NvmlSource, not {type(source)}")
    if source.count <= 0:
        return GpuReport(detail="no GPU: the simulated platform has 0 GPUs configured")
    platform = simulated_platform(source.state_dir)
    gpus = []
    for index in range(source.count):
        gpu = platform.gpu(
            index,
            cc_mode=source.cc_mode,
            tampered_measurements=(TAMPERED_MEASUREMENT,) if index in source.tampered else (),
        )
        gpus.append(
            GpuEvidence(
                index=index,
                uuid=gpu.uuid,
                name=gpu.name,
                arch=gpu.arch,
                driver_version=gpu.driver_version,
                vbios_version=gpu.vbios_version,
                cc_mode=gpu.cc_mode,
                simulated=True,
                nonce=nonce.hex(),
                report=base64.b64encode(gpu.attestation_report(nonce)).decode("ascii"),
                certificate_chain=gpu.certificate_chain_pem(),
                verified=False,
            )
        )
    plural = "s" if source.count != 1 else ""
    return GpuReport(
        gpus=gpus,
        detail=f"{source.count} SIMULATED GPU{plural} (software, not NVIDIA hardware)",
    )


# --- verification -----------------------------------------------------------------------------


@dataclass
class GpuVerdict:
    """Everything the verification of one GPU's evidence found."""

    index: int
    simulated: bool
    root: DeviceRoot | None = None
    report: AttestationReport | None = None
    checks: list[Check] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return bool(self.checks) and all(c.ok is not False for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]

    @property
    def problems(self) -> list[str]:
        """Each failure in plain words, naming the GPU."""
        return [f"GPU {self.index}: {c.detail}" for c in self.failures]

    def add(self, name: str, ok: bool | None, detail: str) -> bool | None:
        self.checks.append(Check(name, ok, detail))
        return ok


def _utc(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def load_certificate(pem: str) -> x509.Certificate:
    """A PEM certificate, with every field verification reads parsed now.

    cryptography parses fields lazily; touching them here turns a malformed certificate into
    one ValueError at load instead of a surprise halfway through verification.
    """
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
        _ = (cert.subject, cert.issuer, cert.not_valid_before_utc, cert.not_valid_after_utc)
        _ = (list(cert.extensions), cert.signature_hash_algorithm, cert.public_key())
    # cryptography raises ValueError, UnsupportedAlgorithm, DuplicateExtension, ... here.
    except Exception as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
    return cert


def _cn(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def _is_ca(cert: x509.Certificate) -> tuple[bool, int | None]:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):  # ValueError: unparsable extensions
        return False, None
    return constraints.ca, constraints.path_length


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def check_chain(
    chain: Sequence[x509.Certificate], roots: Sequence[DeviceRoot], now: dt.datetime
) -> tuple[DeviceRoot | None, str]:
    """The root `chain` (leaf first) leads to, or None and what is wrong.

    Each certificate must be signed by the next, every issuer must be a CA whose pathLen allows
    the CAs below it, each must be valid at `now`, and the last must be one of `roots` or be
    signed by one. (Extensions beyond these are not interpreted.)
    """
    if not chain:
        return None, "the evidence carries no device certificate"
    for position, cert in enumerate(chain):
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return None, (
                f"device certificate {position} ({_cn(cert)}) is not valid at "
                f"{now:%Y-%m-%d %H:%M} UTC (valid {cert.not_valid_before_utc:%Y-%m-%d} to "
                f"{cert.not_valid_after_utc:%Y-%m-%d})"
            )
    for position in range(len(chain) - 1):
        child, parent = chain[position], chain[position + 1]
        if not _issued_by(child, parent):
            return None, (
                f"device certificate {position} ({_cn(child)}) is not signed by the next one "
                f"({_cn(parent)}): the chain was altered or assembled from different devices"
            )
        ca, path_length = _is_ca(parent)
        if not ca:
            return None, f"device certificate {position + 1} ({_cn(parent)}) is not a CA"
        if path_length is not None and position > path_length:
            return None, f"device certificate {position + 1} ({_cn(parent)}) exceeds its pathLen"
    last = chain[-1]
    for root in roots:
        if last == root.certificate:
            return root, f"chain of {len(chain)} leads to {root.subject}"
    for root in roots:
        ca, path_length = _is_ca(root.certificate)
        if ca and _issued_by(last, root.certificate):
            valid = root.certificate.not_valid_before_utc <= now
            if not valid or now > root.certificate.not_valid_after_utc:
                return None, f"the device root {root.name} is not valid at {now:%Y-%m-%d} UTC"
            if path_length is not None and len(chain) - 1 > path_length:
                return None, f"the chain is longer than the device root {root.name} allows"
            return root, f"chain of {len(chain)} is issued by {root.subject}"
    names = ", ".join(root.name for root in roots)
    return None, (
        f"the device certificate chain ({_cn(chain[0])} … {_cn(last)}) does not lead to a trusted "
        f"device root ({names}): the GPU is not from the expected maker, or it is SIMULATED "
        "under a root you do not trust (or the reverse)"
    )


def leaf_fwid(cert: x509.Certificate) -> bytes | None:
    """The FWID of a device leaf: the last 48 bytes of its TCG DICE TcbInfo extension, as
    NVIDIA's verifier reads it; None without that extension."""
    try:
        extension = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(DICE_TCB_INFO_OID))
    except (x509.ExtensionNotFound, ValueError):
        return None
    value = extension.value
    raw = value.value if isinstance(value, x509.UnrecognizedExtension) else None
    if raw is None or len(raw) < SHA384_SIZE:
        return None
    return raw[-SHA384_SIZE:]


def _check_signature(
    verdict: GpuVerdict, report: AttestationReport, leaf: x509.Certificate
) -> None:
    try:
        key = leaf.public_key()
    except (ValueError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        verdict.add("signature", False, "the device leaf key is not ECDSA P-384 as SPDM requires")
        return
    half = len(report.signature) // 2
    signature = encode_dss_signature(
        int.from_bytes(report.signature[:half], "big"),
        int.from_bytes(report.signature[half:], "big"),
    )
    try:
        key.verify(signature, report.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        verdict.add(
            "signature",
            False,
            "the attestation report's signature does not verify with the device leaf key: the "
            "report was altered, or signed by another device",
        )
        return
    verdict.add("signature", True, "the report is signed by the device leaf key (P-384)")


def _check_measurements(
    verdict: GpuVerdict,
    report: AttestationReport,
    references: ReferenceMeasurements | None,
) -> None:
    measured = report.measurements
    if references is None:
        verdict.add(
            "measurements",
            False,
            f"no reference measurements are configured, so its {len(measured)} measurements were "
            "NOT compared; configure the reference measurements (NVIDIA's RIMs for this driver "
            "and VBIOS, or the SIMULATED references in simulation)",
        )
        return
    driver = report.driver_version
    vbios = report.vbios_version
    if not driver or not vbios:
        verdict.add(
            "measurements",
            False,
            "the signed report does not state its driver and VBIOS versions, so no reference "
            "can be chosen",
        )
        return
    expected, problems = references.select(driver, vbios)
    for problem in problems:
        verdict.add("measurements", False, problem)
    if problems:
        return
    mismatched = 0
    for index, value in sorted(measured.items()):
        allowed = expected.get(index)
        if allowed is None:
            mismatched += 1
            verdict.add(
                f"measurement {index}",
                False,
                f"measurement {index} has no reference value in {references.name} (driver "
                f"{driver}, VBIOS {vbios}); it cannot be judged",
            )
        elif not any(hmac.compare_digest(value, candidate) for candidate in allowed):
            mismatched += 1
            verdict.add(
                f"measurement {index}",
                False,
                f"measurement {index} is {value.hex()[:16]}… but the reference ({references.name}"
                f", driver {driver}, VBIOS {vbios}) expects "
                + " or ".join(f"{c.hex()[:16]}…" for c in allowed)
                + ": the GPU firmware or configuration differs from the reference (tampered?)",
            )
    missing = sorted(set(expected) - set(measured))
    if missing:
        mismatched += 1
        verdict.add(
            "measurements",
            False,
            f"measurements {', '.join(map(str, missing))} are in the reference but not in the "
            "report",
        )
    if not mismatched:
        verdict.add(
            "measurements",
            True,
            f"all {len(measured)} measurements match {references.name} (driver {driver}, "
            f"VBIOS {vbios})",
        )


def _check_cc_mode(verdict: GpuVerdict, cc_mode: str) -> None:
    if cc_mode == "on":
        verdict.add("cc mode", True, "confidential-computing mode is on")
    elif cc_mode == "devtools":
        verdict.add(
            "cc mode",
            False,
            "confidential-computing DEVTOOLS mode is on: debuggers and profilers can read GPU "
            "state, so it is not trusted with data; set the GPU's CC mode to on",
        )
    else:
        verdict.add(
            "cc mode",
            False,
            f"confidential-computing mode is {cc_mode}: GPU memory and PCIe traffic are not "
            "protected from the host; set the GPU's CC mode to on and restart the VM",
        )


def verify_gpu(
    evidence: GpuEvidence,
    nonce: bytes,
    *,
    roots: Sequence[DeviceRoot],
    references: ReferenceMeasurements | None,
    now: dt.datetime | None = None,
) -> GpuVerdict:
    """Verify one GPU's evidence; every check is listed, failures say what is wrong."""
    nonce = check_nonce(nonce)
    moment = _utc(now) if now is not None else dt.datetime.now(dt.UTC)
    verdict = GpuVerdict(index=evidence.index, simulated=evidence.simulated)
    # Collection failures recorded by the collector (possibly already verified once, with the
    # "GPU n: " prefix) are kept: they say why evidence is missing. Nothing else is inherited.
    for problem in evidence.problems:
        text = problem.removeprefix(f"GPU {evidence.index}: ")
        if text.startswith(nvml.COLLECTION_PROBLEM):
            verdict.add("collection", False, text)

    # The evidence's own statement of its nonce: a quick, readable replay signal.
    try:
        stated = bytes.fromhex(evidence.nonce)
    except ValueError:
        stated = b""
    if hmac.compare_digest(stated, nonce):
        verdict.add("evidence nonce", True, "collected for the expected nonce")
    else:
        verdict.add(
            "evidence nonce",
            False,
            f"the evidence was collected for nonce {evidence.nonce[:16]}…, not the expected "
            f"{nonce.hex()[:16]}… (REPORTDATA[0:32] of the TD quote): replayed or mixed up",
        )

    report: AttestationReport | None = None
    if not evidence.report:
        verdict.add("report format", False, "no attestation report was collected")
    elif len(evidence.report) > (MAX_REPORT_SIZE + 2) // 3 * 4:
        verdict.add("report format", False, "the attestation report is larger than NVML's buffer")
    else:
        try:
            report = parse_report(base64.b64decode(evidence.report, validate=True))
        except (binascii.Error, ValueError) as exc:
            verdict.add("report format", False, f"the attestation report is unusable: {exc}")
        else:
            verdict.report = report
            verdict.add(
                "report format",
                True,
                f"SPDM 1.1 measurements report, {len(report.measurements)} measurements",
            )

    chain: list[x509.Certificate] = []
    try:
        if len(evidence.certificate_chain) > MAX_CHAIN_LENGTH:
            raise ValueError(
                f"{len(evidence.certificate_chain)} certificates (a device chain has at most "
                f"{MAX_CHAIN_LENGTH})"
            )
        chain = [load_certificate(pem) for pem in evidence.certificate_chain]
    except (ValueError, UnsupportedAlgorithm) as exc:
        chain = []
        verdict.add("certificate chain", False, f"a device certificate is unreadable: {exc}")
    else:
        if not roots:
            verdict.add(
                "certificate chain",
                False,
                "no GPU device root is configured, so a genuine GPU cannot be told from a fake: "
                "configure NVIDIA's device root (verifier_device_root.pem), or the SIMULATED root "
                "in simulation",
            )
        else:
            root, detail = check_chain(chain, roots, moment)
            verdict.add("certificate chain", root is not None, detail)
            if root is not None:
                verdict.root = root
                if root.simulated != evidence.simulated:
                    verdict.add(
                        "simulated",
                        False,
                        f"the evidence says simulated={evidence.simulated} but its chain leads "
                        f"to {'a SIMULATED' if root.simulated else 'a hardware'} root",
                    )
                verdict.simulated = root.simulated

    if report is not None:
        if chain:
            leaf = chain[0]
            cert_fwid = leaf_fwid(leaf)
            if report.fwid is None:
                verdict.add(
                    "fwid", None, "the report carries no FWID (older firmware): not compared"
                )
            elif cert_fwid is None:
                verdict.add("fwid", False, "the device leaf has no FWID to compare with the report")
            elif hmac.compare_digest(cert_fwid, report.fwid):
                verdict.add("fwid", True, "the report's FWID matches the device leaf certificate")
            else:
                verdict.add(
                    "fwid",
                    False,
                    f"the report's firmware id {report.fwid.hex()[:16]}… differs from the device "
                    f"leaf's {cert_fwid.hex()[:16]}…: the report is not from this certificate's "
                    "firmware",
                )
            _check_signature(verdict, report, leaf)
        else:
            verdict.add("signature", False, "no device leaf certificate to check the signature")

        if hmac.compare_digest(report.nonce, nonce):
            verdict.add("nonce", True, "the signed request carries the expected nonce")
        else:
            verdict.add(
                "nonce",
                False,
                f"the signed report is for nonce {report.nonce.hex()[:16]}…, not the expected "
                f"{nonce.hex()[:16]}… (REPORTDATA[0:32] of the TD quote): an old or relayed "
                "report",
            )

        for name, stated_version, signed in (
            ("driver version", evidence.driver_version, report.driver_version),
            ("vbios version", evidence.vbios_version, report.vbios_version),
        ):
            if signed is None:
                continue  # reported with the measurements check
            if stated_version.casefold() == signed.casefold():
                verdict.add(name, True, f"{signed}, as signed by the GPU")
            else:
                verdict.add(
                    name,
                    False,
                    f"the evidence states {name} {stated_version!r} but the GPU signed {signed!r}",
                )
        _check_measurements(verdict, report, references)

    _check_cc_mode(verdict, evidence.cc_mode)
    verdict.add("revocation", None, "OCSP revocation of the device chain is not checked")
    return verdict


def verify(
    report: GpuReport,
    nonce: bytes,
    *,
    roots: Sequence[DeviceRoot],
    references: ReferenceMeasurements | None,
    now: dt.datetime | None = None,
) -> GpuReport:
    """A copy of `report` whose GPUs have `verified`, `problems` and `simulated` recomputed.

    `roots`: the device roots chains may lead to (NVIDIA's, or the SIMULATED one by explicit
    choice); `references`: the reference measurements, None when not configured (every GPU then
    fails, saying so); `nonce`: the expected 32 bytes, REPORTDATA[0:32] of the TD quote.
    """
    nonce = check_nonce(nonce)
    verdicts = [
        verify_gpu(gpu, nonce, roots=roots, references=references, now=now) for gpu in report.gpus
    ]
    gpus = [
        gpu.model_copy(
            update={"verified": v.accepted, "problems": v.problems, "simulated": v.simulated}
        )
        for gpu, v in zip(report.gpus, verdicts, strict=True)
    ]
    return GpuReport(gpus=gpus, detail=summarize(verdicts, report.detail))


def summarize(verdicts: Sequence[GpuVerdict], collected: str = "") -> str:
    """One sentence about the verification of all GPUs."""
    if not verdicts:
        return collected or "no GPU"
    count = len(verdicts)
    plural = "s" if count != 1 else ""
    simulated = " SIMULATED" if any(v.simulated for v in verdicts) else ""
    refused = [v for v in verdicts if not v.accepted]
    if not refused:
        roots = sorted({v.root.name for v in verdicts if v.root is not None})
        return (
            f"{count}{simulated} GPU{plural} verified (device root: {', '.join(roots)}; "
            "revocation not checked)"
        )
    problems = "; ".join(p for v in refused for p in v.problems)
    return f"{len(refused)} of {count}{simulated} GPU{plural} refused: {problems}"


def describe(report: GpuReport) -> list[str]:
    """One line per GPU for a summary (SIMULATED when so), or the report's detail."""
    if not report.gpus:
        return [report.detail or "no GPU"]
    lines = []
    for gpu in report.gpus:
        tag = " SIMULATED" if gpu.simulated else ""
        if gpu.verified:
            state = "verified"
        elif gpu.problems:
            own = f"GPU {gpu.index}: "
            state = "REFUSED: " + "; ".join(p.removeprefix(own) for p in gpu.problems)
        else:
            state = "not verified"
        lines.append(
            f"GPU {gpu.index}{tag} {gpu.name} ({gpu.arch}, {gpu.uuid}) driver "
            f"{gpu.driver_version} VBIOS {gpu.vbios_version} CC {gpu.cc_mode}: {state}"
        )
    return lines
