"""`modelyo attest`: establish trust in the CA (and later the TDX VM) and take ownership.

Step 1, the CA (product document, "Attestation"):
1. fetch a quote bound to the CA's TLS key and our fresh nonce, verify it (signature chain,
   collateral, TCB, expected measurements, binding);
2. over that channel, claim ownership with a CSR for a key generated here;
3. store `ca.pem` (the CA root), `ca_client.pem` and `ca_client.key` (0600).
Nothing is written unless the CA is verified and the claim succeeds; a CA owned by someone else
leaves the directory untouched. The private key is written (as a hidden pending file) before
the claim, so a crash after the CA granted ownership can resume with the same key.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric import ec

from modelyo import gpu, pki
from modelyo.api.agent import GpuReport
from modelyo.attestation import binding
from modelyo.attestation.policy import Policy, SgxPolicy, TdxPolicy, load_policy, parse_policy
from modelyo.attestation.verify import TrustRoot, Verdict
from modelyo.client import agent as agent_client
from modelyo.client import ca as ca_client
from modelyo.client.agent import AttestedAgent
from modelyo.client.http import AlreadyOwnedError, ServiceError
from modelyo.errors import AttestationError, ConfigError
from modelyo.measure import measure
from modelyo.workspace import (
    CA_CERT,
    CA_CLIENT_CERT,
    CA_CLIENT_KEY,
    TDX_CERT,
    TDX_CLIENT_CERT,
    TDX_CLIENT_KEY,
    Endpoint,
    Workspace,
    WorkspaceConfig,
)

PENDING_KEY = ".ca_client.key.pending"
TDX_PENDING_KEY = ".tdx_client.key.pending"
G = TypeVar("G")


@dataclass
class CaOnboarding:
    """The outcome of step 1."""

    url: str
    url_source: str
    verdict: Verdict
    root_fingerprint: str
    client_fingerprint: str
    ownership: str  # "claimed" or "already owner"
    expected_from: str
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "url_source": self.url_source,
            "simulated": self.verdict.simulated,
            "ownership": self.ownership,
            "root_fingerprint": self.root_fingerprint,
            "client_fingerprint": self.client_fingerprint,
            "expected_measurements_from": self.expected_from,
            "files": self.files,
            "verdict": self.verdict.to_dict(),
        }


# Per party: the policy section, its pinned registers, and the component `modelyo measure`
# names. One function serves both steps.
_EXPECTED = {
    "ca": ("allowed_mrenclave", "ca", "--mrenclave HEX (from the CA's signed build)", "CA"),
    "tdx": ("allowed_mrtd", "agent", "--mrtd HEX", "TDX VM"),
}


def expected_policy(
    section: str, *, policy_file: Path | None, pins: dict[str, tuple[str, ...]], simulation: bool
) -> tuple[Any, str]:
    """The policy section ("ca" or "tdx") to apply, and where its expected values came from.

    Flags (`pins`: policy field -> values) override the file. With nothing pinned, hardware is
    refused; on the simulated platform the component measures its own code, which this
    installation shares, so `modelyo measure` here gives the expected value.
    """
    main_field, component, flag, what = _EXPECTED[section]
    base = load_policy(policy_file) if policy_file else Policy()
    values = getattr(base, section).model_dump()
    source = str(policy_file) if policy_file else "defaults"
    for field_name, given in pins.items():
        if given:
            values[field_name] = list(given)
            source = "--" + field_name.removeprefix("allowed_")
    policy = getattr(parse_policy({section: values}), section)
    if not policy.pins_anything():
        if not simulation:
            raise ConfigError(
                f"no expected {what} measurement: pass {flag} or --policy FILE with "
                f"[{section}] {main_field}; refusing to trust an unpinned {what}"
            )
        values[main_field] = [measure(component).hex]
        policy = getattr(parse_policy({section: values}), section)
        source = f"`modelyo measure {component}` of this installation (SIMULATED)"
    return policy, source


def expected_ca_policy(
    *,
    policy_file: Path | None,
    mrenclave: tuple[str, ...] = (),
    mrsigner: tuple[str, ...] = (),
    simulation: bool,
) -> tuple[SgxPolicy, str]:
    """The CA's expected measurements (step 1)."""
    pins = {"allowed_mrenclave": mrenclave, "allowed_mrsigner": mrsigner}
    return expected_policy("ca", policy_file=policy_file, pins=pins, simulation=simulation)


