"""`modelyo-ca`: the CA served over HTTPS (TLS 1.3 only) with uvicorn.

TLS: the server presents [its RA-TLS certificate, the CA root] and asks for a client
certificate without requiring one (`CERT_OPTIONAL`), with the CA root as the only trust anchor:
attestation and the first ownership claim work without a certificate, a certificate from any
other CA fails the handshake, and the application decides per call which role it needs.

uvicorn does not pass the peer certificate to the application, so `TlsScopeProtocol` (a small
subclass of uvicorn's h11 protocol, selected with ``Config(http=...)``) reads the verified peer
certificate from the connection's `SSLObject` once the handshake is done and adds it to every
request's scope as the ASGI TLS extension (``scope["extensions"]["tls"]``). Python 3.11 exposes
only the leaf of the client's chain (`getpeercert`), which is all the CA needs: its clients'
certificates are issued directly by the root.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import ssl
import sys
import tempfile
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from cryptography.hazmat.primitives import serialization
from uvicorn.protocols.http.h11_impl import H11Protocol

from ca_enclave.app import create_app
from ca_enclave.config import CaConfig, load_vm_policy, parse_args
from ca_enclave.sealing import GramineSealer, Sealer, SimulatedSealer
from ca_enclave.service import (
    SIMULATED_MRSIGNER,
    CaService,
    Platform,
    TlsIdentity,
    issue_tls_identity,
)
from ca_enclave.store import StateLock, Store, prepare_directory
from modelyo import pki
from modelyo.api.ca import CaPolicy
from modelyo.attestation.collateral import Collateral
from modelyo.errors import ConfigError, ModelyoError
from modelyo.measure import measure
from modelyo.tee.sgx import GramineProvider
from modelyo.tee.sim import SimulatedPlatform

log = logging.getLogger("modelyo.ca")

READY_PREFIX = "modelyo-ca listening on "
_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Any]


# --- TLS ---------------------------------------------------------------------------------------


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


def server_ssl_context(tls: TlsIdentity, root_pem: str) -> ssl.SSLContext:
    """TLS 1.3 only; chain [TLS certificate, root]; client certificates optional, root-only."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    # load_cert_chain reads files: the key goes to a private temporary file, encrypted under
    # a random password that only this process knows, and is removed at once.
    password = secrets.token_bytes(32)
    with tempfile.TemporaryDirectory(prefix="modelyo-ca-tls-") as tmp:
        chain_path = Path(tmp) / "chain.pem"
        key_path = Path(tmp) / "key.pem"
        chain_path.write_text(pki.cert_pem(tls.certificate) + root_pem, encoding="ascii")
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(
                tls.key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.BestAvailableEncryption(password),
                )
            )
        context.load_cert_chain(chain_path, key_path, password=password)
    context.verify_mode = ssl.CERT_OPTIONAL
    context.load_verify_locations(cadata=root_pem)
    return context


# --- assembling the CA ---------------------------------------------------------------------------


