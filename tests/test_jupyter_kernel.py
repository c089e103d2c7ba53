"""The magics in a real IPython kernel (jupyter_client), against a local stack on the SIMULATED
platform and this machine's real Docker engine: autoload with `--ext`, `%modelyo attest`, a
mixed-type DataFrame through `%%modelyo_run`, a remote exception, a timeout, an interrupt, and
the refusals (before attestation, a key id the VM may not use).

One stack and one kernel serve the whole module (each start costs seconds); the tests run in
file order, and those after `attested` share its workspace.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from modelyo.api.ca import CaPolicy
from modelyo.client.ca import CaClient
from modelyo.workspace import Workspace
from modelyo_jupyter.kernels import PrivateKernelManager

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ANSI = re.compile(r"\x1b\[[0-9;]*m")
EXECUTE_TIMEOUT = 300.0


@dataclass
class Executed:
    """What one execute request produced."""

    reply: dict[str, Any]
    stdout: str = ""
    stderr: str = ""
    displays: list[dict[str, Any]] = field(default_factory=list)  # display/update_display data
    comm_values: list[str] = field(default_factory=list)  # widget state updates (label values)

    @property
    def ok(self) -> bool:
        return self.reply["status"] == "ok"

    @property
    def error(self) -> str:
        """ename, evalue and the traceback lines, without colours."""
        if self.ok:
            return ""
        lines = [self.reply["ename"], self.reply["evalue"], *self.reply["traceback"]]
        return ANSI.sub("", "\n".join(lines))

    def texts(self) -> str:
        return "\n".join(d.get("text/plain", "") for d in self.displays)

    def value(self, name: str) -> str:
        """A user expression's text/plain value."""
        entry = self.reply["user_expressions"][name]
        assert entry["status"] == "ok", entry
        return entry["data"]["text/plain"]


class Kernel:
    def __init__(self, manager: Any, client: Any) -> None:
        self.manager = manager
        self.client = client

    def run(
        self,
        code: str,
        user_expressions: dict[str, str] | None = None,
        timeout: float = EXECUTE_TIMEOUT,
    ) -> Executed:
        done = Executed(reply={})

        def hook(msg: dict[str, Any]) -> None:
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                if content["name"] == "stdout":
                    done.stdout += content["text"]
                else:
                    done.stderr += content["text"]
            elif kind in ("display_data", "update_display_data", "execute_result"):
                done.displays.append(content["data"])
            elif kind == "comm_msg":
                state = content.get("data", {}).get("state", {})
                if isinstance(state.get("value"), str):
                    done.comm_values.append(state["value"])

        reply = self.client.execute_interactive(
            code,
            user_expressions=user_expressions or {},
            output_hook=hook,
            timeout=timeout,
            stop_on_error=False,
        )
        done.reply = reply["content"]
        done.stdout, done.stderr = ANSI.sub("", done.stdout), ANSI.sub("", done.stderr)
        return done


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("notebook")


@pytest.fixture(scope="module")
def kernel(module_stack, base_image, workdir) -> Iterator[Kernel]:
    """A kernel started as a kernelspec with `--ext modelyo_jupyter` would start it, on
    private Unix sockets (as `make demo` runs the quickstart)."""
    manager = PrivateKernelManager(kernel_name="python3")
    manager.start_kernel(
        extra_arguments=["--ext", "modelyo_jupyter"],
        cwd=str(workdir),
        env=dict(os.environ),  # module_stack's: the stack's dev dir, no other endpoints
    )
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=120)
        yield Kernel(manager, client)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


@pytest.fixture(scope="module")
def attested(kernel, workdir) -> Executed:
    """`%modelyo attest` in the kernel's working directory (once for the module)."""
    result = kernel.run("%modelyo attest")
    assert result.ok, result.error
    return result


# --- before attestation ---------------------------------------------------------------------------


def test_the_extension_is_autoloaded_by_ext_and_loads_again(kernel):
    check = {"line": "'modelyo' in get_ipython().magics_manager.magics['line']"}
    assert kernel.run("", check).value("line") == "True"
    result = kernel.run("%unload_ext modelyo_jupyter", check)
    assert result.ok and result.value("line") == "False"
    result = kernel.run("%load_ext modelyo_jupyter", check)
    assert result.ok and result.value("line") == "True"


def test_before_attestation_runs_are_refused_and_status_says_what_to_do(kernel, workdir):
    status = kernel.run("%modelyo status")
    assert status.ok, status.error
    assert "not attested: run `%modelyo attest`" in status.texts()
    assert "(from the local stack (modelyo dev up); not attested yet)" in status.texts()

    result = kernel.run("%%modelyo_run\nprint('never runs')\n")
    assert not result.ok
    assert result.reply["ename"] == "NotAttestedError"
    assert "%modelyo attest" in result.error
    assert "never runs" not in result.stdout
    assert "Traceback" not in result.error and "magics.py" not in result.error
    assert not any(workdir.iterdir())  # refusing wrote nothing