def attest_ca(
    workspace: Workspace,
    endpoint: Endpoint,
    *,
    trust: TrustRoot,
    policy: SgxPolicy,
    expected_from: str,
    sim_dir: Path | None = None,
    now: int | None = None,
) -> CaOnboarding:
    """Step 1: verify the CA, claim ownership (or confirm it), store the three CA files."""
    url = endpoint.url.rstrip("/")
    attested = ca_client.attest(url, trust=trust, policy=policy, now=now)
    root_pem = pki.cert_pem(attested.root)
    result = CaOnboarding(
        url=url,
        url_source=endpoint.source,
        verdict=attested.verdict,
        root_fingerprint=pki.fingerprint(attested.root),
        client_fingerprint="",
        ownership="",
        expected_from=expected_from,
    )

    pinned = workspace.path(CA_CERT)
    if pinned.is_file():
        known = pki.load_cert(pinned.read_bytes())
        if known != attested.root:
            raise ConfigError(
                f"{workspace.root} holds the files of another CA (root "
                f"{pki.fingerprint(known)[:16]}…) but {url} has root "
                f"{result.root_fingerprint[:16]}…; run `modelyo attest` in a new directory"
            )
    if workspace.ca_owner:
        cert = pki.load_cert(workspace.path(CA_CLIENT_CERT).read_bytes())
        pki.verify_chain(cert, [], attested.root, role=pki.Role.OWNER)
        with ca_client.CaClient(
            url,
            root_pem,
            client_cert=workspace.path(CA_CLIENT_CERT),
            client_key=workspace.path(CA_CLIENT_KEY),
        ) as client:
            client.list_vms()  # an owner-only call: proves the CA still knows us
        result.ownership = "already owner"
        result.client_fingerprint = pki.fingerprint(cert)
        _save_config(workspace, ca_url=url, simulated=attested.simulated, sim_dir=sim_dir)
        return result

    with ca_client.CaClient(url, root_pem) as client:
        key, grant = _claim(workspace, PENDING_KEY, "CA", url, client.claim_ownership)
    cert = pki.load_cert(grant.client_certificate)
    pki.verify_chain(cert, [], attested.root, role=pki.Role.OWNER)
    if cert.public_key() != key.public_key():
        raise ConfigError("the CA issued a client certificate for another key; not storing it")
    pki.write_cert(workspace.path(CA_CLIENT_CERT), cert)
    os.replace(workspace.path(PENDING_KEY), workspace.path(CA_CLIENT_KEY))
    pki.write_cert(pinned, attested.root)
    _save_config(workspace, ca_url=url, simulated=attested.simulated, sim_dir=sim_dir)
    result.ownership = "claimed"
    result.client_fingerprint = pki.fingerprint(cert)
    result.files = [CA_CERT, CA_CLIENT_CERT, CA_CLIENT_KEY]
    return result


def _claim(
    workspace: Workspace,
    pending_name: str,
    what: str,
    url: str,
    claim: Callable[[ec.EllipticCurvePrivateKey, str], G],
) -> tuple[ec.EllipticCurvePrivateKey, G]:
    """Claim ownership with a key kept in a hidden pending file until the grant is stored.

    The key reaches the disk (0600) before the claim, so a crash after the service granted
    ownership can resume with the same key (services answer a repeated claim by their owner's
    key with the same certificate). A refusal removes it: nothing is left behind.
    """
    pending = workspace.path(pending_name)
    if pending.is_file():
        key = pki.read_private_key(pending)
    else:
        key = pki.new_key()
        pki.write_private_key(pending, key)
    try:
        return key, claim(key, f"modelyo owner {_login()}")
    except AlreadyOwnedError as exc:
        pending.unlink(missing_ok=True)
        raise AlreadyOwnedError(
            exc.status,
            exc.code,
            f"the {what} at {url} belongs to another party: {exc} Nothing was changed in "
            f"{workspace.root}.",
        ) from None


def _save_config(
    workspace: Workspace, *, simulated: bool, sim_dir: Path | None = None, **urls: str
) -> None:
    config = workspace.config()
    update: dict[str, Any] = {**urls, "simulation": simulated or config.simulation}
    if sim_dir is not None and simulated:
        update["sim_dir"] = str(sim_dir)
    workspace.save_config(WorkspaceConfig.model_validate({**config.model_dump(), **update}))


def _login() -> str:
    with contextlib.suppress(OSError):
        return os.getlogin()
    return os.environ.get("USER", "user")


# --- step 2: the TDX VM -----------------------------------------------------------------------


@dataclass
class TdxOnboarding:
    """The outcome of step 2."""

    url: str
    url_source: str
    vm_id: str
    verdict: Verdict
    gpus: GpuReport
    server_fingerprint: str
    client_fingerprint: str
    ownership: str
    expected_from: str
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "url_source": self.url_source,
            "vm_id": self.vm_id,
            "simulated": self.verdict.simulated,
            "ownership": self.ownership,
            "server_fingerprint": self.server_fingerprint,
            "client_fingerprint": self.client_fingerprint,
            "expected_measurements_from": self.expected_from,
            "gpus": self.gpus.model_dump(),
            "files": self.files,
            "verdict": self.verdict.to_dict(),
        }


