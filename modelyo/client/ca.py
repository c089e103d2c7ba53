"""The tool's client for the Modelyo CA (see modelyo/api/ca.py for the API)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel

from modelyo import pki
from modelyo.api import ca as api
from modelyo.attestation import binding
from modelyo.attestation.policy import SgxPolicy
from modelyo.attestation.verify import TrustRoot, Verdict
from modelyo.client import http
from modelyo.client.http import (
    TIMEOUT,
    M,
    parse_response,
)
from modelyo.client.tls import (
    describe_tls_error,
    first_contact_context,
    pinned_context,
)
from modelyo.errors import AttestationError, ModelyoError, NotAttestedError
from modelyo.workspace import (
    ATTEST_HINT,
    CA_CERT,
    CA_CLIENT_CERT,
    CA_CLIENT_KEY,
    CA_FILES,
    Workspace,
)


@dataclass(frozen=True)
class AttestedCa:
    """What the CA proved in step 1 of attestation."""

    url: str
    verdict: Verdict
    root: x509.Certificate
    tls_certificate: x509.Certificate
    simulated: bool


def fetch_attestation(url: str, nonce: bytes) -> tuple[api.AttestationResponse, x509.Certificate]:
    """Ask for a quote answering `nonce`; return it with the certificate TLS presented."""
    return http.fetch_attestation(url, api.ATTESTATION, nonce, api.AttestationResponse)


def check_attestation(
    url: str,
    body: api.AttestationResponse,
    presented: x509.Certificate,
    nonce: bytes,
    *,
    trust: TrustRoot,
    policy: SgxPolicy,
    now: int | None = None,
) -> AttestedCa:
    """Decide whether an attestation proves a genuine CA on the connection that carried it.

    The certificate TLS presented must be the chain's leaf, issued by the chain's root, and the
    quote must verify and bind that leaf's key and our nonce. Raises `AttestationError`.
    """
    chain = [pki.load_cert(pem) for pem in body.certificate_chain]
    if len(chain) < 2:
        raise AttestationError(f"{url} sent a certificate chain of {len(chain)}, expected 2")
    tls_cert, root = chain[0], chain[-1]
    if tls_cert != presented:
        raise AttestationError(
            f"{url}: the certificate in the attestation is not the one this TLS connection "
            "presented (a machine in the middle, or a relayed attestation)"
        )
    try:
        pki.verify_chain(tls_cert, chain[1:-1], root, role=pki.Role.CA_SERVER)
        if pki.role_of(root) is not pki.Role.CA_ROOT or not pki.issued_by(root, root):
            raise pki.CertificateError("the last certificate is not a self-signed CA root")
    except pki.CertificateError as exc:
        raise AttestationError(f"{url}: {exc}") from None
    verdict = http.verify_attestation_answer(
        url,
        quote_b64=body.quote,
        collateral_json=body.collateral,
        simulated=body.simulated,
        presented=presented,
        nonce=nonce,
        trust=trust,
        policy=policy,
        policy_name="ca",
        what="CA",
        now=now,
    )
    return AttestedCa(url, verdict, root, tls_cert, simulated=verdict.simulated)


def attest(url: str, *, trust: TrustRoot, policy: SgxPolicy, now: int | None = None) -> AttestedCa:
    """Fetch a fresh quote over TLS and verify it binds this very connection's key and our nonce.

    Raises `AttestationError` (with the verdict) on any refusal; nothing is trusted before.
    """
    nonce = binding.new_nonce()
    body, presented = fetch_attestation(url, nonce)
    return check_attestation(url, body, presented, nonce, trust=trust, policy=policy, now=now)


class CaClient:
    """Calls to an attested CA, over TLS pinned to its root, with our client certificate."""

    def __init__(
        self,
        url: str,
        root_pem: str | bytes,
        *,
        client_cert: Path | None = None,
        client_key: Path | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._presents_cert = client_cert is not None
        self._client = httpx.Client(
            base_url=self.url,
            verify=pinned_context(root_pem, client_cert=client_cert, client_key=client_key),
            timeout=TIMEOUT,
        )

    @classmethod
    def for_owner(cls, workspace: Workspace) -> CaClient:
        """The owner's client, from the files `modelyo attest` stored in `workspace`."""
        workspace.require(CA_FILES, needed_for="talking to the CA as its owner")
        url = workspace.config().ca_url
        if not url:
            raise NotAttestedError(f"no ca_url in {workspace.config_path}: {ATTEST_HINT}")
        return cls(
            url,
            workspace.path(CA_CERT).read_bytes(),
            client_cert=workspace.path(CA_CLIENT_CERT),
            client_key=workspace.path(CA_CLIENT_KEY),
        )

    def __enter__(self) -> CaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def _call(self, method: str, path: str, model: type[M], body: BaseModel | None = None) -> M:
        try:
            response = self._client.request(
                method,
                path,
                content=body.model_dump_json() if body else None,
                headers={"content-type": "application/json"} if body else None,
            )
        except httpx.HTTPError as exc:
            message = describe_tls_error(exc, self.url, presented_client_cert=self._presents_cert)
            raise ModelyoError(message) from None
        return parse_response(model, response, self.url)

    def claim_ownership(self, key: ec.EllipticCurvePrivateKey, name: str) -> api.OwnershipGrant:
        """Ask to become the owner; raises `AlreadyOwnedError` when someone else is."""
        csr = pki.make_csr(key, name)
        return self._call(
            "POST", api.OWNERSHIP, api.OwnershipGrant, api.OwnershipClaim(csr=pki.csr_pem(csr))
        )

    def list_vms(self) -> api.VmList:
        return self._call("GET", api.VMS, api.VmList)

    def vm_certificate(self, vm_id: str) -> api.VmCertificate:
        return self._call("GET", api.VM_CERTIFICATE.format(vm_id=vm_id), api.VmCertificate)

    def policy(self) -> api.CaPolicy:
        return self._call("GET", api.POLICY, api.CaPolicy)

    def set_policy(self, policy: api.CaPolicy) -> api.CaPolicy:
        return self._call("PUT", api.POLICY, api.CaPolicy, policy)

    def release_key(self, key_id: str = "default", version: int | None = None) -> api.ReleasedKey:
        return self._call(
            "POST", api.KEY_RELEASE, api.ReleasedKey, api.KeyRequest(key_id=key_id, version=version)
        )

    def rotate(self) -> api.RotationResult:
        return self._call("POST", api.KEY_ROTATE, api.RotationResult)

    def audit(self) -> api.AuditLog:
        return self._call("GET", api.AUDIT, api.AuditLog)


def wait_until_serving(url: str, timeout: float = 30.0) -> None:
    """Wait until a service answers TLS at `url` (used after starting one)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with httpx.Client(verify=first_contact_context(), timeout=2.0) as client:
                client.get(url + "/openapi.json")
            return
        except httpx.HTTPError as exc:
            last = exc
            time.sleep(0.1)
    raise ModelyoError(f"{url} did not answer within {timeout:.0f} s ({last})")
