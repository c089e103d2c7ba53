"""Start the real `modelyo-ca` process for tests, and talk to it over real TLS 1.3.

    with start_ca(tmp_path / "state", tmp_path / "sim") as ca:
        client = https_client(ca.url)                      # no client certificate
        ...
    # leaving the block stops it with SIGTERM (SIGKILL after a grace period)

`start_ca` listens on 127.0.0.1 port 0 (a free port the CA picks), waits for the CA's one
ready line on stdout, and parses the URL, MRENCLAVE and root fingerprint from it. The CA's log
(stderr) goes to `ca.log_path`; failures to start raise `CaStartError` with its tail.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from modelyo import pki

READY = re.compile(
    r"^modelyo-ca listening on (?P<url>https://(?P<host>\[[^\]]+\]|[^:/]+):(?P<port>\d+)) "
    r"\((?P<platform>[^,]+), MRENCLAVE (?P<mrenclave>[0-9a-f]{64}), "
    r"CA root sha256 (?P<root>[0-9a-f]{64}), state (?P<state>.+)\)$"
)


class CaStartError(RuntimeError):
    """The CA process exited or stayed silent instead of printing its ready line."""


@dataclass(kw_only=True)
class ServiceProcess:
    """A running Modelyo service (the CA or an agent) started by a test."""

    process: subprocess.Popen[bytes]
    url: str
    port: int
    state_dir: Path
    log_path: Path
    ready_line: str
    args: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send `sig` and wait for the exit code (SIGKILL if it outlives `timeout`)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return int(self.process.returncode)

    def kill(self) -> int:
        """SIGKILL: no shutdown at all, like a crash or a power cut for the process."""
        return self.stop(signal.SIGKILL)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(kw_only=True)
class CaProcess(ServiceProcess):
    """A running `modelyo-ca` started by `start_ca`."""

    mrenclave: str
    root_fingerprint: str
    sim_dir: Path


def ca_command() -> list[str]:
    """The installed `modelyo-ca` script beside this Python, or `python -m ca_enclave.server`."""
    script = Path(sys.executable).with_name("modelyo-ca")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ca_enclave.server"]


def run_ca(
    state_dir: Path, sim_dir: Path, *extra: str, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run the CA expecting it to exit at once (a refused start): its exit code and output."""
    return subprocess.run(
        [*ca_command(), "--listen", "127.0.0.1:0", "--state-dir", str(state_dir),
         "--sim-dir", str(sim_dir), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def start_ca(
    state_dir: Path,
    sim_dir: Path,
    *extra: str,
    log_path: Path | None = None,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
) -> CaProcess:
    """Start `modelyo-ca` on 127.0.0.1 (a free port) and wait until it is ready."""
    state_dir, sim_dir = Path(state_dir), Path(sim_dir)
    log_path = log_path or state_dir.parent / f"{state_dir.name}.ca.log"
    args = [
        "--listen", "127.0.0.1:0", "--state-dir", str(state_dir), "--platform", "simulated",
        "--sim-dir", str(sim_dir), *extra,
    ]  # fmt: skip
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [*ca_command(), *args],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
    line = _read_ready_line(process, timeout)
    found = READY.match(line) if line else None
    if found is None:
        if process.poll() is None:
            process.kill()
        process.wait(5)
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise CaStartError(
            f"modelyo-ca did not become ready (exit {process.returncode}, stdout {line!r}); "
            f"log tail:\n{tail}"
        )
    return CaProcess(
        process=process,
        url=found["url"],
        port=int(found["port"]),
        mrenclave=found["mrenclave"],
        root_fingerprint=found["root"],
        state_dir=state_dir,
        sim_dir=sim_dir,
        log_path=log_path,
        ready_line=line,
        args=args,
    )


def _read_ready_line(process: subprocess.Popen[bytes], timeout: float) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                return buffer.decode(errors="replace")
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:  # the process closed stdout: it exited
                return buffer.decode(errors="replace")
            buffer += chunk
    return buffer.split(b"\n", 1)[0].decode(errors="replace")


# --- clients -------------------------------------------------------------------------------


def tls_context(
    root_pem: str | None = None,
    *,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    maximum_version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A client context: TLS 1.3 (unless `maximum_version` says less), pinned to `root_pem`
    when given (else unauthenticated), presenting a client certificate when given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if maximum_version is not None:
        context.maximum_version = maximum_version
    else:
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    if root_pem is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(cadata=root_pem)
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context


def https_client(url: str, context: ssl.SSLContext | None = None, **kwargs: object) -> httpx.Client:
    """An httpx client for `url` over `context` (default: unauthenticated TLS 1.3)."""
    return httpx.Client(base_url=url, verify=context or tls_context(), timeout=30.0, **kwargs)


def write_identity(
    directory: Path, name: str, key: ec.EllipticCurvePrivateKey, *certs: x509.Certificate
) -> tuple[Path, Path]:
    """Write a client key (0600) and certificate chain as NAME.key / NAME.pem for TLS."""
    directory.mkdir(parents=True, exist_ok=True)
    key_file, cert_file = directory / f"{name}.key", directory / f"{name}.pem"
    pki.write_private_key(key_file, key)
    pki.write_cert(cert_file, *certs)
    return cert_file, key_file


def peer_certificate(response: httpx.Response) -> x509.Certificate:
    """The certificate the server presented on the connection that carried `response`."""
    stream = response.extensions["network_stream"]
    der = stream.get_extra_info("ssl_object").getpeercert(True)
    return x509.load_der_x509_certificate(der)


def tls_version(response: httpx.Response) -> str:
    """The TLS version negotiated on the connection that carried `response`."""
    return str(response.extensions["network_stream"].get_extra_info("ssl_object").version())


def claim_csr(name: str = "test owner") -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A fresh key and the PEM CSR to claim ownership with."""
    key = pki.new_key()
    return key, pki.csr_pem(pki.make_csr(key, name))


__all__: Sequence[str] = [
    "CaProcess",
    "CaStartError",
    "ca_command",
    "claim_csr",
    "https_client",
    "peer_certificate",
    "run_ca",
    "start_ca",
    "tls_context",
    "tls_version",
    "write_identity",
]