def expected_tdx_policy(
    *, policy_file: Path | None, mrtd: tuple[str, ...] = (), simulation: bool
) -> tuple[TdxPolicy, str]:
    """The TDX VM's expected measurements (step 2)."""
    pins = {"allowed_mrtd": mrtd}
    return expected_policy("tdx", policy_file=policy_file, pins=pins, simulation=simulation)


def attest_tdx(
    workspace: Workspace,
    endpoint: Endpoint,
    *,
    trust: TrustRoot,
    policy: TdxPolicy,
    expected_from: str,
    sim_dir: Path | None = None,
    now: int | None = None,
) -> TdxOnboarding:
    """Step 2: the VM's certificate from the CA, its quote and GPUs verified, ownership."""
    url = endpoint.url.rstrip("/")
    if not workspace.ca_owner:
        raise ConfigError("step 2 needs step 1: attest the CA first (`modelyo attest --ca URL`)")
    root = pki.load_cert(workspace.path(CA_CERT).read_bytes())
    root_pem = pki.cert_pem(root)

    nonce = binding.new_nonce()
    body, presented = agent_client.fetch_attestation(url, nonce)
    with ca_client.CaClient.for_owner(workspace) as ca:
        try:
            issued = ca.vm_certificate(body.vm_id)
        except ServiceError as exc:
            raise AttestationError(
                f"the CA has not certified VM {body.vm_id!r} that {url} claims to be ({exc})"
            ) from None
    vm_cert = pki.load_cert(issued.server_certificate)
    attested = agent_client.check_attestation(
        url,
        body,
        presented,
        nonce,
        ca_root=root,
        vm_certificate=vm_cert,
        trust=trust,
        policy=policy,
        now=now,
    )
    gpus = verify_gpu_evidence(body.gpus, attested, nonce, sim_dir=sim_dir)
    result = TdxOnboarding(
        url=url,
        url_source=endpoint.source,
        vm_id=body.vm_id,
        verdict=attested.verdict,
        gpus=gpus,
        server_fingerprint=pki.fingerprint(vm_cert),
        client_fingerprint="",
        ownership="",
        expected_from=expected_from,
    )

    pinned = workspace.path(TDX_CERT)
    if pinned.is_file() and pki.load_cert(pinned.read_bytes()).public_key() != vm_cert.public_key():
        raise ConfigError(
            f"{workspace.root} holds the files of another TDX VM; run `modelyo attest` for "
            f"{url} in a new directory"
        )
    if workspace.has(TDX_CERT, TDX_CLIENT_CERT, TDX_CLIENT_KEY):
        with agent_client.AgentClient.for_owner(workspace) as agent:
            agent.gpus()  # an owner-only call: proves the VM still knows us
        result.ownership = "already owner"
        pki.write_cert(pinned, vm_cert)  # the VM's certificate is renewed at each registration
        chain = pki.load_certs(workspace.path(TDX_CLIENT_CERT).read_bytes())
        result.client_fingerprint = pki.fingerprint(chain[0])
        _save_config(workspace, tdx_url=url, simulated=attested.simulated, sim_dir=sim_dir)
        return result

    with agent_client.AgentClient(url, root_pem, vm_cert) as agent:
        key, grant = _claim(workspace, TDX_PENDING_KEY, "TDX VM", url, agent.claim_ownership)
    leaf = pki.load_cert(grant.client_certificate)
    issuer = pki.load_cert(grant.issuer_certificate)
    pki.verify_chain(issuer, [], root, role=pki.Role.VM_ISSUER)
    pki.verify_chain(leaf, [issuer], root, role=pki.Role.VM_OWNER)
    if issuer.public_key() != vm_cert.public_key():
        raise AttestationError("the client certificate was issued by another VM; not storing it")
    if leaf.public_key() != key.public_key():
        raise ConfigError("the VM issued a client certificate for another key; not storing it")
    pki.write_cert(workspace.path(TDX_CLIENT_CERT), leaf, issuer)
    os.replace(workspace.path(TDX_PENDING_KEY), workspace.path(TDX_CLIENT_KEY))
    pki.write_cert(pinned, vm_cert)
    _save_config(workspace, tdx_url=url, simulated=attested.simulated, sim_dir=sim_dir)
    result.ownership = "claimed"
    result.client_fingerprint = pki.fingerprint(leaf)
    result.files = [TDX_CERT, TDX_CLIENT_CERT, TDX_CLIENT_KEY]
    return result


