"""Quote verification: dcap-qvl for the signature chain and TCB, then our policy.

`verify_quote` never raises for a bad quote: it returns a `Verdict` listing every check, what it
found, and on refusal exactly what failed and what to do. `Verdict.raise_for_refusal()` turns a
refusal into `AttestationError` for callers that only want to go on when accepted.
"""

from __future__ import annotations

import hmac
import json
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from hashlib import sha256
from pathlib import Path
from typing import Any

import dcap_qvl
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from modelyo.attestation.collateral import Collateral
from modelyo.attestation.policy import SGX_PINS, TDX_PINS, SgxPolicy, TdxPolicy
from modelyo.attestation.quote import Quote, SgxReportBody, parse_quote
from modelyo.errors import AttestationError, ConfigError, QuoteFormatError
from modelyo.tee.provider import Tee

# SHA-256 of the DER "Intel SGX Root CA" certificate that dcap-qvl has compiled in.
INTEL_ROOT_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
SIMULATED_MARK = "SIMULATED"


@dataclass(frozen=True)
class TrustRoot:
    """The root certificate a quote's PCK and collateral chains must lead to."""

    name: str
    der: bytes | None  # None: dcap-qvl's compiled-in Intel SGX Root CA
    simulated: bool = False

    @property
    def fingerprint(self) -> str:
        return INTEL_ROOT_SHA256 if self.der is None else sha256(self.der).hexdigest()

    @classmethod
    def intel(cls) -> TrustRoot:
        return cls("intel", None)

    @classmethod
    def simulation(cls, state_dir: Path | None = None) -> TrustRoot:
        """The simulated platform's root (its state is created on first use)."""
        from modelyo.tee.sim import SimulatedPlatform

        return cls("simulation", SimulatedPlatform(state_dir).root_certificate_der(), True)

    @classmethod
    def from_file(cls, path: str | Path) -> TrustRoot:
        """A root certificate in PEM or DER; marked simulated when its subject says so."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read root certificate {path}: {exc.strerror}") from None
        try:
            cert = (
                x509.load_pem_x509_certificate(data)
                if b"-----BEGIN" in data
                else x509.load_der_x509_certificate(data)
            )
        except ValueError:
            raise ConfigError(f"{path} is not a PEM or DER X.509 certificate") from None
        der = cert.public_bytes(serialization.Encoding.DER)
        simulated = SIMULATED_MARK in cert.subject.rfc4514_string().upper()
        return cls(str(path), der, simulated)

    @classmethod
    def resolve(cls, spec: str, *, sim_state_dir: Path | None = None) -> TrustRoot:
        """`intel`, `simulation`, or a path to a root certificate."""
        if spec == "intel":
            return cls.intel()
        if spec == "simulation":
            return cls.simulation(sim_state_dir)
        return cls.from_file(spec)


@dataclass(frozen=True)
class Check:
    """One verification step: `ok` is None when the step was not applicable or not reached."""

    name: str
    ok: bool | None
    detail: str


@dataclass
class Verdict:
    """Everything a verification found; `accepted` only if no check failed."""

    root: str
    simulated: bool
    checked_at: int
    tee: Tee | None = None
    quote: Quote | None = None
    status: str | None = None
    advisories: list[str] = field(default_factory=list)
    collateral_expires: int | None = None
    checks: list[Check] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return bool(self.checks) and all(c.ok is not False for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]

    @property
    def measurements(self) -> dict[str, str]:
        return self.quote.measurements() if self.quote else {}

    def add(self, name: str, ok: bool | None, detail: str) -> bool | None:
        self.checks.append(Check(name, ok, detail))
        return ok

    def reason(self) -> str:
        """The failures in one sentence (empty when accepted)."""
        return "; ".join(f"{c.name}: {c.detail}" for c in self.failures)

    def raise_for_refusal(self, what: str = "quote") -> Verdict:
        """Return self when accepted; otherwise raise `AttestationError` naming the failures."""
        if not self.accepted:
            raise AttestationError(f"{what} refused: {self.reason()}", verdict=self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "simulated": self.simulated,
            "root": self.root,
            "checked_at": self.checked_at,
            "tee": str(self.tee) if self.tee else None,
            "version": self.quote.version if self.quote else None,
            "tcb_status": self.status,
            "advisories": self.advisories,
            "collateral_expires": self.collateral_expires,
            "measurements": self.measurements,
            "debug": self.quote.debug if self.quote else None,
            "report_data": self.quote.report_data.hex() if self.quote else None,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
            "failures": [c.name for c in self.failures],
        }


def _utc(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# dcap-qvl's messages, translated into what happened and what to do. First match wins.
_DCAP_ERRORS: list[tuple[re.Pattern[str], str]] = [
    (
        re.compile(r"CrlExpired \{ time: UnixTime\((\d+)\), next_update: UnixTime\((\d+)\)"),
        "collateral expired: a CRL's next update was {1}, verification time is {0}; "
        "fetch fresh collateral from the PCCS (or pass a time inside its window with --at)",
    ),
    (
        re.compile(r"(TCBInfo|QE ?Identity|TCB ?Info|Qe ?Identity) expired", re.I),
        "collateral expired: the {0} is past its nextUpdate at the verification time; "
        "fetch fresh collateral (or pass a time inside its window with --at)",
    ),
    (
        re.compile(r"not yet valid|NotValidYet|issued in the future", re.I),
        "collateral is not yet valid at the verification time; check the clock or --at",
    ),
    (
        re.compile(r"UnknownIssuer|InvalidCrlSignatureForPublicKey|root ca|BadSignature", re.I),
        "the certificate chain does not lead to the trusted root: the quote or collateral "
        "comes from another platform (a SIMULATED quote under the Intel root, or the reverse?)",
    ),
    (
        re.compile(r"Revoked", re.I),
        "the platform's TCB is revoked: its keys must not be trusted",
    ),
    (
        re.compile(r"No matching TCB level", re.I),
        "no TCB level in the collateral matches this platform's SVNs (the platform is older "
        "than every level Intel lists, or the collateral is for another FMSPC)",
    ),
    (
        re.compile(r"report signature is invalid|signature.*invalid|invalid signature", re.I),
        "a signature does not verify: the quote was altered or signed by another key",
    ),
    (
        re.compile(r"debug", re.I),
        "the enclave or TD runs in debug mode, which exposes its memory",
    ),
    (
        re.compile(r"fmspc", re.I),
        "the collateral is for another platform (FMSPC mismatch); fetch it for this quote",
    ),
]


def explain_dcap_error(message: str) -> str:
    """Plain words for a dcap-qvl verification error, keeping the original text."""
    text = message.removeprefix("Verification failed: ")
    for pattern, advice in _DCAP_ERRORS:
        found = pattern.search(text)
        if found:
            groups = [_utc(int(g)) if g.isdigit() and len(g) >= 9 else g for g in found.groups()]
            return f"{advice.format(*groups)} [dcap-qvl: {text}]"
    return f"dcap-qvl refused the quote: {text}"


def _check_tcb(verdict: Verdict, policy: SgxPolicy | TdxPolicy, prefix: str) -> None:
    tcb = policy.tcb
    status = verdict.status or "unknown"
    if status not in tcb.accepted_statuses:
        verdict.add(
            "tcb status",
            False,
            f"TCB status {status} is not in policy {prefix}tcb.accepted_statuses "
            f"{tcb.accepted_statuses}; the platform needs a firmware/microcode update",
        )
    else:
        verdict.add("tcb status", True, f"{status} is accepted")
    if tcb.allowed_advisories is not None:
        extra = sorted(set(verdict.advisories) - set(tcb.allowed_advisories))
        if extra:
            verdict.add(
                "advisories",
                False,
                f"advisories {', '.join(extra)} are not in policy {prefix}tcb.allowed_advisories",
            )
            return
    verdict.add("advisories", True, ", ".join(verdict.advisories) or "none")


def _check_measurements(
    verdict: Verdict, quote: Quote, policy: SgxPolicy | TdxPolicy, prefix: str
) -> None:
    found = quote.measurements()
    pins = SGX_PINS if isinstance(policy, SgxPolicy) else TDX_PINS
    for field_name, register in pins.items():
        allowed: list[str] = getattr(policy, field_name)
        if not allowed:
            continue
        value = found[register]
        if value in allowed:
            verdict.add(register, True, f"{register.upper()}={value[:16]}… is allowed")
        else:
            hint = {"mrenclave": "ca", "mrtd": "agent"}.get(register)
            todo = f"; run `modelyo measure {hint}` and review" if hint else ""
            verdict.add(
                register,
                False,
                f"quote measurement {register.upper()}={value[:16]}… is not in policy "
                f"{prefix}{field_name}{todo}",
            )
    if isinstance(policy, SgxPolicy) and isinstance(quote.body, SgxReportBody):
        body = quote.body
        if policy.isv_prod_id is not None:
            ok = body.isv_prod_id == policy.isv_prod_id
            verdict.add(
                "isv_prod_id",
                ok,
                f"ISVPRODID {body.isv_prod_id}"
                + ("" if ok else f" differs from policy {prefix}isv_prod_id={policy.isv_prod_id}"),
            )
        if policy.min_isv_svn is not None:
            ok = body.isv_svn >= policy.min_isv_svn
            verdict.add(
                "isv_svn",
                ok,
                f"ISVSVN {body.isv_svn}"
                + ("" if ok else f" is below policy {prefix}min_isv_svn={policy.min_isv_svn}"),
            )
    if not policy.pins_anything():
        verdict.add("measurements", None, "policy pins no measurement: identity NOT checked")


def verify_quote(
    quote: bytes | Quote,
    collateral: Collateral,
    *,
    root: TrustRoot,
    now: int | None = None,
    policy: SgxPolicy | TdxPolicy | None = None,
    policy_name: str = "",
    expected_report_data: bytes | None = None,
) -> Verdict:
    """Verify a quote with collateral under `root` at `now` (Unix seconds), then apply `policy`.

    Steps: parse; dcap-qvl (signatures, PCK chain and CRLs, QE identity, TCB level, collateral
    dates, debug and TD attribute rules); TCB status and advisories against the policy; debug;
    pinned measurements; REPORTDATA against `expected_report_data` (see `binding`).
    """
    checked_at = int(time.time()) if now is None else int(now)
    verdict = Verdict(root=root.name, simulated=root.simulated, checked_at=checked_at)
    prefix = f"{policy_name}." if policy_name else ""
    try:
        parsed = quote if isinstance(quote, Quote) else parse_quote(quote)
    except QuoteFormatError as exc:
        verdict.add("format", False, str(exc))
        return verdict
    verdict.quote = parsed
    verdict.tee = parsed.tee
    verdict.add("format", True, f"{parsed.tee.upper()} quote v{parsed.version}")

    try:
        # claims_only: dcap-qvl evaluates everything but leaves the status decision to us.
        claims_policy = dcap_qvl.QuotePolicy.claims_only(checked_at)
        claims = dcap_qvl.QuoteVerifier(root.der).verify_with_policy(
            parsed.raw, collateral.to_dcap(), checked_at, claims_policy
        )
    except ValueError as exc:
        verdict.add("signature and collateral", False, explain_dcap_error(str(exc)))
    else:
        data = json.loads(claims.to_json())
        verdict.status = data["tcb"]["status"]
        verdict.advisories = list(data["tcb"]["advisory_ids"])
        verdict.collateral_expires = data.get("earliest_expiration_date")
        verdict.add(
            "signature and collateral",
            True,
            f"chain to the {root.name} root verifies; collateral valid until "
            + (_utc(verdict.collateral_expires) if verdict.collateral_expires else "unknown"),
        )
        if policy is not None:
            _check_tcb(verdict, policy, prefix)

    if parsed.debug:
        verdict.add("debug", False, "the enclave or TD runs in debug mode; it is never trusted")
    else:
        verdict.add("debug", True, "production (debug off)")

    if policy is not None:
        expected = Tee.SGX if isinstance(policy, SgxPolicy) else Tee.TDX
        if parsed.tee != expected:
            verdict.add(
                "tee",
                False,
                f"policy {policy_name or 'given'} is for {expected.upper()} but the quote is "
                f"{parsed.tee.upper()}",
            )
        else:
            _check_measurements(verdict, parsed, policy, prefix)

    if expected_report_data is not None:
        if hmac.compare_digest(parsed.report_data, expected_report_data):
            verdict.add("report data", True, "REPORTDATA binds the expected key and nonce")
        else:
            verdict.add(
                "report data",
                False,
                "REPORTDATA does not bind the expected TLS key and nonce: the quote was made "
                "for another key or another challenge (replayed or relayed)",
            )
    return verdict
