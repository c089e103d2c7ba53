"""The HTTP conventions of Modelyo services (FastAPI): error bodies and the caller's certificate.

Errors are JSON ``{"error": CODE, "detail": ...}`` (`modelyo.api.ca.ErrorBody`) with the status
of the `modelyo.service.errors.ServiceError` raised; invalid input is 400 (not FastAPI's
default 422, which here means "refused"); anything unexpected is 500 with only the exception's
type in the log line's message (a message could carry request data) and the traceback in the
log. The caller's identity is the client certificate verified in the TLS handshake, which
`modelyo.service.tls.TlsScopeProtocol` puts in the ASGI scope; nothing is taken from headers.
"""

from __future__ import annotations

import logging
from typing import Any

from cryptography import x509
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from modelyo import pki
from modelyo.api.ca import ErrorBody
from modelyo.pki import CertificateError
from modelyo.service.errors import ServiceError


def error_response(status: int, code: str, detail: str) -> JSONResponse:
    """An error answer in the API's format."""
    return JSONResponse(
        status_code=status, content=ErrorBody(error=code, detail=detail).model_dump()
    )


def error_responses(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting error statuses with the `ErrorBody` model."""
    return {
        status: {"model": ErrorBody, "description": text} for status, text in descriptions.items()
    }


def install_error_handlers(app: FastAPI, *, service: str, log: logging.Logger) -> None:
    """Answer `ServiceError`, invalid input, unknown routes and crashes in the API's format.

    `service` names the service in the 500 answer ("the CA", "the agent").
    """

    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status == 503:
            log.warning("%s", exc)  # a state that passes (not registered yet, engine away)
        elif exc.status >= 500:
            log.error("%s", exc)
        return error_response(exc.status, exc.code, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}"
            for err in exc.errors()
        )
        return error_response(400, "bad-request", f"invalid request: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        # The type only: a message could carry request data; the traceback goes to the log.
        log.exception("internal error: %s", type(exc).__name__)
        return error_response(500, "internal", f"internal error in {service}; see its log")


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
