"""Start the real `modelyo-agent` process for tests, pointed at a real CA, over real TLS 1.3.

    with start_ca(tmp / "ca", sim, "--vm-policy", policy) as ca:
        with start_agent(tmp / "agent", sim, ca.url, "--simulated-gpus", "1") as agent:
            agent.wait_registered()
            ...
    # leaving a block stops the process with SIGTERM (SIGKILL after a grace period)

`start_agent` listens on 127.0.0.1 port 0, waits for the one ready line on stdout and parses the
URL, MRTD and MRCONFIGID from it. The agent's log (stderr) goes to `agent.log_path`; a failure
to start raises `AgentStartError` with its tail. Its containers' /modelyo folders go to a fresh
directory on /dev/shm, removed when the agent stops.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from modelyo.attestation.binding import new_nonce
from tests.helpers.ca_process import ServiceProcess, _read_ready_line, https_client

READY = re.compile(
    r"^modelyo-agent listening on (?P<url>https://(?P<host>\[[^\]]+\]|[^:/]+):(?P<port>\d+)) "
    r"\((?P<platform>SIMULATED platform, MRTD (?P<mrtd>[0-9a-f]{96})|TDX), "
    r"MRCONFIGID (?P<mrconfigid>[0-9a-f]{96}), CA (?P<ca>\S+), state (?P<state>.+)\)$"
)


class AgentStartError(RuntimeError):
    """The agent exited, stayed silent, or never registered."""


@dataclass(kw_only=True)
class AgentProcess(ServiceProcess):
    """A running `modelyo-agent` started by `start_agent`."""

    mrtd: str
    mrconfigid: str
    crypt_root: Path

    def attestation_response(self) -> httpx.Response:
        """GET /v1/attestation with a fresh nonce over unauthenticated TLS."""
        with https_client(self.url) as client:
            return client.get("/v1/attestation", params={"nonce": new_nonce().hex()})

    def wait_registered(self, timeout: float = 30.0) -> None:
        """Wait until the attestation endpoint answers 200 (registered with the CA)."""
        deadline = time.monotonic() + timeout
        detail = ""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            response = self.attestation_response()
            if response.status_code == 200:
                return
            detail = response.text
            time.sleep(0.1)
        tail = "\n".join(self.log().splitlines()[-20:])
        raise AgentStartError(f"the agent did not register ({detail}); log tail:\n{tail}")

    def wait_for_log(self, text: str, timeout: float = 30.0) -> str:
        """Wait until `text` appears in the agent's log; return the log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            time.sleep(0.05)
        raise AgentStartError(f"{text!r} never appeared in the agent's log:\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Stop the agent, then remove its /modelyo folders root."""
        code = super().stop(sig, timeout)
        shutil.rmtree(self.crypt_root, ignore_errors=True)
        return code


def agent_command() -> list[str]:
    """The installed `modelyo-agent` script beside this Python, or `python -m tdx_agent.server`."""
    script = Path(sys.executable).with_name("modelyo-agent")
    return [str(script)] if script.exists() else [sys.executable, "-m", "tdx_agent.server"]


def start_agent(
    state_dir: Path,
    sim_dir: Path,
    ca_url: str,
    *extra: str,
    log_path: Path | None = None,
    timeout: float = 60.0,
) -> AgentProcess:
    """Start `modelyo-agent` on 127.0.0.1 (a free port), simulated, and wait for its ready line
    (not for its registration: see `AgentProcess.wait_registered`)."""
    state_dir, sim_dir = Path(state_dir), Path(sim_dir)
    log_path = log_path or state_dir.parent / f"{state_dir.name}.agent.log"
    crypt_root = Path(tempfile.mkdtemp(prefix="modelyo-test-agent-", dir="/dev/shm"))
    args = [
        "--listen", "127.0.0.1:0", "--state-dir", str(state_dir), "--ca", ca_url,
        "--platform", "simulated", "--sim-dir", str(sim_dir), "--crypt-root", str(crypt_root),
        "--name", "test-agent", *extra,
    ]  # fmt: skip
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [*agent_command(), *args],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ),
        )
    line = _read_ready_line(process, timeout)
    found = READY.match(line) if line else None
    if found is None:
        if process.poll() is None:
            process.kill()
        process.wait(5)
        shutil.rmtree(crypt_root, ignore_errors=True)
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise AgentStartError(
            f"modelyo-agent did not become ready (exit {process.returncode}, stdout {line!r}); "
            f"log tail:\n{tail}"
        )
    return AgentProcess(
        process=process,
        url=found["url"],
        port=int(found["port"]),
        mrtd=found["mrtd"] or "",
        mrconfigid=found["mrconfigid"],
        state_dir=state_dir,
        crypt_root=crypt_root,
        log_path=log_path,
        ready_line=line,
        args=args,
    )
