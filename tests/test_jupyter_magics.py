"""The IPython magics in an in-process shell (fast): help, argument handling, refusals, the
`%%modelyo_run` plumbing against a fake job session, and the cards and progress widgets
without a frontend (ipywidgets fall back to comm's DummyComm)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from modelyo import pki
from modelyo.api.agent import GpuEvidence, GpuReport
from modelyo.attest import AttestOutcome, CaOnboarding, TdxOnboarding
from modelyo.errors import (
    ConfigError,
    JobError,
    JobTimeoutError,
    ModelyoError,
    NotAttestedError,
    RemoteExecutionError,
)
from modelyo.workspace import CA_CERT, CA_CLIENT_CERT, CA_CLIENT_KEY, Workspace
from modelyo_jupyter import magics, widgets

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def plain(text: str) -> str:
    return ANSI.sub("", text)


@pytest.fixture(scope="module")
def ipython() -> Iterator[InteractiveShell]:
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "modelyo_jupyter")
    yield shell
    shell.run_line_magic("unload_ext", "modelyo_jupyter")


@pytest.fixture
def shell(ipython, tmp_path, monkeypatch) -> InteractiveShell:
    """The shell in a fresh, unattested directory, with no stack or endpoint to discover."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MODELYO_DEV_DIR", str(tmp_path / "no-stack"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    for var in ("MODELYO_CA_URL", "MODELYO_TDX_URL", "MODELYO_SIM_DIR"):
        monkeypatch.delenv(var, raising=False)
    return ipython


def run(shell: InteractiveShell, capsys, code: str) -> tuple[Any, str, str]:
    """Run a cell; its result and its (ANSI-free) stdout and stderr."""
    result = shell.run_cell(code)
    out, err = capsys.readouterr()
    return result, plain(out), plain(err)


# --- loading and help ---------------------------------------------------------------------------


def test_importing_the_package_stays_light():
    code = (
        "import sys, modelyo_jupyter\n"
        "heavy = [m for m in ('IPython', 'pandas', 'ipywidgets', 'modelyo.jobs', 'httpx')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(modelyo_jupyter.load_ipython_extension)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_and_unload_register_and_remove_the_magics(ipython):
    manager = ipython.magics_manager
    assert "modelyo" in manager.magics["line"]
    assert "modelyo_run" in manager.magics["cell"]
    ipython.run_line_magic("unload_ext", "modelyo_jupyter")
    assert "modelyo" not in manager.magics["line"]
    assert "modelyo_run" not in manager.magics["cell"]
    ipython.run_line_magic("load_ext", "modelyo_jupyter")
    assert "modelyo" in manager.magics["line"]


def test_help_shows_every_subcommand_and_how_to_autoload(shell, capsys):
    result, out, _ = run(shell, capsys, "%modelyo help")
    assert result.success
    for text in (
        "%modelyo attest",
        "--simulation",
        "--mrenclave HEX",
        "%modelyo status",
        "%modelyo ps",
        "%modelyo logs [-h] [-f] NAME",
        "%%modelyo_run",
        'c.InteractiveShellApp.extensions = ["modelyo_jupyter"]',
        "--ext modelyo_jupyter",
        "c.MagicsManager.lazy_magics",
    ):
        assert text in out, text
    # `%modelyo?` shows the same text (the magic's docstring).
    doc = shell.find_line_magic("modelyo").__doc__
    assert "%modelyo logs [-h] [-f] NAME" in doc and "lazy_magics" in doc


@pytest.mark.parametrize("line", ["%modelyo help logs", "%modelyo logs -h", "%modelyo logs --help"])
def test_help_for_one_subcommand(shell, capsys, line):
    result, out, _ = run(shell, capsys, line)
    assert result.success
    assert "usage: %modelyo logs [-h] [-f] NAME" in out
    assert "--follow" in out
    assert "%modelyo attest" not in out


def test_cell_magic_help_lists_its_options(shell):
    doc = shell.find_cell_magic("modelyo_run").__doc__
    for text in ("-i NAME", "-o NAME", "--image IMG", "--gpu", "--timeout S", "--key-id K"):
        assert text in doc, text
    assert "--allow-pickle" in doc and "-q" in doc


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("%modelyo bogus", "unknown subcommand 'bogus': use one of attest, status, ps, logs"),
        ("%modelyo attest --nope", "unrecognized arguments: --nope"),
        ("%modelyo attest --at soon", "argument --at: invalid int value: 'soon'"),
        ("%modelyo logs", "the following arguments are required: NAME"),
        ("%modelyo help bogus", "no subcommand 'bogus'"),
    ],
)
def test_argument_errors_are_usage_errors(shell, capsys, line, message):
    result, out, err = run(shell, capsys, line)
    assert isinstance(result.error_in_exec, UsageError)
    assert message in out + err
    assert "Traceback" not in out + err


