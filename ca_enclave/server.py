"""`modelyo-ca`: the CA served over HTTPS (TLS 1.3 only) with uvicorn.

TLS: the server presents [its RA-TLS certificate, the CA root] and asks for a client
certificate without requiring one (`CERT_OPTIONAL`), with the CA root as the only trust anchor:
attestation and the first ownership claim work without a certificate, a certificate from any
other CA fails the handshake, and the application decides per call which role it needs.

The serving machinery is shared with the TDX agent (`modelyo.service`): the TLS context, the
h11 protocol that puts the verified client certificate into each request's ASGI scope (with
TCP_NODELAY on accepted sockets), and the uvicorn runner with the ready line and signals.
Python 3.11 exposes only the leaf of the client's chain, which is all the CA needs: its
clients' certificates are issued directly by the root.
"""

from __future__ import annotations

import logging
import signal
import socket
import ssl
import sys
from dataclasses import dataclass

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
from modelyo.service.runner import bind, serve_https, stop_on_signal
from modelyo.service.tls import server_ssl_context as tls_context
from modelyo.tee.sgx import GramineProvider
from modelyo.tee.sim import SimulatedPlatform

log = logging.getLogger("modelyo.ca")

READY_PREFIX = "modelyo-ca listening on "


def server_ssl_context(tls: TlsIdentity, root_pem: str) -> ssl.SSLContext:
    """TLS 1.3 only; chain [TLS certificate, root]; client certificates optional, root-only."""
    return tls_context(
        tls.key, [pki.cert_pem(tls.certificate), root_pem], client_roots_pem=root_pem
    )


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
        sock = bind(config.host, config.port)
    except BaseException:
        lock.release()
        raise
    return Runtime(config, service, store, lock, sealer, platform, sock)


def serve(runtime: Runtime) -> None:
    """Serve until SIGTERM or SIGINT, then close connections and return."""
    context = server_ssl_context(runtime.service.tls, pki.cert_pem(runtime.store.root_certificate))
    serve_https(create_app(runtime.service), runtime.sock, context, runtime.ready_line())


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
    signal.signal(signal.SIGTERM, stop_on_signal)
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
