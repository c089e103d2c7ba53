"""Jobs end to end: a real local stack (CA + agent, SIMULATED), this machine's Docker engine
and the job base image; attest in a temporary directory, then `run_job` through a session."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from modelyo.cli.main import main
from modelyo.client.ca import CaClient
from modelyo.errors import JobError, JobTimeoutError, NotAttestedError, RemoteExecutionError
from modelyo.jobs import JobSpec, open_session
from modelyo.workspace import Workspace

pytestmark = [pytest.mark.docker, pytest.mark.slow]


class Recorder:
    """JobEvents that remember everything, in order."""

    def __init__(self) -> None:
        self.phases: list[str] = []
        self.chunks: list[tuple[str, str]] = []
        self.transfers: list[tuple[str, int, int | None]] = []

    def phase(self, phase: str, detail: str = "") -> None:
        self.phases.append(phase)

    def output(self, stream: str, text: str) -> None:
        self.chunks.append((stream, text))

    def transfer(self, phase: str, done: int, total: int | None) -> None:
        assert self.phases[-1] == phase  # reported within its phase
        self.transfers.append((phase, done, total))

    def stream(self, name: str) -> str:
        return "".join(text for stream, text in self.chunks if stream == name)

    @property
    def text(self) -> str:
        return "".join(text for _, text in self.chunks)


@pytest.fixture(scope="module")
def home(module_stack, base_image, tmp_path_factory):
    """The module's local stack, attested from a temporary directory (the cwd)."""
    project = tmp_path_factory.mktemp("project")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        assert main(["attest"]) == 0
        yield project


@pytest.fixture
def session(home):
    with open_session() as opened:
        yield opened
    # Every job's container is gone afterwards, whatever happened.
    with open_session() as check:
        assert [c.name for c in check.agent.containers().containers] == []


def frame() -> pd.DataFrame:
    data = pd.DataFrame(
        {
            "i": np.arange(5, dtype="int64"),
            "f": [0.5, np.nan, 2.5, 3.5, 4.5],
            "obj": pd.Series(["a", None, "c", "d", "e"], dtype=object),
            "s": ["v", "w", None, "y", "z"],
            "I": pd.array([1, None, 3, 4, 5], dtype="Int64"),
            "b": pd.array([True, None, False, True, False], dtype="boolean"),
            "S": pd.array(["p", None, "q", "r", "s"], dtype="string"),
            "tz": pd.date_range("2024-01-01", periods=5, tz="America/New_York"),
            "naive": pd.to_datetime(["2024-01-01", None, "2024-01-03", "2024-01-04", "2025-01-01"]),
            "cat": pd.Categorical(["lo", "hi", None, "lo", "hi"], categories=["lo", "hi"]),
        }
    )
    data.index = pd.MultiIndex.from_arrays(
        [["x", "x", "y", "y", "z"], [1, 2, 1, 2, 1]], names=["site", "visit"]
    )
    return data


def test_a_mixed_type_dataframe_goes_in_and_comes_back(session):
    df = frame()
    events = Recorder()
    code = (
        "print('rows', len(df))\n"
        "same = df\n"
        "doubled = df.assign(i=df.i * 2, I=df.I * 2)\n"
        "kinds = {c: str(t) for c, t in df.dtypes.items()}\n"
    )
    result = session.run(
        JobSpec(code, inputs={"df": df}, outputs=["same", "doubled", "kinds"]), events
    )
    same, doubled = result.outputs["same"], result.outputs["doubled"]
    pd.testing.assert_frame_equal(df, same, check_exact=True)
    assert list(same.dtypes) == list(df.dtypes)
    assert list(same.index.dtypes) == list(df.index.dtypes)
    pd.testing.assert_frame_equal(doubled, df.assign(i=df.i * 2, I=df.I * 2), check_exact=True)
    # The remote side saw the same dtypes.
    assert result.outputs["kinds"] == {c: str(t) for c, t in df.dtypes.items()}
    assert events.phases == ["packaging", "uploading", "starting", "running", "collecting", "done"]
    assert "rows 5" in events.text
    assert result.exit_code == 0 and result.container.startswith("modelyo-job-")


def test_scalars_lists_and_dicts(session):
    spec = JobSpec(
        "total = n + sum(v for v in items if isinstance(v, int))\n"
        "conf['seen'] = True\n"
        "names = [str(v) for v in items]\n"
        "nothing = None\n",
        inputs={"n": np.int64(40), "items": [1, 1, "a", None], "conf": {"rate": 0.25}},
        outputs=["total", "conf", "names", "nothing"],
    )
    outputs = session.run(spec).outputs
    assert outputs == {
        "total": 42,
        "conf": {"rate": 0.25, "seen": True},
        "names": ["1", "1", "a", "None"],
        "nothing": None,
    }
    assert type(outputs["total"]) is int