# --- attestation ----------------------------------------------------------------------------------


def test_attest_shows_the_card_with_the_simulated_banner(attested, workdir):
    card = attested.texts()
    assert card.startswith("!!!") and "SIMULATED: trusted under the simulation root" in card
    assert "UpToDate" in card
    for text in ("MRENCLAVE", "MRSIGNER", "MRTD", "RTMR0", "GPU 0", "evidence verified"):
        assert text in card, text
    assert "ca.pem" in card and "tdx_ca.pem" in card
    # The widget went out too (a frontend with a widget manager renders it).
    assert any("application/vnd.jupyter.widget-view+json" in d for d in attested.displays)
    for name in ("ca.pem", "ca_client.key", "tdx_ca.pem", "tdx_client.key"):
        assert (workdir / name).is_file(), name


def test_status_after_attestation(kernel, attested):
    result = kernel.run("%modelyo status")
    assert result.ok, result.error
    text = result.texts()
    assert "attested: the CA and the TDX VM are yours" in text
    assert "GPU 0" in text and "SIMULATED" in text
    assert "VM owner" in text
    # Attesting again is idempotent; --json gives the machine-readable result.
    again = kernel.run("%modelyo attest --json")
    assert again.ok, again.error
    data = json.loads(again.stdout)
    assert data["ca"]["ownership"] == "already owner" and data["ca"]["simulated"] is True
    assert data["tdx"]["ownership"] == "already owner"
    assert data["tdx"]["verdict"]["tcb_status"] == "UpToDate"


# --- %%modelyo_run --------------------------------------------------------------------------------

MAKE_FRAME = """
import numpy as np
import pandas as pd

df = pd.DataFrame(
    {
        "i": np.array([1, 2, 3], dtype="int64"),
        "f": [1.5, np.nan, 3.25],
        "s": ["a", None, "c"],
        "n": pd.array([1, None, 3], dtype="Int64"),
        "t": pd.date_range("2024-03-30 12:00", periods=3, freq="D", tz="Europe/Zurich"),
        "c": pd.Categorical(["x", "y", "x"], categories=["y", "x", "z"], ordered=True),
    },
    index=pd.Index([10, 20, 30], name="row"),
)
"""

ROUND_TRIP = """%%modelyo_run -i df -o out -o remote_dtypes
import sys
out = df.copy()
out["twice"] = out["i"] * 2
remote_dtypes = {name: str(dtype) for name, dtype in df.dtypes.items()}
print("remote rows:", len(df))
print("to stderr", file=sys.stderr)
"""


def test_a_mixed_dataframe_round_trips_with_its_types(kernel, attested):
    assert kernel.run(MAKE_FRAME).ok
    result = kernel.run(
        ROUND_TRIP,
        {
            "equal": "out.drop(columns='twice').equals(df)",
            "local": "{k: str(v) for k, v in df.dtypes.items()}",
            "back": "{k: str(v) for k, v in out.drop(columns='twice').dtypes.items()}",
            "remote": "remote_dtypes",
            "index": "(out.index.name, list(out.index))",
            "twice": "list(out['twice'])",
            "categories": "(list(out['c'].cat.categories), out['c'].cat.ordered)",
            "missing": "(int(out['f'].isna().sum()), int(out['n'].isna().sum()))",
        },
    )
    assert result.ok, result.error
    assert result.value("equal") == "True"
    assert result.value("back") == result.value("local")
    assert result.value("remote") == result.value("local")  # the cell saw the same types
    assert "Int64" in result.value("local") and "Europe/Zurich" in result.value("local")
    assert result.value("index") == "('row', [10, 20, 30])"
    assert result.value("twice") == "[2, 4, 6]"
    assert result.value("categories") == "(['y', 'x', 'z'], True)"
    assert result.value("missing") == "(1, 1)"
    # The remote output arrived as the cell's own output.
    # (The agent merges the container's stderr into its log stream.)
    assert "remote rows: 3" in result.stdout
    assert "to stderr" in result.stdout + result.stderr
    # The progress widget: its text/plain ends on the final line.
    assert "modelyo_run: done in" in result.texts()
    assert any("running" in value for value in result.comm_values)
    # A stricter check in the kernel itself.
    check = kernel.run(
        "pd.testing.assert_frame_equal(out.drop(columns='twice'), df, check_exact=True)"
    )
    assert check.ok, check.error