@dataclass
class Runtime:
    """A started CA: its service, listening socket and what must be released at the end."""

    config: CaConfig
    service: CaService
    store: Store
    lock: StateLock
    sealer: Sealer
    platform: Platform
    sock: socket.socket

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def ready_line(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        kind = "SIMULATED platform" if self.platform.simulated else "SGX enclave (Gramine)"
        return (
            f"{READY_PREFIX}https://{host}:{self.port} ({kind}, MRENCLAVE "
            f"{self.sealer.mrenclave.hex()}, CA root sha256 {self.store.root_fingerprint}, "
            f"state {self.config.state_dir})"
        )

    def close(self) -> None:
        self.sock.close()
        self.lock.release()


def _platform(config: CaConfig) -> tuple[Platform, Sealer]:
    vm_collateral = None
    if config.vm_collateral is not None:
        path = config.vm_collateral
        Collateral.from_file(path)  # fail at start, not at the first registration

        def vm_collateral() -> Collateral:
            return Collateral.from_file(path)

    own_collateral = None
    if config.collateral is not None:
        own_path = config.collateral
        Collateral.from_file(own_path)

        def own_collateral() -> Collateral:
            # Re-read on each call: the operator refreshes the file in place.
            return Collateral.from_file(own_path)

    if config.platform == "simulated":
        sim = SimulatedPlatform(config.sim_dir)
        mrenclave = measure("ca").value
        provider = sim.sgx_enclave(mr_enclave=mrenclave, mr_signer=SIMULATED_MRSIGNER)
        platform = Platform(
            name="simulated",
            provider=provider,
            simulated=True,
            collateral=own_collateral or (lambda: sim.collateral("sgx")),
            sim_platform=sim,
            vm_collateral=vm_collateral,
        )
        return platform, SimulatedSealer(sim, mrenclave)
    if own_collateral is None:
        raise ConfigError("--platform gramine needs --collateral FILE (see docs/ca.md)")
    sealer = GramineSealer(config.gramine_dir)
    platform = Platform(
        name="gramine",
        provider=GramineProvider(config.gramine_dir),
        simulated=False,
        collateral=own_collateral,
        sim_platform=SimulatedPlatform(config.sim_dir) if config.sim_dir else None,
        vm_collateral=vm_collateral,
    )
    return platform, sealer


def start(config: CaConfig) -> Runtime:
    """Lock the state directory, open or create the CA, and bind the listening socket."""
    directory = prepare_directory(config.state_dir)
    lock = StateLock(directory).acquire()
    try:
        platform, sealer = _platform(config)
        initial: CaPolicy | None = None
        if config.vm_policy is not None:
            initial = load_vm_policy(config.vm_policy)
        elif platform.simulated:
            initial = CaPolicy(root="simulation")
        store = Store.open(directory, sealer, initial_policy=initial)
        if config.vm_policy is not None and not store.created:
            log.warning(
                "--vm-policy %s ignored: this CA exists already and its policy is the owner's "
                "(change it with PUT /v1/policy)",
                config.vm_policy,
            )
        tls = issue_tls_identity(store, platform.provider, config.hosts)
        service = CaService(store, platform, tls)
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        try:
            sock = socket.create_server((config.host, config.port), family=family, backlog=256)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}; choose "
                "another --listen address"
            ) from None
    except BaseException:
        lock.release()
        raise
    return Runtime(config, service, store, lock, sealer, platform, sock)


class _Server(uvicorn.Server):
    """uvicorn's server, printing the ready line once it accepts connections."""

    def __init__(self, config: uvicorn.Config, ready_line: str) -> None:
        super().__init__(config)
        self._ready_line = ready_line

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            print(self._ready_line, flush=True)


def serve(runtime: Runtime) -> None:
    """Serve until SIGTERM or SIGINT, then close connections and return."""
    context = server_ssl_context(runtime.service.tls, pki.cert_pem(runtime.store.root_certificate))
    config = uvicorn.Config(
        create_app(runtime.service),
        http=TlsScopeProtocol,
        ws="none",
        lifespan="off",
        loop="asyncio",
        ssl_context_factory=lambda _config, _default: context,
        log_config=None,
        access_log=True,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=5,
    )
    server = _Server(config, runtime.ready_line())
    # uvicorn restores these handlers and re-raises the signal after its graceful shutdown;
    # doing nothing then lets main() return normally.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[runtime.sock])


def _stop_on_signal(sig: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {sig}")


def main(argv: list[str] | None = None) -> int:
    """The `modelyo-ca` command."""
    try:
        config = parse_args(argv)
    except ConfigError as exc:
        print(f"modelyo-ca: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Until the server runs, a signal stops start-up (every write is atomic).
    signal.signal(signal.SIGTERM, _stop_on_signal)
    try:
        runtime = start(config)
    except ModelyoError as exc:
        print(f"modelyo-ca: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    try:
        if runtime.platform.simulated:
            log.warning(
                "SIMULATED platform: quotes and sealing are software-only; for testing, never "
                "for real data"
            )
        log.info(
            "CA %s in %s", "created" if runtime.store.created else "unsealed", config.state_dir
        )
        serve(runtime)
    finally:
        runtime.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