# --- the workspace before attestation -------------------------------------------------------------


def test_status_before_attestation_says_what_to_do(shell, capsys):
    result, out, _ = run(shell, capsys, "%modelyo status")
    assert result.success
    assert "not attested: run `%modelyo attest`" in out
    assert str(Path.cwd()) in out
    assert "none found: pass --ca/--tdx URL" in out  # no endpoint discovered either
    assert "SIMULATED" not in out


def test_status_shows_discovered_endpoints_and_a_partial_onboarding(shell, capsys, monkeypatch):
    monkeypatch.setenv("MODELYO_CA_URL", "https://ca.example:8443")
    monkeypatch.setenv("MODELYO_TDX_URL", "https://vm.example:8444")
    work = Workspace.here()
    _, root = pki.create_root("test CA root")
    pki.write_cert(work.path(CA_CERT), root)
    pki.write_cert(work.path(CA_CLIENT_CERT), root)  # only its subject and hash are shown
    work.path(CA_CLIENT_KEY).write_text("not read by status\n")
    result, out, _ = run(shell, capsys, "%modelyo status")
    assert result.success
    assert "CA attested, TDX VM not yet: run `%modelyo attest`" in out
    assert "https://vm.example:8444 (from MODELYO_TDX_URL; not attested yet)" in out
    assert f"CA owner  test CA root (certificate {pki.fingerprint(root)[:16]}" in out


@pytest.mark.parametrize("line", ["%modelyo ps", "%modelyo logs some-job"])
def test_vm_commands_before_attestation_are_refused(shell, capsys, line):
    result, out, err = run(shell, capsys, line)
    assert isinstance(result.error_in_exec, NotAttestedError)
    shown = out + err
    assert "NotAttestedError: " in shown
    assert "is not attested" in shown and "run `%modelyo attest`" in shown
    assert "Traceback" not in shown and "magics.py" not in shown


def test_attest_without_any_endpoint_says_how_to_give_one(shell, capsys):
    result, out, err = run(shell, capsys, "%modelyo attest")
    assert isinstance(result.error_in_exec, ConfigError)
    assert "no CA endpoint: pass --ca URL, set MODELYO_CA_URL" in out + err
    assert "Traceback" not in out + err
    assert not list(Path.cwd().iterdir())  # nothing written


def test_attest_against_nothing_fails_with_the_tools_message(shell, capsys):
    result, out, err = run(shell, capsys, "%modelyo attest --ca https://127.0.0.1:9 --simulation")
    assert isinstance(result.error_in_exec, ModelyoError)
    shown = out + err
    assert "https://127.0.0.1:9" in shown
    assert "Traceback" not in shown
    assert not list(Path.cwd().iterdir())


# --- %%modelyo_run with a fake job session ------------------------------------------------------


@dataclass
class FakeSession:
    """Stands in for `modelyo.jobs.open_session(...)`: records the spec, plays events."""

    outputs: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None
    specs: list[Any] = field(default_factory=list)
    workspaces: list[Path] = field(default_factory=list)

    def run(self, spec: Any, events: Any = None) -> Any:
        self.specs.append(spec)
        for phase in ("packaging", "uploading", "starting", "running"):
            events.phase(phase)
        events.output("stdout", "hello from the VM\n")
        events.output("stderr", "a warning from the VM\n")
        if self.error is not None:
            events.phase("failed")
            raise self.error
        events.phase("collecting")
        events.phase("done")
        return SimpleNamespace(
            outputs=dict(self.outputs), container="job-1", exit_code=0, seconds=1.5
        )

    def open(self, workspace: Workspace) -> Any:
        self.workspaces.append(workspace.root)

        @contextmanager
        def session() -> Iterator[FakeSession]:
            yield self

        return session()


