"""`modelyo dev up|down|status`: the local stack on the SIMULATED platform.

Everything lives in one directory (`$MODELYO_DEV_DIR`, default `~/.local/share/modelyo/dev`):

    sim/            the simulated platform (root CA, PCK keys, platform secret; gpu/ for GPUs)
    ca/             the CA's sealed state
    agent/          the agent's state (its key, its registration, its owner)
    logs/ca.log     the CA's log
    logs/agent.log  the agent's log
    stack.json      what runs where (pids, URLs), written atomically

`up` starts the CA, then the agent pointed at it (simulated TD, one SIMULATED GPU by default,
the machine's real Docker engine), and returns once the agent is registered with the CA. The
CA's VM policy admits agents running this installation's code (MRTD = `modelyo measure agent`)
with every key id. Services run as background processes in their own session, so they outlive
the command that started them; `down` stops them with SIGTERM (SIGKILL after a grace period)
and keeps the state.
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

import httpx
from pydantic import BaseModel, ValidationError

from modelyo.api.agent import ATTESTATION
from modelyo.api.ca import CaPolicy, ErrorBody, VmRule
from modelyo.attestation.binding import new_nonce
from modelyo.attestation.policy import TdxPolicy
from modelyo.client.ca import wait_until_serving
from modelyo.client.tls import first_contact_context
from modelyo.errors import ModelyoError
from modelyo.files import atomic_write_text
from modelyo.images.base import DEFAULT_TAG as BASE_IMAGE
from modelyo.measure import measure

DEFAULT_CA_PORT = 8443
DEFAULT_AGENT_PORT = 8444
DEFAULT_GPUS = 1
STOP_GRACE_SECONDS = 10.0
START_TIMEOUT_SECONDS = 60.0


class ServiceInfo(BaseModel):
    url: str
    pid: int
    log: str


class StackInfo(BaseModel):
    dev_dir: str
    sim_dir: str
    started_at: int
    ca: ServiceInfo | None = None
    agent: ServiceInfo | None = None


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
    if stack.agent and _alive(stack.agent.pid):
        urls["tdx"] = stack.agent.url
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


def _command(script_name: str, module: str) -> list[str]:
    script = Path(sys.executable).with_name(script_name)
    if script.exists():
        return [str(script)]
    found = shutil.which(script_name)
    if found:
        return [found]
    return [sys.executable, "-m", module]


def _ca_command() -> list[str]:
    return _command("modelyo-ca", "ca_enclave.server")


def _agent_command() -> list[str]:
    return _command("modelyo-agent", "tdx_agent.server")


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


def _spawn(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip


def _stop(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def _start_ca(root: Path, port: int) -> ServiceInfo:
    policy_file = root / "vm-policy.json"
    atomic_write_text(policy_file, _dev_vm_policy().model_dump_json(indent=2))
    url = f"https://127.0.0.1:{port}"
    log = root / "logs" / "ca.log"
    process = _spawn(
        [
            *_ca_command(),
            "--listen", f"127.0.0.1:{port}",
            "--state-dir", str(root / "ca"),
            "--platform", "simulated",
            "--sim-dir", str(root / "sim"),
            "--vm-policy", str(policy_file),
        ],
        log,
    )  # fmt: skip
    try:
        wait_until_serving(url, timeout=START_TIMEOUT_SECONDS)
    except ModelyoError:
        if process.poll() is None:
            process.kill()
        raise ModelyoError(
            f"the CA did not start (exit {process.poll()}); last lines of {log}:\n{_tail(log)}"
        ) from None
    if process.poll() is not None:
        raise ModelyoError(f"the CA exited at start; last lines of {log}:\n{_tail(log)}")
    return ServiceInfo(url=url, pid=process.pid, log=str(log))


def agent_registration(url: str, timeout: float = 5.0) -> tuple[bool, str]:
    """(True, "") once the agent at `url` is registered with the CA, else (False, why)."""
    try:
        with httpx.Client(verify=first_contact_context(), timeout=timeout) as client:
            response = client.get(url + ATTESTATION, params={"nonce": new_nonce().hex()})
    except httpx.HTTPError as exc:
        return False, f"the agent does not answer ({exc or type(exc).__name__})"
    if response.status_code == 200:
        return True, ""
    try:
        return False, ErrorBody.model_validate_json(response.content).detail
    except ValidationError:
        return False, f"the agent answered HTTP {response.status_code}"


def _start_agent(
    root: Path, ca_url: str, port: int, gpus: int, tampered_gpus: tuple[int, ...]
) -> ServiceInfo:
    url = f"https://127.0.0.1:{port}"
    log = root / "logs" / "agent.log"
    tampered = [arg for index in tampered_gpus for arg in ("--simulated-gpu-tampered", str(index))]
    process = _spawn(
        [
            *_agent_command(),
            "--listen", f"127.0.0.1:{port}",
            "--state-dir", str(root / "agent"),
            "--ca", ca_url,
            "--platform", "simulated",
            "--sim-dir", str(root / "sim"),
            "--simulated-gpus", str(gpus),
            "--builtin-image", BASE_IMAGE,
            "--name", "dev-agent",
            *tampered,
        ],
        log,
    )  # fmt: skip
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    reason = "it did not answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ModelyoError(
                f"the agent exited at start (exit {process.returncode}); last lines of {log}:\n"
                f"{_tail(log)}"
            )
        registered, reason = agent_registration(url)
        if registered:
            return ServiceInfo(url=url, pid=process.pid, log=str(log))
        if "refused the registration" in reason:
            break  # the CA's answer will not change by waiting
        time.sleep(0.2)
    _stop(process.pid)
    raise ModelyoError(
        f"the agent did not register with the CA: {reason}. If the code changed since this "
        f"stack's CA was created, start afresh: `modelyo dev down` and remove {root}. Last "
        f"lines of {log}:\n{_tail(log)}"
    )


def up(
    directory: Path | None = None,
    *,
    ca_port: int | None = None,
    agent_port: int | None = None,
    gpus: int = DEFAULT_GPUS,
    tampered_gpus: tuple[int, ...] = (),
) -> StackInfo:
    """Start the stack: the CA, then the agent registered with it (idempotent: what runs
    already is kept). `tampered_gpus` makes those SIMULATED GPUs report a measurement off
    their reference (to see a GPU refused)."""
    root = directory or dev_dir()
    current = read_stack(root)
    ca = current.ca if current and current.ca and _alive(current.ca.pid) else None
    agent = current.agent if current and current.agent and _alive(current.agent.pid) else None
    if ca is not None and agent is not None:
        return current  # type: ignore[return-value]
    for sub in ("sim", "ca", "agent", "logs"):
        (root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root, 0o700)
    started_ca = ca is None
    if ca is None:
        if agent is not None:
            _stop(agent.pid)  # it was registered with a CA that is gone
            agent = None
        ca = _start_ca(root, _free_port(DEFAULT_CA_PORT if ca_port is None else ca_port))
    stack = StackInfo(
        dev_dir=str(root),
        sim_dir=str(root / "sim"),
        started_at=current.started_at if current and current.ca else int(time.time()),
        ca=ca,
    )
    # Recorded before the agent starts, so `dev down` finds the CA should this process die.
    atomic_write_text(root / "stack.json", stack.model_dump_json(indent=2))
    port = _free_port(DEFAULT_AGENT_PORT if agent_port is None else agent_port)
    try:
        stack.agent = _start_agent(root, ca.url, port, gpus, tuple(tampered_gpus))
    except BaseException:
        # A failed `up` leaves nothing running that it started (its caller may never call
        # `down`: a test fixture, the demo); the logs stay for the error message.
        if started_ca:
            _stop(ca.pid)
            (root / "stack.json").unlink(missing_ok=True)
        raise
    atomic_write_text(root / "stack.json", stack.model_dump_json(indent=2))
    return stack


def down(directory: Path | None = None) -> list[str]:
    """Stop the stack's services (the agent first); return what was stopped. The state is
    kept."""
    root = directory or dev_dir()
    stack = read_stack(root)
    stopped: list[str] = []
    if stack is None:
        return stopped
    for name, service in (("agent", stack.agent), ("ca", stack.ca)):
        if service is None or not _alive(service.pid):
            continue
        _stop(service.pid)
        stopped.append(name)
    (root / "stack.json").unlink(missing_ok=True)
    return stopped


def status(directory: Path | None = None) -> dict[str, object]:
    """What is recorded and whether it is alive (the agent: whether it is registered too)."""
    root = directory or dev_dir()
    stack = read_stack(root)
    services: dict[str, dict[str, object]] = {}
    if stack and stack.ca:
        services["ca"] = {**stack.ca.model_dump(), "running": _alive(stack.ca.pid)}
    if stack and stack.agent:
        running = _alive(stack.agent.pid)
        registered, reason = agent_registration(stack.agent.url) if running else (False, "")
        services["agent"] = {
            **stack.agent.model_dump(),
            "running": running,
            "registered": registered,
            "detail": reason,
        }
    return {
        "dev_dir": str(root),
        "sim_dir": stack.sim_dir if stack else str(root / "sim"),
        "services": services,
    }
