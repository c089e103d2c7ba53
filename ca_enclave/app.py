"""The CA's HTTP API (FastAPI) over `CaService`; the OpenAPI schema is at /openapi.json.

The caller's identity is the client certificate verified in the TLS handshake, which the
server (`ca_enclave.server`) puts in the ASGI scope as the TLS extension
(``scope["extensions"]["tls"]["client_cert_chain"]``, PEM, leaf first). Nothing is taken from
headers. Errors are JSON ``{"error": CODE, "detail": ...}`` with the statuses of
`modelyo.api.ca`; invalid input is 400 (not FastAPI's default 422, which here means "refused
by policy").
"""

from __future__ import annotations

import logging
from typing import Annotated

from cryptography import x509
from fastapi import Depends, FastAPI, Query

from ca_enclave.service import CaService
from modelyo.api import ca as api
from modelyo.service.http import error_responses, install_error_handlers, peer_certificate

log = logging.getLogger("modelyo.ca")

DESCRIPTION = """\
The Modelyo CA and key service. It runs in an SGX enclave (or on the SIMULATED platform) and:

* proves itself with a quote bound to its TLS key and your nonce (`GET /v1/attestation`);
* grants ownership once, to the first claim (`POST /v1/ownership`), signing the owner's CSR;
* issues certificates to TDX VMs whose quotes satisfy the owner's policy (`POST /v1/vms`);
* releases key-encryption keys to the owner and to VMs the policy allows (`POST /v1/keys/release`);
* keeps a hash-chained, signed audit log (`GET /v1/audit`).

Every call except attestation and the first ownership claim needs a client certificate issued
by this CA, presented in the TLS handshake: 401 without one, 403 with the wrong role.
"""

_ERRORS = error_responses(
    {
        400: "bad input",
        401: "no client certificate",
        403: "wrong role or not allowed",
        404: "unknown",
        409: "already owned",
        422: "refused by policy",
    }
)


Peer = Annotated[x509.Certificate | None, Depends(peer_certificate)]


def create_app(service: CaService) -> FastAPI:
    """The FastAPI application serving `service`."""
    app = FastAPI(
        title="Modelyo CA",
        description=DESCRIPTION,
        version=api.API_VERSION,
        openapi_url="/openapi.json",
        # The interactive pages load scripts from a CDN: not from inside an enclave.
        docs_url=None,
        redoc_url=None,
    )

    install_error_handlers(app, service="the CA", log=log)

    @app.get(
        api.ATTESTATION,
        response_model=api.AttestationResponse,
        responses=_ERRORS,
        summary="A quote binding the CA's TLS key and your nonce (open to anyone)",
    )
    def attestation(
        nonce: Annotated[str, Query(description="32 fresh random bytes as 64 hex digits")],
    ) -> api.AttestationResponse:
        return service.attestation(nonce)

    @app.post(
        api.OWNERSHIP,
        response_model=api.OwnershipGrant,
        responses=_ERRORS,
        summary="Claim ownership: the first claim wins, later ones get 409",
    )
    def ownership(claim: api.OwnershipClaim) -> api.OwnershipGrant:
        return service.claim_ownership(claim)

    @app.post(
        api.VMS,
        response_model=api.VmRegistrationResult,
        responses=_ERRORS,
        summary="Register a TDX VM with a quote bound to its CSR key",
    )
    def register_vm(registration: api.VmRegistration) -> api.VmRegistrationResult:
        return service.register_vm(registration)

    @app.get(api.VMS, response_model=api.VmList, responses=_ERRORS, summary="Registered VMs")
    def list_vms(peer: Peer) -> api.VmList:
        return service.list_vms(peer)

    @app.get(
        api.VM_CERTIFICATE,
        response_model=api.VmCertificate,
        responses=_ERRORS,
        summary="A VM's server certificate (the tool's tdx_ca.pem)",
    )
    def vm_certificate(vm_id: str, peer: Peer) -> api.VmCertificate:
        return service.vm_certificate(peer, vm_id)

    @app.get(api.POLICY, response_model=api.CaPolicy, responses=_ERRORS, summary="VM policy")
    def get_policy(peer: Peer) -> api.CaPolicy:
        return service.get_policy(peer)

    @app.put(
        api.POLICY,
        response_model=api.CaPolicy,
        responses=_ERRORS,
        summary="Replace the VM policy (VMs' key access is recomputed)",
    )
    def put_policy(policy: api.CaPolicy, peer: Peer) -> api.CaPolicy:
        return service.put_policy(peer, policy)

    @app.post(
        api.KEY_RELEASE,
        response_model=api.ReleasedKey,
        responses=_ERRORS,
        summary="Release the key-encryption key for a key id and version",
    )
    def release_key(request: api.KeyRequest, peer: Peer) -> api.ReleasedKey:
        return service.release_key(peer, request)

    @app.post(
        api.KEY_ROTATE,
        response_model=api.RotationResult,
        responses=_ERRORS,
        summary="Add a master key version (old versions still decrypt)",
    )
    def rotate(peer: Peer) -> api.RotationResult:
        return service.rotate(peer)

    @app.get(api.AUDIT, response_model=api.AuditLog, responses=_ERRORS, summary="Audit log")
    def audit_log(peer: Peer) -> api.AuditLog:
        return service.audit_log(peer)

    return app