@pytest.fixture
def fake(monkeypatch) -> FakeSession:
    session = FakeSession()
    monkeypatch.setattr(magics, "open_job_session", session.open)
    return session


def test_inputs_and_options_become_the_job_spec(shell, capsys, fake):
    shell.user_ns.update(df=[1, 2, 3], b=2.5, c="x")
    code = (
        "%%modelyo_run -i df -i b,c -o out --image my/img:1 --gpu --timeout 30 "
        "--key-id proj-1 --allow-pickle --name my-job\nout = len(df)\n"
    )
    result, _, _ = run(shell, capsys, code)
    assert result.success, result.error_in_exec
    [spec] = fake.specs
    assert spec.code == "out = len(df)\n"
    assert dict(spec.inputs) == {"df": [1, 2, 3], "b": 2.5, "c": "x"}
    assert list(spec.outputs) == ["out"]
    assert (spec.image, spec.gpu, spec.timeout) == ("my/img:1", True, 30.0)
    assert (spec.key_id, spec.allow_pickle, spec.name) == ("proj-1", True, "my-job")
    assert fake.workspaces == [Path.cwd()]


def test_defaults_of_the_job_spec(shell, capsys, fake):
    from modelyo.jobs import DEFAULT_IMAGE

    result, _, _ = run(shell, capsys, "%%modelyo_run\nprint(1)\n")
    assert result.success, result.error_in_exec
    [spec] = fake.specs
    assert (spec.image, spec.gpu, spec.timeout) == (DEFAULT_IMAGE, False, None)
    assert (spec.key_id, spec.allow_pickle, list(spec.outputs)) == ("default", False, [])


def test_no_variable_expansion_in_the_line(shell, capsys, fake):
    shell.user_ns["img"] = "expanded"
    result, _, _ = run(shell, capsys, "%%modelyo_run --image $img\npass\n")
    assert result.success, result.error_in_exec
    assert fake.specs[0].image == "$img"  # as written, not a notebook value


def test_outputs_are_pushed_into_the_namespace(shell, capsys, fake):
    fake.outputs = {"out": {"n": 3}, "other": 7}
    shell.user_ns.pop("out", None)
    result, out, err = run(shell, capsys, "%%modelyo_run -o out,other\nout = ...\n")
    assert result.success
    assert shell.user_ns["out"] == {"n": 3} and shell.user_ns["other"] == 7
    # Remote output streams to the cell's stdout/stderr; phases print as lines (no frontend).
    assert "hello from the VM" in out and "a warning from the VM" in err
    assert "[modelyo_run: running (" in out and "[modelyo_run: done in" in out


def test_a_job_error_fails_the_cell_with_the_engines_message(shell, capsys, fake):
    fake.error = JobError("the job's code did not define 'b'; assign each output name")
    shell.user_ns["b"] = "before"
    result, out, err = run(shell, capsys, "%%modelyo_run -o b\na = 1\n")
    assert isinstance(result.error_in_exec, JobError)
    assert "JobError: the job's code did not define 'b'" in out + err
    assert "Traceback" not in out + err
    assert shell.user_ns["b"] == "before"


def test_quiet_hides_progress_but_not_the_remote_output(shell, capsys, fake):
    result, out, err = run(shell, capsys, "%%modelyo_run -q\nprint('x')\n")
    assert result.success
    assert "hello from the VM" in out and "a warning from the VM" in err
    assert "modelyo_run:" not in out


def test_a_missing_input_is_a_name_error(shell, capsys, fake):
    shell.user_ns.pop("nope", None)
    result, out, err = run(shell, capsys, "%%modelyo_run -i nope\npass\n")
    assert isinstance(result.error_in_exec, NameError)
    assert "name 'nope' is not defined (-i takes a variable of the notebook)" in out + err
    assert "Traceback" not in out + err
    assert not fake.specs


