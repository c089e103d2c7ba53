"""TLS contexts for talking to Modelyo services: TLS 1.3 only, pinned to the root we attested.

Two situations:
- First contact (`first_contact_context`): we do not trust the server's certificate yet; the
  handshake is encrypted but unauthenticated, and nothing is sent but a request for an
  attestation, whose quote must bind the very certificate this connection presented.
- Every later call (`pinned_context`): the server's chain must lead to the root stored at
  onboarding (`ca.pem`), and we present our client certificate when we have one. Host names are
  not checked: the pinned private root is a stronger statement than a DNS name.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
from cryptography import x509

from modelyo.errors import ModelyoError


def _base() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def first_contact_context() -> ssl.SSLContext:
    """An unauthenticated TLS 1.3 context: use only to fetch and verify an attestation."""
    ctx = _base()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def pinned_context(
    root_pem: str | bytes,
    *,
    client_cert: Path | None = None,
    client_key: Path | None = None,
) -> ssl.SSLContext:
    """A TLS 1.3 context that trusts only `root_pem` and presents our client certificate."""
    ctx = _base()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(
        cadata=root_pem.decode("ascii") if isinstance(root_pem, bytes) else root_pem
    )
    if client_cert is not None:
        ctx.load_cert_chain(certfile=str(client_cert), keyfile=str(client_key))
    return ctx


def peer_certificate(response: httpx.Response) -> x509.Certificate:
    """The certificate the server presented on the connection that carried `response`."""
    stream = response.extensions.get("network_stream")
    ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
    der = ssl_object.getpeercert(True) if ssl_object is not None else None
    if not der:
        raise ModelyoError("the server presented no TLS certificate; is the URL https://?")
    return x509.load_der_x509_certificate(der)


def describe_tls_error(exc: Exception, url: str, *, presented_client_cert: bool = False) -> str:
    """Plain words for a failed connection, with what to try."""
    text = str(exc)
    # In TLS 1.3 the server checks our certificate after the client considers the handshake
    # done, so a rejection arrives as an alert on the first read, often seen as a disconnect.
    rejected = presented_client_cert and (
        "disconnected" in text or "ALERT" in text.upper() or "EOF" in text
    )
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return (
            f"{url} presented a certificate that does not chain to the pinned root (ca.pem): "
            "it is another CA, or a machine in the middle; if the CA was re-created, run "
            "`modelyo attest` again in a new directory"
        )
    if "TLSV13_ALERT_CERTIFICATE_REQUIRED" in text or "certificate required" in text:
        return f"{url} requires a client certificate; run `modelyo attest` first"
    if rejected or "ALERT_UNKNOWN_CA" in text or "BAD_CERTIFICATE" in text:
        return (
            f"{url} rejected our client certificate: it was not issued by this CA; run the "
            "command in the directory holding this CA's ca_client.pem/ca_client.key"
        )
    if "PROTOCOL_VERSION" in text or "UNSUPPORTED_PROTOCOL" in text:
        return f"{url} does not speak TLS 1.3, which Modelyo requires"
    return f"cannot connect to {url}: {text or type(exc).__name__}"
