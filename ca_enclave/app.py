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
from typing import Annotated, Any

from cryptography import x509
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ca_enclave.service import CaService, ServiceError
from modelyo import pki
from modelyo.api import ca as api
from modelyo.pki import CertificateError

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

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": api.ErrorBody, "description": text}
    for status, text in {
        400: "bad input",
        401: "no client certificate",
        403: "wrong role or not allowed",
        404: "unknown",
        409: "already owned",
        422: "refused by policy",
    }.items()
}


def _error(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse(
        status_code=status, content=api.ErrorBody(error=code, detail=detail).model_dump()
    )


def peer_certificate(request: Request) -> x509.Certificate | None:
    """The client certificate the TLS handshake verified, or None when none was presented."""
    tls = request.scope.get("extensions", {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or []
    if not chain:
        return None
    try:
        return pki.load_cert(chain[0])
    except CertificateError:  # pragma: no cover (the TLS layer already parsed it)
        return None


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

    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status >= 500:
            log.error("%s", exc)
        return _error(exc.status, exc.code, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}"
            for err in exc.errors()
        )
        return _error(400, "bad-request", f"invalid request: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        # The type only: a message could carry request data; the traceback goes to the log.
        log.exception("internal error: %s", type(exc).__name__)
        return _error(500, "internal", "internal error in the CA; see its log")

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