def test_a_remote_exception_fails_the_cell_with_its_traceback(kernel, attested):
    result = kernel.run(
        "%%modelyo_run\ndef load(n):\n    raise ValueError(f'bad value {n}')\n\nload(42)\n"
    )
    assert not result.ok
    assert result.reply["ename"] == "RemoteExecutionError"
    error = result.error
    assert "Remote traceback" in error
    assert "ValueError: bad value 42" in error
    assert "in load" in error  # the user's frames
    assert "magics.py" not in error and "modelyo/jobs" not in error


def _ps(kernel: Kernel) -> list[str]:
    result = kernel.run("%modelyo ps")
    assert result.ok, result.error
    return [line for line in result.stdout.splitlines() if line.strip()]


def test_a_timeout_stops_the_job_and_leaves_no_container(kernel, attested):
    before = _ps(kernel)
    started = time.monotonic()
    result = kernel.run("%%modelyo_run --timeout 2 --name slow-job\nimport time\ntime.sleep(60)\n")
    assert time.monotonic() - started < 45
    assert not result.ok
    assert result.reply["ename"] == "JobTimeoutError"
    assert "timeout" in result.error.lower() and "stopped" in result.error
    assert "modelyo_run: timed out" in result.texts()
    after = _ps(kernel)
    assert not any("slow-job" in line for line in after)
    assert after == before


def test_an_interrupt_stops_the_job(kernel, attested):
    client = kernel.client
    before = _ps(kernel)
    msg_id = client.execute("%%modelyo_run --name interrupted-job\nimport time\ntime.sleep(120)\n")
    deadline = time.monotonic() + 120
    running = False
    while not running and time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            msg = client.get_iopub_msg(timeout=1)
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "comm_msg":
                value = msg["content"].get("data", {}).get("state", {}).get("value", "")
                running = isinstance(value, str) and "running" in value
    assert running, "the job never reported the running phase"
    time.sleep(1)
    kernel.manager.interrupt_kernel()  # as a frontend's stop button does
    reply = client.get_shell_msg(timeout=60)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = client.get_shell_msg(timeout=60)
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    after = _ps(kernel)
    assert not any("interrupted-job" in line for line in after)
    assert after == before


def test_logs_of_a_container(kernel, attested, workdir):
    from modelyo.api.agent import ContainerSpec
    from modelyo.client.agent import AgentClient
    from modelyo.images.base import DEFAULT_TAG

    with AgentClient.for_owner(Workspace(workdir)) as agent:
        agent.create(
            ContainerSpec(
                image=DEFAULT_TAG, name="echo-job", command=["python", "-c", "print('hi there')"]
            )
        )
        try:
            agent.start("echo-job")
            assert agent.wait("echo-job", timeout=60).exit_code == 0
            assert any("echo-job" in line for line in _ps(kernel))
            result = kernel.run("%modelyo logs echo-job")
            assert result.ok, result.error
            assert "hi there" in result.stdout
        finally:
            agent.delete("echo-job")
    missing = kernel.run("%modelyo logs no-such-job")
    assert not missing.ok and "no-such-job" in missing.error
    assert "Traceback" not in missing.error


def test_a_key_id_the_vm_may_not_use_is_refused(kernel, attested, workdir):
    with CaClient.for_owner(Workspace(workdir)) as ca:
        original = ca.policy()
        restricted = CaPolicy.model_validate(
            {
                **original.model_dump(),
                "vms": [{**rule.model_dump(), "key_ids": ["default"]} for rule in original.vms],
            }
        )
        ca.set_policy(restricted)
        try:
            before = _ps(kernel)
            result = kernel.run("%%modelyo_run -o x --key-id other-project\nx = 1\n")
            assert not result.ok
            assert "may not receive key id 'other-project'" in result.error
            assert "Traceback" not in result.error
            assert kernel.run("", {"x": "'x' in globals()"}).value("x") == "False"
            assert _ps(kernel) == before
            # The allowed key id still works under the same policy.
            ok = kernel.run("%%modelyo_run -o y --key-id default\ny = 2\n", {"y": "y"})
            assert ok.ok, ok.error
            assert ok.value("y") == "2"
        finally:
            ca.set_policy(original)


def test_the_kernel_listens_on_private_unix_sockets_only(kernel, workdir):
    """No loopback TCP port for the kernel that holds decrypted data: Unix sockets in the
    user's 0700 runtime folder, none in the notebook's folder."""
    manager = kernel.manager
    assert manager.transport == "ipc"
    prefix = Path(manager.ip)
    assert prefix.is_absolute()
    assert stat.S_IMODE(prefix.parent.stat().st_mode) == 0o700
    sockets = sorted(prefix.parent.glob(prefix.name + "-*"))
    assert len(sockets) == 5 and all(stat.S_ISSOCK(s.stat().st_mode) for s in sockets)
    assert not any(workdir.glob("*ipc*"))
    result = kernel.run("print(6 * 7)")
    assert result.ok and result.stdout.strip() == "42"
