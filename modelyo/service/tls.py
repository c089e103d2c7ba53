"""TLS 1.3 for Modelyo services served by uvicorn, with the client certificate in the scope.

Server side: `server_ssl_context` builds a TLS 1.3-only context presenting a certificate chain
and asking for a client certificate without requiring one (`CERT_OPTIONAL`), with the given
roots as the only trust anchors: a certificate from any other CA fails the handshake, and the
application decides per call which role it needs. `load_identity` (re)loads the chain and key
into a context; connections accepted afterwards present the new chain.

uvicorn does not pass the peer certificate to the application, so `TlsScopeProtocol` (a small
subclass of uvicorn's h11 protocol, selected with ``Config(http=...)``) reads the verified peer
certificate from the connection's `SSLObject` once the handshake is done and adds it to every
request's scope as the ASGI TLS extension (``scope["extensions"]["tls"]``). Python 3.11 exposes
only the leaf of the client's chain (`getpeercert`); a service that accepts certificates issued
by an intermediate checks the leaf against the intermediate it expects itself.
"""

from __future__ import annotations

import os
import secrets
import socket
import ssl
import tempfile
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from uvicorn.protocols.http.h11_impl import H11Protocol

_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Any]


def tls_extension(ssl_object: ssl.SSLObject | None) -> dict[str, Any] | None:
    """The ASGI TLS extension (version 0.2) for a connection, or None when it is not TLS."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    chain = []
    if der:
        chain.append(ssl.DER_cert_to_PEM_cert(der))
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": None,
        "client_cert_error": None,  # a certificate that fails verification fails the handshake
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,
    }


def _with_tls(app: ASGIApp, tls: dict[str, Any]) -> ASGIApp:
    async def wrapped(scope: Scope, receive: Any, send: Any) -> Any:
        if scope["type"] in ("http", "websocket"):
            extensions = dict(scope.get("extensions") or {})
            extensions["tls"] = tls
            scope["extensions"] = extensions
        return await app(scope, receive, send)

    return wrapped


class TlsScopeProtocol(H11Protocol):
    """uvicorn's h11 protocol, adding the verified peer certificate to each request's scope."""

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # asyncio enables TCP_NODELAY only for sockets whose proto is IPPROTO_TCP, and sockets
        # accepted from socket.create_server() have proto 0. Without it, Nagle's algorithm
        # holds the response body until the client's delayed ACK: ~40 ms on every request.
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # asyncio calls this after the TLS handshake, so the peer certificate is known here.
        tls = tls_extension(transport.get_extra_info("ssl_object"))
        if tls is not None:
            self.app = _with_tls(self.app, tls)


def load_identity(
    context: ssl.SSLContext, key: ec.EllipticCurvePrivateKey, chain_pem: Sequence[str]
) -> None:
    """Load the certificate chain (leaf first, PEM) and its private key into `context`."""
    # load_cert_chain reads files: the key goes to a private temporary file, encrypted under
    # a random password that only this process knows, and is removed at once.
    password = secrets.token_bytes(32)
    with tempfile.TemporaryDirectory(prefix="modelyo-tls-") as tmp:
        chain_path = Path(tmp) / "chain.pem"
        key_path = Path(tmp) / "key.pem"
        chain_path.write_text("".join(chain_pem), encoding="ascii")
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.BestAvailableEncryption(password),
                )
            )
        context.load_cert_chain(chain_path, key_path, password=password)


def server_ssl_context(
    key: ec.EllipticCurvePrivateKey,
    chain_pem: Sequence[str],
    *,
    client_roots_pem: str | None,
) -> ssl.SSLContext:
    """TLS 1.3 only; presents `chain_pem` (leaf first); client certificates optional and
    accepted only when they chain to `client_roots_pem` (None: no client certificate verifies
    yet; add roots later with `context.load_verify_locations`)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    load_identity(context, key, chain_pem)
    context.verify_mode = ssl.CERT_OPTIONAL
    if client_roots_pem is not None:
        context.load_verify_locations(cadata=client_roots_pem)
    return context
