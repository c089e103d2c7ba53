"""What every Modelyo client shares: timeouts and turning error answers into exceptions."""

from __future__ import annotations

import base64
from typing import TypeVar

import httpx
from cryptography import x509
from pydantic import BaseModel, ValidationError

from modelyo.api.ca import ErrorBody
from modelyo.attestation.policy import SgxPolicy, TdxPolicy
from modelyo.attestation.verify import TrustRoot, Verdict
from modelyo.errors import AttestationError, ModelyoError

TIMEOUT = httpx.Timeout(30.0, connect=10.0)
M = TypeVar("M", bound=BaseModel)


class ServiceError(ModelyoError):
    """A Modelyo service answered with an error: `status`, `code` and its explanation."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code


class AlreadyOwnedError(ServiceError):
    """The service already has an owner (HTTP 409)."""


def raise_for_error(response: httpx.Response, url: str) -> None:
    if response.is_success:
        return
    try:
        body = ErrorBody.model_validate_json(response.content)
        code, detail = body.error, body.detail
    except ValidationError:
        code, detail = "http", f"{url} answered HTTP {response.status_code}: {response.text[:200]}"
    cls = AlreadyOwnedError if response.status_code == 409 else ServiceError
    raise cls(response.status_code, code, detail)


def parse_response(model: type[M], response: httpx.Response, url: str) -> M:
    raise_for_error(response, url)
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise ModelyoError(f"{url} sent a malformed {model.__name__}: {exc}") from None


def fetch_attestation(
    url: str, path: str, nonce: bytes, model: type[M]
) -> tuple[M, x509.Certificate]:
    """Ask a service for a quote answering `nonce` over first-contact TLS; return the answer
    with the certificate that very TLS connection presented (which the quote must bind)."""
    from modelyo.client.tls import describe_tls_error, first_contact_context, peer_certificate

    try:
        with (
            httpx.Client(verify=first_contact_context(), timeout=TIMEOUT) as client,
            client.stream("GET", url + path, params={"nonce": nonce.hex()}) as response,
        ):
            # Read the certificate while the connection is surely open: a server may close it
            # as soon as the body is sent.
            presented = peer_certificate(response)
            response.read()
    except httpx.HTTPError as exc:
        raise ModelyoError(describe_tls_error(exc, url)) from None
    return parse_response(model, response, url), presented


def verify_attestation_answer(
    url: str,
    *,
    quote_b64: str,
    collateral_json: str,
    simulated: bool,
    presented: x509.Certificate,
    nonce: bytes,
    trust: TrustRoot,
    policy: SgxPolicy | TdxPolicy,
    policy_name: str,
    what: str,
    now: int | None = None,
) -> Verdict:
    """Verify a service's fresh quote: it must bind the key TLS `presented` and our `nonce`,
    satisfy `policy` under `trust`, and come from hardware unless we chose to trust the
    simulation. Raises `AttestationError` naming `what` was refused."""
    from modelyo.attestation import ratls
    from modelyo.attestation.collateral import Collateral

    try:
        quote = base64.b64decode(quote_b64, validate=True)
    except ValueError:
        raise AttestationError(f"{url} sent a quote that is not base64") from None
    verdict = ratls.verify_challenge(
        quote,
        nonce,
        presented,
        Collateral.from_json(collateral_json),
        root=trust,
        policy=policy,
        policy_name=policy_name,
        now=now,
    )
    if simulated and not trust.simulated:
        verdict.add("platform", False, f"the {what} runs on the SIMULATED platform")
    return verdict.raise_for_refusal(f"{what} attestation")
