"""Boot: the agent's platform, its registration with the CA, and the retries until it succeeds.

One registration attempt (`register`):

1. Attest the CA exactly as the tool does (`modelyo.client.ca.attest`): a fresh quote bound to
   the CA's TLS key and our nonce, verified under the configured root (`--ca-root`) against the
   expected MRENCLAVE (`--ca-mrenclave`). Both are part of the agent's measured configuration.
2. Get a TD quote with REPORTDATA = `binding.report_data(SPKI of the agent key)`. On hardware,
   check first that the TD's MRCONFIGID is the hash of this configuration (`tdx_agent.config`).
3. `POST /v1/vms` (name, CSR, quote, collateral, hosts) over TLS pinned to the CA root that the
   attestation proved, so the certificates come from the CA we verified.
4. Check the answer (every certificate on our key, issued by that root, with its role) and
   store it (`AgentState.save_registration`).

`Registrar` runs attempts in a background thread until one succeeds, waiting 1, 2, 4, ... up to
`--retry-max` seconds between them, and logs each failure's reason in plain words. Until then
the service answers 503 with the last reason.
"""

from __future__ import annotations

import base64
import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from cryptography import x509

from modelyo import pki
from modelyo.api import ca as ca_api
from modelyo.attestation import binding
from modelyo.attestation.collateral import Collateral
from modelyo.attestation.policy import SgxPolicy
from modelyo.attestation.quote import parse_quote
from modelyo.attestation.verify import TrustRoot
from modelyo.client import ca as ca_client
from modelyo.client.http import TIMEOUT, ServiceError, parse_response
from modelyo.client.tls import describe_tls_error, pinned_context
from modelyo.errors import AttestationError, CollateralError, ModelyoError, PlatformError
from modelyo.measure import measure
from modelyo.tee.provider import QuoteProvider
from modelyo.tee.sim import SimulatedPlatform
from modelyo.tee.tdx import ConfigfsTsmProvider
from tdx_agent.config import AgentConfig
from tdx_agent.state import AgentState, RegistrationRecord

log = logging.getLogger("modelyo.agent")

INITIAL_DELAY = 1.0


class RegistrationError(ModelyoError):
    """One registration attempt failed; the message says why in plain words."""


# --- the platform ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentPlatform:
    """Where the agent's TD quotes and their collateral come from."""

    name: str  # "simulated" or "tdx"
    provider: QuoteProvider
    simulated: bool
    # Collateral for our TD quotes; None when none is configured (hardware without --collateral).
    collateral: Callable[[], Collateral | None]
    mr_td: bytes | None  # simulated: measure("agent"); hardware: what the CPU measured
    mr_config_id: bytes
    sim: SimulatedPlatform | None = None


def make_platform(config: AgentConfig) -> AgentPlatform:
    """The simulated TD (MRTD = `measure("agent")`, MRCONFIGID of the config) or configfs-tsm."""
    mr_config_id = config.mr_config_id()
    own_collateral: Callable[[], Collateral | None] | None = None
    if config.collateral is not None:
        path = config.collateral
        Collateral.from_file(path)  # fail at start, not at the first attestation

        def own_collateral() -> Collateral | None:
            # Re-read on each call: the operator refreshes the file in place.
            return Collateral.from_file(path)

    if config.simulated:
        sim = SimulatedPlatform(config.sim_dir)
        mr_td = measure("agent").value
        provider = sim.tdx_guest(mr_td, mr_config_id=mr_config_id)
        return AgentPlatform(
            name="simulated",
            provider=provider,
            simulated=True,
            collateral=own_collateral or (lambda: sim.collateral("tdx")),
            mr_td=mr_td,
            mr_config_id=mr_config_id,
            sim=sim,
        )
    return AgentPlatform(
        name="tdx",
        provider=ConfigfsTsmProvider(),
        simulated=False,
        collateral=own_collateral or (lambda: None),
        mr_td=None,
        mr_config_id=mr_config_id,
    )


def ca_trust(config: AgentConfig) -> TrustRoot:
    """The root the CA's quote must chain to (`--ca-root`)."""
    if config.ca_root == "simulation":
        return TrustRoot.simulation(config.sim_dir)
    return TrustRoot.intel()


