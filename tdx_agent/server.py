"""`modelyo-agent`: the agent in a TDX VM, served over HTTPS (TLS 1.3 only) with uvicorn.

Start-up: lock the state directory and load (or make) the agent's key, bind the listening socket,
print one ready line, then register with the CA in the background (`tdx_agent.boot`), retrying
with backoff. Until registered the agent serves with a temporary self-signed certificate on its
key and answers every call 503 ("not registered with the CA yet: <reason>"); nothing it says then
is trustworthy, and nothing is asked of it but to explain itself. Once registered it presents
[its CA-issued vm-server certificate, the CA root] on new connections, and trusts client
certificates that chain to the CA root (the application then requires THIS VM's issuer and the
owner's key for owner calls).

The serving machinery (TLS context, client certificate in the ASGI scope, TCP_NODELAY, ready
line, signals, error bodies) is shared with the CA: `modelyo.service`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from modelyo import pki
from modelyo.api.ca import ANY_KEY_ID
from modelyo.client.ca import CaClient
from modelyo.client.keys import CaKeySource
from modelyo.errors import ModelyoError
from modelyo.service.runner import bind, serve_https, stop_on_signal, url_of
from modelyo.service.tls import load_identity, server_ssl_context
from tdx_agent.app import create_app
from tdx_agent.boot import (
    AgentPlatform,
    Registrar,
    RegistrationStatus,
    make_platform,
    register,
)
from tdx_agent.config import AgentConfig, parse_args
from tdx_agent.containers import ContainerRuntime
from tdx_agent.cryptdirs import CryptDirs
from tdx_agent.gpus import make_gpus
from tdx_agent.service import AgentService
from tdx_agent.state import AgentState, RegistrationRecord

log = logging.getLogger("modelyo.agent")

READY_PREFIX = "modelyo-agent listening on "
PROVISIONAL_NAME = "Modelyo agent (not registered with the CA yet)"


class KeyIds(Collection[str]):
    """The key ids this VM's rule allows, where "*" (`ANY_KEY_ID`) allows every key id."""

    def __init__(self, key_ids: Collection[str]) -> None:
        self._ids = frozenset(key_ids)

    def __contains__(self, key_id: object) -> bool:
        return ANY_KEY_ID in self._ids or key_id in self._ids

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._ids))

    def __len__(self) -> int:
        return len(self._ids)


@dataclass
class Containers:
    """What the container runtime holds open: closed when the agent stops."""

    runtime: ContainerRuntime
    dirs: CryptDirs

    def close(self) -> None:
        self.dirs.close()
        # Folders of existing containers stay for the next start; an empty root goes.
        with contextlib.suppress(OSError):
            self.dirs.root.rmdir()


def provisional_certificate(state: AgentState) -> x509.Certificate:
    """A self-signed certificate on the agent key, served only until the CA issues one (no
    client trusts it: the tool's first contact verifies the quote, not the certificate)."""
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, PROVISIONAL_NAME)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(state.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - pki.BACKDATE)
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    return builder.sign(state.key, hashes.SHA256())


@dataclass
class Runtime:
    """A started agent: its state, service and listening socket."""

    config: AgentConfig
    state: AgentState
    platform: AgentPlatform
    status: RegistrationStatus
    service: AgentService
    sock: socket.socket
    context: ssl.SSLContext
    containers: list[Containers]

    @property
    def url(self) -> str:
        return url_of(self.config.host, self.sock)

    def ready_line(self) -> str:
        kind = "TDX"
        if self.platform.simulated and self.platform.mr_td is not None:
            kind = f"SIMULATED platform, MRTD {self.platform.mr_td.hex()}"
        return (
            f"{READY_PREFIX}{self.url} ({kind}, MRCONFIGID {self.platform.mr_config_id.hex()}, "
            f"CA {self.config.ca_url}, state {self.config.state_dir})"
        )

    def use_registration(self, record: RegistrationRecord) -> None:
        """From now on present the CA-issued chain and accept client certificates that chain to
        the CA root, then serve as registered (call on the event loop thread)."""
        load_identity(
            self.context, self.state.key, [record.server_certificate, record.ca_certificate]
        )
        self.context.load_verify_locations(cadata=record.ca_certificate)
        self.service.registered(record)

    def close(self) -> None:
        self.service.close()
        for held in self.containers:
            held.close()
        self.sock.close()
        self.state.close()


def ca_key_source(
    ca_url: str, ca_certificate: str, client_cert: Path, client_key: Path
) -> CaKeySource:
    """Keys for the containers, released by the CA to this VM: mutual TLS pinned to the CA
    root with the VM's client certificate (role vm); cached in memory only. A key id the CA's
    policy does not allow this VM fails with the CA's 403 detail."""
    return CaKeySource(
        CaClient(ca_url, ca_certificate, client_cert=client_cert, client_key=client_key)
    )


