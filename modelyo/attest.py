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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from modelyo import pki
from modelyo.attestation.policy import SgxPolicy, load_policy, parse_policy
from modelyo.attestation.verify import TrustRoot, Verdict
from modelyo.client import ca as ca_client
from modelyo.client.http import AlreadyOwnedError
from modelyo.errors import ConfigError
from modelyo.measure import measure
from modelyo.workspace import (
    CA_CERT,
    CA_CLIENT_CERT,
    CA_CLIENT_KEY,
    Endpoint,
    Workspace,
    WorkspaceConfig,
)

PENDING_KEY = ".ca_client.key.pending"


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


def expected_ca_policy(
    *,
    policy_file: Path | None,
    mrenclave: tuple[str, ...] = (),
    mrsigner: tuple[str, ...] = (),
    simulation: bool,
) -> tuple[SgxPolicy, str]:
    """The CA policy to apply, and a phrase saying where its expected values came from."""
    policy = load_policy(policy_file).ca if policy_file else SgxPolicy()
    source = str(policy_file) if policy_file else "defaults"
    update: dict[str, Any] = {}
    if mrenclave:
        update["allowed_mrenclave"] = list(mrenclave)
        source = "--mrenclave"
    if mrsigner:
        update["allowed_mrsigner"] = list(mrsigner)
        source = "--mrsigner" if not mrenclave else source
    if update:
        policy = parse_policy({"ca": {**policy.model_dump(), **update}}).ca
    if not policy.pins_anything():
        if not simulation:
            raise ConfigError(
                "no expected CA measurement: pass --mrenclave HEX (from the CA's signed build) "
                "or --policy FILE with [ca] allowed_mrenclave; refusing to trust an unpinned CA"
            )
        # On the simulated platform the CA measures its own code; this installation has the
        # same code, so `modelyo measure ca` here is the expected value.
        policy = parse_policy(
            {"ca": {**policy.model_dump(), "allowed_mrenclave": [measure("ca").hex]}}
        ).ca
        source = "`modelyo measure ca` of this installation (SIMULATED)"
    return policy, source


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
        _save_config(workspace, url, attested.simulated, sim_dir)
        return result

    pending = workspace.path(PENDING_KEY)
    key = pki.read_private_key(pending) if pending.is_file() else _new_pending_key(pending)
    try:
        with ca_client.CaClient(url, root_pem) as client:
            grant = client.claim_ownership(key, f"modelyo owner {_login()}")
    except AlreadyOwnedError as exc:
        pending.unlink(missing_ok=True)
        raise AlreadyOwnedError(
            exc.status,
            exc.code,
            f"the CA at {url} belongs to another party: {exc} Nothing was changed in "
            f"{workspace.root}.",
        ) from None
    cert = pki.load_cert(grant.client_certificate)
    pki.verify_chain(cert, [], attested.root, role=pki.Role.OWNER)
    if cert.public_key() != key.public_key():
        raise ConfigError("the CA issued a client certificate for another key; not storing it")
    pki.write_cert(workspace.path(CA_CLIENT_CERT), cert)
    os.replace(pending, workspace.path(CA_CLIENT_KEY))
    pki.write_cert(pinned, attested.root)
    _save_config(workspace, url, attested.simulated, sim_dir)
    result.ownership = "claimed"
    result.client_fingerprint = pki.fingerprint(cert)
    result.files = [CA_CERT, CA_CLIENT_CERT, CA_CLIENT_KEY]
    return result


def _new_pending_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = pki.new_key()
    pki.write_private_key(path, key)
    return key


def _save_config(workspace: Workspace, url: str, simulated: bool, sim_dir: Path | None) -> None:
    config = workspace.config()
    update = {"ca_url": url, "simulation": simulated}
    if sim_dir is not None and simulated:
        update["sim_dir"] = str(sim_dir)
    workspace.save_config(WorkspaceConfig.model_validate({**config.model_dump(), **update}))


def _login() -> str:
    with contextlib.suppress(OSError):
        return os.getlogin()
    return os.environ.get("USER", "user")