def ca_policy(config: AgentConfig) -> SgxPolicy:
    """What the CA must measure (`--ca-mrenclave`)."""
    return SgxPolicy(allowed_mrenclave=list(config.ca_mrenclave))


# --- one attempt -------------------------------------------------------------------------------


def register(
    config: AgentConfig, platform: AgentPlatform, state: AgentState, *, now: int | None = None
) -> RegistrationRecord:
    """Attest the CA, register with it and store the certificates; `RegistrationError` says
    why an attempt failed."""
    attested = _attest_ca(config, now)
    quote = _own_quote(platform, state)
    collateral = None
    if platform.simulated:
        # The simulated platform's collateral travels with the quote; on hardware the CA uses
        # the collateral it was configured with unless we were given some.
        collateral = _collateral(platform)
    elif config.collateral is not None:
        collateral = _collateral(platform)
    csr = pki.make_csr(state.key, config.name)
    request = ca_api.VmRegistration(
        name=config.name,
        csr=pki.csr_pem(csr),
        quote=base64.b64encode(quote).decode("ascii"),
        collateral=collateral.json_text if collateral is not None else None,
        hosts=list(config.hosts),
    )
    result = _post_registration(config.ca_url, attested.root, request)
    record = check_registration(
        result, attested.root, state, name=config.name, ca_url=config.ca_url, now=now
    )
    owner = state.owner
    if owner is not None and not hmac.compare_digest(owner.ca_fingerprint, record.ca_fingerprint):
        raise RegistrationError(
            f"the CA at {config.ca_url} has root {record.ca_fingerprint[:16]}…, but this VM's "
            f"owner was granted under root {owner.ca_fingerprint[:16]}…: it is another CA, and "
            "the owner's certificate would not verify; point --ca at the original CA, or start "
            "a new agent with a new --state-dir"
        )
    state.save_registration(record)
    return record


def _attest_ca(config: AgentConfig, now: int | None) -> ca_client.AttestedCa:
    try:
        return ca_client.attest(
            config.ca_url, trust=ca_trust(config), policy=ca_policy(config), now=now
        )
    except AttestationError as exc:
        raise RegistrationError(f"the CA at {config.ca_url} failed attestation: {exc}") from None
    except (ModelyoError, httpx.HTTPError) as exc:
        raise RegistrationError(f"CA unreachable: {exc}") from None


def _own_quote(platform: AgentPlatform, state: AgentState) -> bytes:
    try:
        quote = platform.provider.get_quote(binding.report_data(state.spki))
    except PlatformError as exc:
        raise RegistrationError(f"cannot get a TD quote: {exc}") from None
    if not platform.simulated:
        configured = parse_quote(quote).body.mr_config_id  # type: ignore[union-attr]
        if configured != platform.mr_config_id:
            raise RegistrationError(
                f"this TD was launched with MRCONFIGID {configured.hex()[:16]}…, but the "
                f"agent's configuration hashes to {platform.mr_config_id.hex()[:16]}…: launch the "
                "TD with the MRCONFIGID `modelyo-agent ... --print-mrconfigid` prints"
            )
    return quote


def _collateral(platform: AgentPlatform) -> Collateral | None:
    try:
        return platform.collateral()
    except CollateralError as exc:
        raise RegistrationError(f"the TD quote's collateral is unusable: {exc}") from None


def _post_registration(
    url: str, root: x509.Certificate, request: ca_api.VmRegistration
) -> ca_api.VmRegistrationResult:
    try:
        with httpx.Client(
            base_url=url, verify=pinned_context(pki.cert_pem(root)), timeout=TIMEOUT
        ) as client:
            response = client.post(
                ca_api.VMS,
                content=request.model_dump_json(),
                headers={"content-type": "application/json"},
            )
    except httpx.HTTPError as exc:
        raise RegistrationError(f"CA unreachable: {describe_tls_error(exc, url)}") from None
    try:
        return parse_response(ca_api.VmRegistrationResult, response, url)
    except ServiceError as exc:
        raise RegistrationError(
            f"the CA refused the registration (HTTP {exc.status} {exc.code}): {exc}"
        ) from None
    except ModelyoError as exc:
        raise RegistrationError(str(exc)) from None


