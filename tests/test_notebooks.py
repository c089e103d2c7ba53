"""The example notebooks, run as users and CI run them, against the local stack (SIMULATED
platform) and this machine's real Docker engine:

- `pytest --nbval-lax notebooks/quickstart.ipynb` (any error in a cell fails it; the notebook
  asserts its own round trip);
- `papermill notebooks/analysis.ipynb modelyo+enc://out.ipynb -p ...` from the command line, its
  output notebook stored encrypted, then read back through the handler.

Each runs in a scratch folder that becomes the workspace (`%modelyo attest` writes there), so the
repository's notebooks/ folder is never written to.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from modelyo.cli.main import main
from modelyo_jupyter.papermill_io import EncryptedNotebookHandler

pytestmark = [pytest.mark.docker, pytest.mark.slow]

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PYTHON = sys.executable  # the venv's interpreter: its kernel, nbval and papermill
TIMEOUT = 900


@pytest.fixture
def workdir(stack, base_image, tmp_path, monkeypatch):
    """A scratch folder to run notebooks in, as the current directory."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a command as a user would, with the environment the stack fixture set."""
    return subprocess.run(
        args, cwd=cwd, env=dict(os.environ), capture_output=True, text=True, timeout=TIMEOUT
    )


def code_cells(path: Path) -> int:
    return sum(c.cell_type == "code" for c in nbformat.read(path, as_version=4).cells)


def test_committed_notebooks_have_no_outputs():
    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, path.name
    analysis = nbformat.read(NOTEBOOKS / "analysis.ipynb", as_version=4)
    assert any("parameters" in c.metadata.get("tags", []) for c in analysis.cells)


def test_quickstart_passes_nbval(workdir):
    shutil.copy(NOTEBOOKS / "quickstart.ipynb", workdir)
    proc = run(
        [
            PYTHON,
            "-m",
            "pytest",
            "--nbval-lax",
            "--nbval-current-env",
            "--nbval-cell-timeout=600",
            "-p",
            "no:cacheprovider",
            "-q",
            "quickstart.ipynb",
        ],
        workdir,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert f"{code_cells(NOTEBOOKS / 'quickstart.ipynb')} passed" in output, output
    # What the notebook did, seen from outside: attested here, wrote ciphertext only.
    assert (workdir / "ca_client.key").is_file() and (workdir / "tdx_client.key").is_file()
    stored = (workdir / "patients.parquet.enc").read_bytes()
    assert b"Alice" not in stored and b"PAR1" not in stored


def test_analysis_runs_with_papermill_into_an_encrypted_notebook(workdir, capsys):
    assert main(["attest"]) == 0  # the output's keys come from this folder's CA
    capsys.readouterr()
    proc = run(
        [
            PYTHON,
            "-m",
            "papermill",
            str(NOTEBOOKS / "analysis.ipynb"),
            "modelyo+enc://out.ipynb",
            "-p",
            "rows",
            "500",
            "-p",
            "seed",
            "3",
            "-p",
            "output_path",
            "result.parquet.enc",
            "--no-progress-bar",
        ],
        workdir,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    raw = (workdir / "out.ipynb").read_bytes()
    assert b"nbformat" not in raw and b"analysing" not in raw
    nb = nbformat.reads(EncryptedNotebookHandler.read("modelyo+enc://out.ipynb"), as_version=4)
    assert nb.metadata.papermill.parameters == {
        "rows": 500,
        "seed": 3,
        "output_path": "result.parquet.enc",
    }
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "rows = 500" in injected[0].source
    remote = next(c for c in nb.cells if c.source.startswith("%%modelyo_run"))
    text = "".join(o.get("text", "") for o in remote.outputs if o.output_type == "stream")
    assert "analysing 500 records in the VM" in text, remote.outputs
    assert not any(o.output_type == "error" for c in nb.cells for o in c.get("outputs", []))

    import modelyo_jupyter

    result = modelyo_jupyter.read_encrypted("result.parquet.enc")
    assert sorted(result.index) == ["east", "north", "south", "west"]
    assert int(result["records"].sum()) == 500


def test_papermill_refuses_an_encrypted_output_before_attestation(workdir):
    proc = run(
        [
            PYTHON,
            "-m",
            "papermill",
            str(NOTEBOOKS / "analysis.ipynb"),
            "modelyo+enc://out.ipynb",
            "--no-progress-bar",
        ],
        workdir,
    )
    assert proc.returncode != 0
    assert "`modelyo attest` in a shell, there first" in proc.stderr, proc.stderr
    assert not (workdir / "out.ipynb").exists()