def make_containers(
    config: AgentConfig,
    state: AgentState,
    record: RegistrationRecord,
    key_ids: Callable[[], Collection[str]],
) -> Containers:
    """The Docker runtime with the containers' /modelyo folders, keys released by the CA."""
    keys = ca_key_source(
        config.ca_url, record.ca_certificate, state.client_cert_path, state.key_path
    )
    try:
        client = docker.from_env()
    except (docker.errors.DockerException, requests.RequestException) as exc:
        raise ModelyoError(
            f"the Docker engine does not answer ({exc}); check that dockerd runs in the VM "
            "(`docker info`)"
        ) from None
    dirs = CryptDirs(config.crypt_root_path(), keys)
    runtime_dir = state.directory / "containers"
    runtime_dir.mkdir(mode=0o700, exist_ok=True)
    try:
        runtime = ContainerRuntime(
            client,
            dirs,
            allowed_key_ids=lambda: KeyIds(key_ids()),
            gpus=0 if config.simulated else None,  # SIMULATED GPUs cannot be passed to Docker
            agent_id=record.vm_id,
            state_dir=runtime_dir,
            builtin_images=config.builtin_images,
        )
    except BaseException:
        dirs.close()
        raise
    return Containers(runtime, dirs)


def start(config: AgentConfig) -> Runtime:
    """Open the state, prepare the platform and bind the socket (nothing served yet)."""
    state = AgentState.open(config.state_dir)
    try:
        platform = make_platform(config)
        gpus = make_gpus(config)
        status = RegistrationStatus()
        held: list[Containers] = []

        def runtime_factory(record: RegistrationRecord) -> ContainerRuntime:
            def key_ids() -> list[str]:
                # The key ids of this run's registration (the CA's policy when it registered).
                identity = service.identity
                return identity.record.key_ids if identity is not None else record.key_ids

            containers = make_containers(config, state, record, key_ids)
            held.append(containers)
            return containers.runtime

        service = AgentService(
            state,
            platform,
            status,
            gpus,
            runtime_factory,
            max_image_bytes=config.max_image_bytes,
        )
        sock = bind(config.host, config.port)
        try:
            provisional = pki.cert_pem(provisional_certificate(state))
            context = server_ssl_context(state.key, [provisional], client_roots_pem=None)
        except BaseException:
            sock.close()
            raise
    except BaseException:
        state.close()
        raise
    return Runtime(config, state, platform, status, service, sock, context, held)


def serve(runtime: Runtime) -> None:
    """Serve until SIGTERM or SIGINT, registering with the CA in the background."""
    config = runtime.config
    registrars: list[Registrar] = []

    def on_started(loop: asyncio.AbstractEventLoop) -> None:
        def registered(record: RegistrationRecord) -> None:
            # The TLS context is used by the event loop: change it there, between handshakes.
            with contextlib.suppress(RuntimeError):  # the loop closed: shutting down anyway
                loop.call_soon_threadsafe(runtime.use_registration, record)

        registrar = Registrar(
            lambda: register(config, runtime.platform, runtime.state),
            runtime.status,
            on_registered=registered,
            cap=config.retry_max,
        )
        registrars.append(registrar)
        registrar.start()

    try:
        serve_https(
            create_app(runtime.service),
            runtime.sock,
            runtime.context,
            runtime.ready_line(),
            on_started=on_started,
        )
    finally:
        for registrar in registrars:
            registrar.stop()


def main(argv: list[str] | None = None) -> int:
    """The `modelyo-agent` command."""
    try:
        config, print_only = parse_args(argv)
    except ModelyoError as exc:
        print(f"modelyo-agent: error: {exc}", file=sys.stderr)
        return 2
    if print_only:
        print(config.mr_config_id().hex())
        return 0
    logging.basicConfig(
        level=config.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request at INFO: the registration attempts are logged by the agent.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Until the server runs, a signal stops start-up (every write is atomic).
    signal.signal(signal.SIGTERM, stop_on_signal)
    try:
        runtime = start(config)
    except ModelyoError as exc:
        print(f"modelyo-agent: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    try:
        if runtime.platform.simulated:
            log.warning(
                "SIMULATED platform: TD quotes are software-only; for testing, never for real data"
            )
        log.info(
            "agent key %s in %s; registering with the CA at %s",
            "made" if runtime.state.created else "loaded",
            config.state_dir,
            config.ca_url,
        )
        serve(runtime)
    finally:
        runtime.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