def verify_gpu_evidence(
    report: GpuReport, attested: AttestedAgent, nonce: bytes, *, sim_dir: Path | None
) -> GpuReport:
    """Check every GPU's evidence ourselves; its nonce must be REPORTDATA[0:32] of the quote."""
    gpu_nonce = binding.report_data(
        binding.spki_der(attested.server_certificate.public_key()), nonce
    )[:32]
    if attested.simulated:
        # The simulated GPUs' root and reference values live beside the simulated platform.
        platform = gpu.simulated_platform(sim_dir / "gpu" if sim_dir else None)
        roots, references = [platform.device_root()], platform.reference_measurements()
    elif report.gpus:
        raise ConfigError(
            "the VM reports GPUs but no NVIDIA device root and reference measurements are "
            "configured to verify them; hardware GPU verification needs both"
        )
    else:
        return report
    checked = gpu.verify(report, gpu_nonce, roots=roots, references=references)
    failed = [g for g in checked.gpus if not g.verified]
    if failed:
        problems = "; ".join(f"GPU {g.index}: {', '.join(g.problems)}" for g in failed)
        raise AttestationError(f"TDX VM attestation refused: GPU evidence: {problems}")
    return checked


# --- both steps, as `modelyo attest` and `%modelyo attest` run them ----------------------------


@dataclass(frozen=True)
class AttestOptions:
    """The options of `modelyo attest` (and `%modelyo attest`)."""

    ca_url: str | None = None
    tdx_url: str | None = None
    policy_file: Path | None = None
    mrenclave: tuple[str, ...] = ()
    mrsigner: tuple[str, ...] = ()
    mrtd: tuple[str, ...] = ()
    simulation: bool = False
    sim_dir: Path | None = None
    at: int | None = None
    directory: Path = Path(".")


@dataclass
class AttestOutcome:
    """Both steps' results; `tdx` is None when no VM endpoint was found (step 2 skipped)."""

    workspace: Workspace
    ca: CaOnboarding
    tdx: TdxOnboarding | None
    simulated: bool


def attest_workspace(
    options: AttestOptions, *, on_ca: Callable[[CaOnboarding], None] | None = None
) -> AttestOutcome:
    """Step 1 (the CA), then step 2 (the TDX VM) when a VM endpoint is found, with the
    tool's endpoint discovery and trust choice. `on_ca` sees step 1's result before step 2
    starts (the CLI prints it then)."""
    from modelyo import dev
    from modelyo.workspace import resolve_endpoint

    workspace = Workspace(options.directory.resolve())
    stack = dev.read_stack()
    running = dev.running_endpoints()
    endpoint = resolve_endpoint("ca", options.ca_url, workspace, dev_stack=running)
    if endpoint is None:
        raise ConfigError(
            "no CA endpoint: pass --ca URL, set MODELYO_CA_URL, write ca_url in ./modelyo.toml, "
            "or start the local stack with `modelyo dev up`"
        )
    config = workspace.config()
    from_stack = endpoint.source.startswith("the local stack")
    # Trusting the simulation root is always the user's explicit choice: the flag, a config
    # that recorded it, or starting the simulated stack with `modelyo dev up`.
    simulated = options.simulation or config.simulation or from_stack
    trust = TrustRoot.intel()
    sim_dir = options.sim_dir
    if simulated:
        if sim_dir is None and config.sim_dir:
            sim_dir = Path(config.sim_dir)
        if sim_dir is None and stack is not None:
            sim_dir = Path(stack.sim_dir)
        if sim_dir is None and os.environ.get("MODELYO_SIM_DIR"):
            sim_dir = Path(os.environ["MODELYO_SIM_DIR"])
        trust = TrustRoot.simulation(sim_dir)
    policy_path = options.policy_file or (Path(config.policy) if config.policy else None)
    policy, expected_from = expected_ca_policy(
        policy_file=policy_path,
        mrenclave=options.mrenclave,
        mrsigner=options.mrsigner,
        simulation=simulated,
    )
    ca = attest_ca(
        workspace,
        endpoint,
        trust=trust,
        policy=policy,
        expected_from=expected_from,
        sim_dir=sim_dir,
        now=options.at,
    )
    if on_ca is not None:
        on_ca(ca)
    tdx = None
    tdx_endpoint = resolve_endpoint("tdx", options.tdx_url, workspace, dev_stack=running)
    if tdx_endpoint is not None:
        tdx_policy, tdx_expected = expected_tdx_policy(
            policy_file=policy_path, mrtd=options.mrtd, simulation=simulated
        )
        tdx = attest_tdx(
            workspace,
            tdx_endpoint,
            trust=trust,
            policy=tdx_policy,
            expected_from=tdx_expected,
            sim_dir=sim_dir,
            now=options.at,
        )
    simulated = ca.verdict.simulated or bool(tdx and tdx.verdict.simulated)
    return AttestOutcome(workspace, ca, tdx, simulated)
