"""`modelyo dev up|down|status`: the local stack on the SIMULATED platform.

Everything lives in one directory (`$MODELYO_DEV_DIR`, default `~/.local/share/modelyo/dev`):

    sim/         the simulated platform (root CA, PCK keys, platform secret)
    ca/          the CA's sealed state
    logs/ca.log  the CA's log
    stack.json   what runs where (pids, URLs), written atomically

Services run as background processes in their own session, so they outlive the command that
started them; `down` stops them with SIGTERM (SIGKILL after a grace period) and keeps the state.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pydantic import BaseModel

from modelyo.api.ca import CaPolicy, VmRule
from modelyo.attestation.policy import TdxPolicy
from modelyo.client.ca import wait_until_serving
from modelyo.errors import ModelyoError
from modelyo.files import atomic_write_text
from modelyo.measure import measure

DEFAULT_CA_PORT = 8443
STOP_GRACE_SECONDS = 10.0


class ServiceInfo(BaseModel):
    url: str
    pid: int
    log: str


class StackInfo(BaseModel):
    dev_dir: str
    sim_dir: str
    started_at: int
    ca: ServiceInfo | None = None


def dev_dir() -> Path:
    """The local stack's directory."""
    env = os.environ.get("MODELYO_DEV_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "modelyo" / "dev"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child (we started it and have not reaped it) is not serving anything.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


def read_stack(directory: Path | None = None) -> StackInfo | None:
    """The stack recorded in `directory`, or None."""
    path = (directory or dev_dir()) / "stack.json"
    try:
        return StackInfo.model_validate_json(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def running_endpoints(directory: Path | None = None) -> dict[str, str] | None:
    """URLs of the stack's live services, for endpoint discovery (`modelyo attest`)."""
    stack = read_stack(directory)
    if stack is None:
        return None
    urls = {}
    if stack.ca and _alive(stack.ca.pid):
        urls["ca"] = stack.ca.url
    return urls or None


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise ModelyoError("no free TCP port on 127.0.0.1")


def _ca_command() -> list[str]:
    script = Path(sys.executable).with_name("modelyo-ca")
    if script.exists():
        return [str(script)]
    found = shutil.which("modelyo-ca")
    if found:
        return [found]
    return [sys.executable, "-m", "ca_enclave.server"]


def _dev_vm_policy() -> CaPolicy:
    """The local CA admits agents running this installation's code, with every key id."""
    agent = measure("agent")
    return CaPolicy(
        root="simulation",
        vms=[VmRule(name="dev-agent", tdx=TdxPolicy(allowed_mrtd=[agent.hex]), key_ids=["*"])],
    )


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def up(directory: Path | None = None, *, ca_port: int | None = None) -> StackInfo:
    """Start the stack (idempotent: a running stack is returned as it is)."""
    root = directory or dev_dir()
    current = read_stack(root)
    if current and current.ca and _alive(current.ca.pid):
        return current
    for sub in ("sim", "ca", "logs"):
        (root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root, 0o700)
    policy_file = root / "vm-policy.json"
    atomic_write_text(policy_file, _dev_vm_policy().model_dump_json(indent=2))

    port = _free_port(DEFAULT_CA_PORT if ca_port is None else ca_port)
    url = f"https://127.0.0.1:{port}"
    log = root / "logs" / "ca.log"
    command = [
        *_ca_command(),
        "--listen", f"127.0.0.1:{port}",
        "--state-dir", str(root / "ca"),
        "--platform", "simulated",
        "--sim-dir", str(root / "sim"),
        "--vm-policy", str(policy_file),
    ]  # fmt: skip
    with log.open("ab") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    try:
        wait_until_serving(url, timeout=60)
    except ModelyoError:
        if process.poll() is None:
            process.kill()
        raise ModelyoError(
            f"the CA did not start (exit {process.poll()}); last lines of {log}:\n{_tail(log)}"
        ) from None
    if process.poll() is not None:
        raise ModelyoError(f"the CA exited at start; last lines of {log}:\n{_tail(log)}")
    stack = StackInfo(
        dev_dir=str(root),
        sim_dir=str(root / "sim"),
        started_at=int(time.time()),
        ca=ServiceInfo(url=url, pid=process.pid, log=str(log)),
    )
    atomic_write_text(root / "stack.json", stack.model_dump_json(indent=2))
    return stack


def down(directory: Path | None = None) -> list[str]:
    """Stop the stack's services; return what was stopped. The state is kept."""
    root = directory or dev_dir()
    stack = read_stack(root)
    stopped: list[str] = []
    if stack is None:
        return stopped
    for name, service in (("ca", stack.ca),):
        if service is None or not _alive(service.pid):
            continue
        os.kill(service.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while _alive(service.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(service.pid):
            os.kill(service.pid, signal.SIGKILL)
        stopped.append(name)
    (root / "stack.json").unlink(missing_ok=True)
    return stopped


def status(directory: Path | None = None) -> dict[str, object]:
    """What is recorded and whether it is alive."""
    root = directory or dev_dir()
    stack = read_stack(root)
    services = {}
    if stack and stack.ca:
        services["ca"] = {**stack.ca.model_dump(), "running": _alive(stack.ca.pid)}
    return {
        "dev_dir": str(root),
        "sim_dir": stack.sim_dir if stack else str(root / "sim"),
        "services": services,
    }