def test_a_remote_exception_comes_back_with_its_traceback(session):
    code = "x = 1\ndef ratio(v):\n    return v / (v - 1)\nresult = ratio(x)\n"
    events = Recorder()
    with pytest.raises(RemoteExecutionError) as caught:
        session.run(JobSpec(code, outputs=["result"]), events)
    error = caught.value
    assert error.ename == "ZeroDivisionError"
    assert error.evalue == "division by zero"
    text = "".join(error.remote_traceback)
    assert "return v / (v - 1)" in text and "result = ratio(x)" in text
    assert 'File "<cell>", line 3, in ratio' in text
    assert "runner.py" not in text  # the runner's own frames are trimmed
    assert "return v / (v - 1)" in str(error) and "ZeroDivisionError" in str(error)
    assert events.phases[-1] == "failed"


def test_a_timeout_stops_and_removes_the_container(session):
    events = Recorder()
    spec = JobSpec(
        "import time\nprint('started', flush=True)\ntime.sleep(120)\n",
        timeout=4,
        name="modelyo-job-timeout-test",
    )
    with pytest.raises(JobTimeoutError, match=r"longer than its timeout of 4 s"):
        session.run(spec, events)
    names = [c.name for c in session.agent.containers().containers]
    assert "modelyo-job-timeout-test" not in names
    assert events.phases[-1] == "timed out"
    assert "started" in events.text


def test_output_streams_in_order_with_stderr_apart(session):
    events = Recorder()
    code = (
        "import sys, time, warnings\n"
        "for n in range(40):\n"
        "    print(f'line {n}')\n"
        "    if n % 10 == 0:\n"
        "        time.sleep(0.05)\n"
        "time.sleep(0.05)\n"
        "print('to stderr', file=sys.stderr)\n"
        "time.sleep(0.05)\n"
        "print('é and 字')\n"
        "time.sleep(0.05)\n"
        "warnings.warn('careful')\n"
    )
    session.run(JobSpec(code), events)
    # Each stream's text as written, and the order between them kept (the writes are a few
    # milliseconds apart: the engine reads the two pipes apart, so closer writes may swap).
    assert events.stream("stdout") == "".join(f"line {n}\n" for n in range(40)) + "é and 字\n"
    stderr = events.stream("stderr")
    assert stderr.startswith("to stderr\n") and "UserWarning: careful" in stderr
    runs = [
        stream
        for n, (stream, _) in enumerate(events.chunks)
        if n == 0 or events.chunks[n - 1][0] != stream
    ]
    assert runs == ["stdout", "stderr", "stdout", "stderr"]
    assert len(events.chunks) >= 4  # it arrived in pieces, as written, not at the end


def test_the_agent_keeps_stdout_and_stderr_apart_and_in_order(session, capfd):
    """The agent's framed logs route, and `modelyo docker logs`, with a real container."""
    from modelyo.api.agent import ContainerSpec

    code = (
        "import sys, time\n"
        "for n in range(6):\n"
        "    stream = sys.stderr if n % 2 else sys.stdout\n"
        "    print(f'{stream.name[4:-1]} {n}', file=stream, flush=True)\n"
        "    time.sleep(0.03)\n"
    )
    name = "modelyo-logs-apart-test"
    agent = session.agent
    agent.create(ContainerSpec(image=JobSpec("").image, name=name, command=["python", "-c", code]))
    try:
        agent.start(name)
        followed = list(agent.logs(name, follow=True, separate=True))
        expected = [
            ("stderr" if n % 2 else "stdout", f"{'err' if n % 2 else 'out'} {n}\n".encode())
            for n in range(6)
        ]
        assert followed == expected
        # Afterwards, without follow: the same; the default stays the merged bytes.
        assert list(agent.logs(name, separate=True)) == expected
        assert b"".join(agent.logs(name)) == b"".join(data for _, data in expected)

        capfd.readouterr()
        assert main(["docker", "logs", name]) == 0
        out, err = capfd.readouterr()
        assert out == "out 0\nout 2\nout 4\n" and err == "err 1\nerr 3\nerr 5\n"
    finally:
        agent.delete(name)