def test_local_scope_comes_before_the_notebook(shell):
    instance = shell.magics_manager.registry["ModelyoMagics"]
    shell.user_ns["v"] = "notebook"
    assert instance._lookup("v", {"v": "local"}) == "local"
    assert instance._lookup("v", {}) == "notebook"
    with pytest.raises(NameError):
        instance._lookup("absent-name", {})


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("-i 1x", "'1x' is not a variable name"),
        ("-o a-b", "'a-b' is not a variable name"),
        ("-o class", "'class' is not a variable name"),
        ("--timeout 0", "--timeout must be a positive number of seconds"),
        ("--timeout soon", "argument --timeout: invalid float value: 'soon'"),
        ("--bogus", "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_are_usage_errors(shell, capsys, fake, line, message):
    result, out, err = run(shell, capsys, f"%%modelyo_run {line}\npass\n")
    assert isinstance(result.error_in_exec, UsageError)
    assert message in out + err
    assert not fake.specs


def test_an_empty_cell_is_refused(shell, capsys, fake):
    result, out, err = run(shell, capsys, "%%modelyo_run -o x\n\n")
    assert isinstance(result.error_in_exec, UsageError)
    assert "the cell is empty" in out + err


def test_a_remote_exception_fails_the_cell_with_the_remote_traceback(shell, capsys, fake):
    fake.error = RemoteExecutionError(
        "the cell raised ZeroDivisionError in the VM",
        ename="ZeroDivisionError",
        evalue="division by zero",
        remote_traceback=[
            "Traceback (most recent call last):\n",
            '  File "<cell>", line 2, in <module>\n',
            "ZeroDivisionError: division by zero\n",
        ],
    )
    result, out, err = run(shell, capsys, "%%modelyo_run\nx = 1\n1 / 0\n")
    assert isinstance(result.error_in_exec, RemoteExecutionError)
    shown = out + err
    assert "Remote traceback (the cell ran in the attested TDX VM):" in shown
    assert 'File "<cell>", line 2, in <module>' in shown
    assert "RemoteExecutionError: ZeroDivisionError: division by zero" in shown
    assert "magics.py" not in shown  # no local traceback through the extension
    assert "[modelyo_run: failed in" in out


def test_a_timeout_says_the_container_was_stopped(shell, capsys, fake):
    fake.error = JobTimeoutError("the job ran longer than its timeout of 2 s")
    result, out, err = run(shell, capsys, "%%modelyo_run --timeout 2\nimport time\n")
    assert isinstance(result.error_in_exec, JobTimeoutError)
    shown = out + err
    assert "JobTimeoutError: the job ran longer than its timeout of 2 s" in shown
    assert "container was stopped and removed" in shown


def test_an_interrupt_is_re_raised(shell, capsys, fake):
    fake.error = KeyboardInterrupt()
    result, _, err = run(shell, capsys, "%%modelyo_run\nwhile True: pass\n")
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert "interrupted: the job's container was stopped" in err


def test_running_before_attestation_is_refused(shell, capsys):
    # The real job session: the workspace lacks what `modelyo attest` writes.
    result, out, err = run(shell, capsys, "%%modelyo_run\nprint('never')\n")
    assert isinstance(result.error_in_exec, NotAttestedError)
    shown = out + err
    assert "%modelyo attest" in shown
    assert "never" not in shown and "Traceback" not in shown


# --- cards and widgets (no frontend) --------------------------------------------------------------


def _outcome(workspace: Workspace, *, simulated: bool = True, tdx: bool = True) -> Any:
    verdict = SimpleNamespace(
        simulated=simulated,
        status="UpToDate",
        advisories=[],
        measurements={"mrenclave": "aa" * 32, "mrsigner": "bb" * 32, "isv_prod_id": "1"},
    )
    ca = CaOnboarding(
        url="https://ca:1",
        url_source="command line",
        verdict=verdict,  # type: ignore[arg-type]
        root_fingerprint="00",
        client_fingerprint="11",
        ownership="claimed",
        expected_from="defaults",
        files=[CA_CERT],
    )
    gpu = GpuEvidence(
        index=0,
        uuid="GPU-1",
        name="H100 <sim>",
        arch="hopper",
        driver_version="550",
        vbios_version="96",
        cc_mode="on",
        simulated=True,
        nonce="00",
        report="",
        certificate_chain=[],
        verified=True,
    )
    vm = TdxOnboarding(
        url="https://vm:2",
        url_source="the local stack (modelyo dev up)",
        vm_id="vm-1",
        verdict=SimpleNamespace(
            simulated=simulated,
            status="OutOfDate",
            advisories=["INTEL-SA-1"],
            measurements={"mrtd": "cc" * 48, "rtmr0": "dd" * 48},
        ),  # type: ignore[arg-type]
        gpus=GpuReport(gpus=[gpu]),
        server_fingerprint="22",
        client_fingerprint="33",
        ownership="already owner",
        expected_from="defaults",
    )
    return AttestOutcome(workspace, ca, vm if tdx else None, simulated)


def test_the_attestation_card_holds_what_a_user_checks(tmp_path):
    work = Workspace(tmp_path)
    _, root = pki.create_root("r")
    pki.write_cert(work.path(CA_CERT), root)
    text = widgets.card_text(magics.attestation_card(_outcome(work)))
    assert text.startswith("!!!") and "SIMULATED: trusted under the simulation root" in text
    for expected in (
        "MRENCLAVE",
        "aa" * 32,
        "MRSIGNER",
        "MRTD",
        "cc" * 48,
        "RTMR0",
        "TCB status         UpToDate",
        "OutOfDate (advisories: INTEL-SA-1) [!]",
        "GPU 0  H100 <sim> (hopper), CC mode on",
        "evidence verified, SIMULATED",
        f"ca.pem  {pki.fingerprint(root)}",
        "https://vm:2 (the local stack (modelyo dev up))",
        "claimed: this directory holds the owner's keys",
        "Wrote ca.pem",
    ):
        assert expected in text, expected
    assert "RTMR1" not in text  # only the registers the quote has


def test_a_card_without_simulation_or_vm(tmp_path):
    card = magics.attestation_card(_outcome(Workspace(tmp_path), simulated=False, tdx=False))
    text = widgets.card_text(card)
    assert "SIMULATED" not in text
    assert "no endpoint configured" in text and "step 2 skipped" in text


def test_the_card_widget_carries_the_text_and_escaped_html(tmp_path):
    card = magics.attestation_card(_outcome(Workspace(tmp_path)))
    widget = widgets.card_widget(card)
    bundle = widget._repr_mimebundle_()
    assert bundle["text/plain"] == widgets.card_text(card)
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "H100 &lt;sim&gt;" in bundle["text/html"] and "<sim>" not in bundle["text/html"]
    first = widget.children[0]
    assert "SIMULATED" in first.value and "background" in first.value  # the banner on top
    assert any("MRENCLAVE" in child.value for child in widget.children)


def test_the_plain_card_view_without_ipywidgets(tmp_path, monkeypatch):
    monkeypatch.setattr(widgets, "have_widgets", lambda: False)
    card = magics.attestation_card(_outcome(Workspace(tmp_path)))
    view = widgets.card_display(card)
    assert isinstance(view, widgets.CardView)
    bundle = view._repr_mimebundle_()
    assert set(bundle) == {"text/plain", "text/html"}
    assert "MRTD" in bundle["text/plain"]


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_job_progress_widget_follows_the_phases():
    clock, shown = _Clock(), []

    class Handle:
        def __init__(self) -> None:
            self.updates: list[Any] = []

        def update(self, obj: Any) -> None:
            self.updates.append(obj._repr_mimebundle_()["text/plain"])

    handle = Handle()

    def display(obj: Any, display_id: bool = False) -> Handle:
        shown.append(obj)
        return handle

    progress = widgets.JobProgress("widget", clock=clock, display=display)
    progress.phase("packaging")
    [widget] = shown
    label, bar = widget.children
    assert "packaging (0.0 s)" in label.value and bar.value == 0.0 and bar.bar_style == "info"
    clock.now += 2.5
    progress.phase("running", "container job-1")
    assert "running (2.5 s): container job-1" in label.value
    assert bar.value == pytest.approx(0.6)
    clock.now += 1.0
    progress.phase("done")
    assert bar.value == 1.0 and bar.bar_style == "success"
    assert handle.updates == ["modelyo_run: done in 3.5 s"]
    assert widget._repr_mimebundle_()["text/plain"] == "modelyo_run: done in 3.5 s"
    assert len(shown) == 1  # one widget, updated in place


def test_job_progress_marks_a_failure():
    clock, shown = _Clock(), []
    progress = widgets.JobProgress(
        "widget", clock=clock, display=lambda obj, display_id: shown.append(obj)
    )
    progress.phase("packaging")
    progress.phase("running")
    progress.phase("timed out", "after 2 s")
    bar = shown[0].children[1]
    assert bar.bar_style == "danger" and bar.value == pytest.approx(0.6)
    assert progress.text() == "modelyo_run: timed out in 0.0 s: after 2 s"


def test_job_progress_text_mode_prints_phase_lines(capsys):
    progress = widgets.JobProgress("text", clock=_Clock())
    progress.phase("uploading", "3 MB")
    progress.output("stdout", "out\n")
    progress.output("stderr", "err\n")
    out, err = capsys.readouterr()
    assert out == "[modelyo_run: uploading (0.0 s): 3 MB]\nout\n" and err == "err\n"


def test_job_progress_widget_shows_bytes_moved():
    clock, shown = _Clock(), []
    progress = widgets.JobProgress(
        "widget", clock=clock, display=lambda obj, display_id: shown.append(obj)
    )
    progress.phase("packaging", "1 input(s)")
    label, bar = shown[0].children
    progress.transfer("packaging", 3 * 2**20, None)
    assert "packaging 3.0 MiB (0.0 s): 1 input(s)" in label.value and bar.value == 0.0
    progress.phase("uploading", "job-1")
    assert "uploading (0.0 s)" in label.value  # a new phase starts without bytes
    progress.transfer("uploading", int(120.5 * 2**20), 480 * 2**20)
    assert "uploading 120.5/480.0 MiB (0.0 s): job-1" in label.value
    assert bar.value == pytest.approx(0.2 + 0.2 * 120.5 / 480)
    progress.transfer("uploading", 480 * 2**20, 480 * 2**20)
    assert bar.value == pytest.approx(0.4)
    progress.transfer("packaging", 1, None)  # late news of an earlier step: ignored
    assert "uploading 480.0/480.0 MiB" in label.value
    progress.phase("collecting")
    progress.transfer("collecting", 1536, None)
    assert "collecting 1.5 KiB (0.0 s)" in label.value
    progress.phase("done")
    assert progress.text() == "modelyo_run: done in 0.0 s" and bar.value == 1.0


def test_job_progress_text_mode_prints_a_few_transfer_lines(capsys):
    clock = _Clock()
    progress = widgets.JobProgress("text", clock=clock)
    progress.phase("uploading")
    total = 2**30
    for n in range(1, 101):  # a hundred reports, a tenth of a second apart
        clock.now += 0.1
        progress.transfer("uploading", total * n // 100, total)
    progress.phase("collecting")
    for n in range(1, 301):  # thirty seconds of unknown size
        clock.now += 0.1
        progress.transfer("collecting", n * 2**20, None)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:5] == [
        "[modelyo_run: uploading (0.0 s)]",
        "[modelyo_run: uploading 0.2/1.0 GiB (2.5 s)]",
        "[modelyo_run: uploading 0.5/1.0 GiB (5.0 s)]",
        "[modelyo_run: uploading 0.8/1.0 GiB (7.5 s)]",
        "[modelyo_run: uploading 1.0/1.0 GiB (10.0 s)]",
    ]
    assert lines[5] == "[modelyo_run: collecting (10.0 s)]"
    # Unknown size: a line every ten seconds or so, not three hundred.
    assert 2 <= len(lines[6:]) <= 3
    assert all(line.startswith("[modelyo_run: collecting ") for line in lines[6:])
    assert lines[6].startswith("[modelyo_run: collecting 10") and "MiB" in lines[6]


def test_progress_mode_choice(ipython):
    assert magics.progress_mode(ipython, quiet=True) == "none"
    assert magics.progress_mode(ipython, quiet=False) == "text"  # no kernel here
    assert magics.progress_mode(SimpleNamespace(kernel=object()), quiet=False) == "widget"