def check_registration(
    result: ca_api.VmRegistrationResult,
    root: x509.Certificate,
    state: AgentState,
    *,
    name: str,
    ca_url: str,
    now: int | None = None,
) -> RegistrationRecord:
    """The CA's answer as a record, once every certificate is on our key, issued by the
    attested root, with its role (else `RegistrationError`)."""
    try:
        if pki.load_cert(result.ca_certificate) != root:
            raise pki.CertificateError("the CA root in the answer is not the attested one")
        expected = state.key.public_key()
        for field, role in (
            ("server_certificate", pki.Role.VM_SERVER),
            ("client_certificate", pki.Role.VM),
            ("issuer_certificate", pki.Role.VM_ISSUER),
        ):
            cert = pki.load_cert(getattr(result, field))
            pki.verify_chain(cert, [], root, role=role)
            if cert.public_key() != expected:
                raise pki.CertificateError(f"the {field} is not for this agent's key")
    except pki.CertificateError as exc:
        raise RegistrationError(f"the CA's answer does not fit this agent: {exc}") from None
    return RegistrationRecord(
        vm_id=result.vm_id,
        name=name,
        ca_url=ca_url,
        ca_fingerprint=pki.fingerprint(root),
        registered_at=int(time.time()) if now is None else now,
        server_certificate=result.server_certificate,
        client_certificate=result.client_certificate,
        issuer_certificate=result.issuer_certificate,
        ca_certificate=result.ca_certificate,
        key_ids=list(result.key_ids),
    )


# --- retries -------------------------------------------------------------------------------------


def backoff_delay(failures: int, *, initial: float = INITIAL_DELAY, cap: float) -> float:
    """Seconds to wait after `failures` consecutive failures (1, 2, 4, ... at most `cap`)."""
    if failures <= 0:
        return 0.0
    return min(cap, initial * 2 ** min(failures - 1, 32))


class RegistrationStatus:
    """Whether this run of the agent is registered, and if not, the last reason why."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._record: RegistrationRecord | None = None
        self._reason = "the first attempt is under way"
        self.failures = 0

    @property
    def record(self) -> RegistrationRecord | None:
        return self._record

    @property
    def reason(self) -> str:
        return self._reason

    def failed(self, reason: str) -> None:
        with self._lock:
            self.failures += 1
            self._reason = reason

    def succeeded(self, record: RegistrationRecord) -> None:
        with self._lock:
            self._record = record
            self._reason = ""


class Registrar:
    """Attempts registration in a background thread until one succeeds or `stop()`."""

    def __init__(
        self,
        attempt: Callable[[], RegistrationRecord],
        status: RegistrationStatus,
        *,
        on_registered: Callable[[RegistrationRecord], None],
        cap: float,
        initial: float = INITIAL_DELAY,
    ) -> None:
        self._attempt = attempt
        self.status = status
        self._on_registered = on_registered
        self._cap = cap
        self._initial = initial
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="registrar", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> RegistrationRecord | None:
        """Attempt until success (returning the record) or until stopped (None)."""
        while not self._stop.is_set():
            try:
                record = self._attempt()
            except RegistrationError as exc:
                self.status.failed(str(exc))
                delay = backoff_delay(self.status.failures, initial=self._initial, cap=self._cap)
                log.warning(
                    "registration with the CA failed (attempt %d): %s; retrying in %.0f s",
                    self.status.failures,
                    exc,
                    delay,
                )
                self._stop.wait(delay)
                continue
            except Exception as exc:  # a bug must not end the retries silently
                self.status.failed(f"internal error ({type(exc).__name__}); see the agent log")
                log.exception("registration attempt crashed")
                self._stop.wait(backoff_delay(self.status.failures, cap=self._cap))
                continue
            self.status.succeeded(record)
            log.info(
                "registered with the CA as VM %s (%s); key ids %s",
                record.vm_id,
                record.name,
                ", ".join(record.key_ids) or "none",
            )
            self._on_registered(record)
            return record
        return None