def test_big_inputs_and_results_report_bytes(session):
    events = Recorder()
    rng = np.random.default_rng(5)
    df = pd.DataFrame({"x": rng.random(600_000), "y": rng.random(600_000)})  # ~9.6 MB
    result = session.run(JobSpec("back = df", inputs={"df": df}, outputs=["back"]), events)
    assert result.outputs["back"].equals(df)
    by_phase: dict[str, list[tuple[int, int | None]]] = {}
    for phase, done, total in events.transfers:
        by_phase.setdefault(phase, []).append((done, total))
    assert set(by_phase) == {"packaging", "uploading", "collecting"}
    for phase, reports in by_phase.items():
        done = [d for d, _ in reports]
        assert done == sorted(done) and len(set(done)) == len(done), phase  # monotonic
    # Packaging: the encoded bytes (Parquet of random floats does not shrink), total unknown.
    assert by_phase["packaging"][-1][0] > 9_000_000
    assert all(total is None for _, total in by_phase["packaging"])
    # Uploading: the sealed bundle's bytes of its size, ending at the size.
    upload_total = by_phase["uploading"][-1][1]
    assert upload_total is not None and upload_total > 9_000_000
    assert all(total == upload_total for _, total in by_phase["uploading"])
    assert by_phase["uploading"][-1][0] == upload_total
    # Collecting: the result's bytes as they come.
    assert by_phase["collecting"][-1][0] > 9_000_000
    # Throttled: a 10 MB job makes a handful of reports per step, not one per chunk.
    assert len(events.transfers) < 60


def test_a_missing_output_is_reported_by_name(session):
    with pytest.raises(JobError, match=r"did not define 'nope'; assign each output name"):
        session.run(JobSpec("yes = 1\n", outputs=["yes", "nope"]))


def test_open_session_before_attestation_is_refused(tmp_path):
    with pytest.raises(NotAttestedError, match=r"run `%modelyo attest` in a notebook, or `modelyo"):
        open_session(Workspace(tmp_path))


def test_a_key_id_the_vm_may_not_use_is_refused(session, home):
    """The owner restricts the VM to key id "default" in the CA's policy; a job under another
    key id is refused: the CA releases that key to the owner, but not to the VM."""
    with CaClient.for_owner(Workspace(home)) as ca:
        before = ca.policy()
        restricted = before.model_copy(
            update={"vms": [r.model_copy(update={"key_ids": ["default"]}) for r in before.vms]}
        )
        ca.set_policy(restricted)
        try:
            events = Recorder()
            with pytest.raises(JobError, match=r"'restricted'") as caught:
                session.run(JobSpec("x = 1\n", outputs=["x"], key_id="restricted"), events=events)
            # Refused when the container is created (the agent asks the CA first), with the
            # CA's reason; nothing ran.
            message = str(caught.value)
            assert "did not create the job's container" in message
            assert "not released to this VM" in message and "may not receive" in message
            assert "running" not in events.phases
            # The default key still works for this VM.
            assert session.run(JobSpec("x = 1\n", outputs=["x"])).outputs == {"x": 1}
        finally:
            ca.set_policy(before)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def test_a_large_frame_round_trip_costs_the_client_a_bounded_multiple_of_its_size(session):
    """Inputs are encoded one at a time into the encrypting pipe and outputs decoded in place
    from the one decrypted copy, so a round trip (which brings a second frame back: 1x) costs
    a small multiple of the frame, not one copy per stage."""
    clear_refs = Path("/proc/self/clear_refs")
    if not clear_refs.exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    rows = 2_000_000
    rng = np.random.default_rng(3)
    names = pd.Index([f"p{i}" for i in range(1_000)], dtype="str")
    df = pd.DataFrame(
        {
            "id": np.arange(rows, dtype=np.int64),
            "value": rng.normal(size=rows),
            "name": names.take(rng.integers(0, len(names), rows)),
            "seen": pd.DatetimeIndex(rng.integers(0, 10**15, rows), tz="UTC"),
            "ward": pd.Categorical.from_codes(rng.integers(0, 3, rows), ["a", "b", "c"]),
        }
    )
    size = int(df.memory_usage(deep=True).sum())
    gc.collect()
    before = _rss_kib("VmRSS")
    clear_refs.write_text("5")  # the peak (VmHWM) starts again from the current RSS
    result = session.run(JobSpec("df2 = df", inputs={"df": df}, outputs=["df2"]))
    grown = (_rss_kib("VmHWM") - before) * 1024
    back = result.outputs["df2"]
    # DataFrame.equals, as assert_frame_equal takes seconds per million strings.
    assert back.equals(df) and list(back.dtypes) == list(df.dtypes)
    assert grown < 4 * size, f"peak RSS grew by {grown / size:.2f}x the frame's {size} bytes"
