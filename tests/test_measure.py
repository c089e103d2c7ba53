"""Simulated measurements: stable, location-independent, and sensitive to every file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from modelyo.cli.main import cli, main
from modelyo.errors import ConfigError, PlatformError
from modelyo.measure import COMPONENTS, locate_packages, measure
from modelyo.tee.provider import Tee


def copy_tree(component: str, dest: Path) -> Path:
    """Copy every installed package of `component` under `dest`, bytecode caches included."""
    for package, directory in locate_packages(component).items():
        shutil.copytree(directory, dest / package)
    return dest


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return copy_tree("agent", tmp_path / "src")


def test_registers_and_sizes() -> None:
    ca = measure("ca")
    agent = measure("agent")
    assert (ca.tee, ca.register, len(ca.value)) == (Tee.SGX, "MRENCLAVE", 32)
    assert (agent.tee, agent.register, len(agent.value)) == (Tee.TDX, "MRTD", 48)
    assert ca.hex == ca.value.hex()
    assert "modelyo" in ca.packages and "modelyo" in agent.packages


def test_stable_across_calls() -> None:
    assert measure("agent") == measure("agent")
    assert measure("ca") == measure("ca")


def test_same_value_for_a_copy_elsewhere(tmp_path: Path) -> None:
    for component in COMPONENTS:
        copy = copy_tree(component, tmp_path / component / "elsewhere")
        assert measure(component, source_root=copy).value == measure(component).value


def test_ignores_bytecode_mtimes_and_modes(tree: Path) -> None:
    before = measure("agent", source_root=tree)
    cache = tree / "modelyo" / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "new.cpython-311.pyc").write_bytes(b"bytecode")
    (cache / "lock").write_bytes(b"whatever lives in a cache directory")
    (tree / "modelyo" / "stray.pyc").write_bytes(b"bytecode")
    target = tree / "modelyo" / "errors.py"
    os.utime(target, (1, 1))
    target.chmod(0o600)
    assert measure("agent", source_root=tree) == before


def test_one_changed_byte_changes_it(tree: Path) -> None:
    before = measure("agent", source_root=tree)
    target = tree / "modelyo" / "errors.py"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    after = measure("agent", source_root=tree)
    assert after.value != before.value
    assert after.file_count == before.file_count


def test_added_file_changes_it(tree: Path) -> None:
    before = measure("ca", source_root=tree)
    (tree / "modelyo" / "tee" / "extra.py").write_text("")
    after = measure("ca", source_root=tree)
    assert after.value != before.value
    assert after.file_count == before.file_count + 1


def test_removed_file_changes_it(tree: Path) -> None:
    before = measure("agent", source_root=tree)
    (tree / "modelyo" / "errors.py").unlink()
    assert measure("agent", source_root=tree).value != before.value


def test_renamed_file_changes_it(tree: Path) -> None:
    before = measure("agent", source_root=tree)
    (tree / "modelyo" / "errors.py").rename(tree / "modelyo" / "errors2.py")
    after = measure("agent", source_root=tree)
    assert after.value != before.value
    assert after.file_count == before.file_count


def test_optional_package_is_measured_when_present(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(locate_packages("ca")["modelyo"], src / "modelyo")
    without = measure("ca", source_root=src)
    assert without.missing == ("ca_enclave",)
    (src / "ca_enclave").mkdir()
    (src / "ca_enclave" / "__init__.py").write_text('"""CA."""\n')
    with_ca = measure("ca", source_root=src)
    assert with_ca.missing == ()
    assert with_ca.packages == ("ca_enclave", "modelyo")
    assert with_ca.file_count == without.file_count + 1
    assert with_ca.value != without.value


def test_matches_the_documented_algorithm(tmp_path: Path) -> None:
    # An independent transcription of the module docstring, on a tree small enough to read.
    files = {
        "modelyo/__init__.py": b"",
        "modelyo/z.txt": b"zz",
        "modelyo/a/b.py": b"print('b')\n",
    }
    for rel, data in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def lp(b: bytes) -> bytes:
        return len(b).to_bytes(8, "big") + b

    for component, algorithm in (("ca", hashlib.sha256), ("agent", hashlib.sha384)):
        h = algorithm()
        h.update(lp(b"modelyo-measurement-v1") + lp(component.encode()))
        h.update(len(files).to_bytes(8, "big"))
        for rel in sorted(files):  # ASCII names: str order is byte order
            h.update(lp(rel.encode()) + lp(hashlib.sha256(files[rel]).digest()))
        result = measure(component, source_root=tmp_path)
        assert result.value == h.digest()
        assert result.file_count == 3


def test_missing_required_package_refused(tmp_path: Path) -> None:
    with pytest.raises(PlatformError, match="'modelyo' not found under"):
        measure("agent", source_root=tmp_path)


def test_unknown_component_refused() -> None:
    with pytest.raises(ConfigError, match="choose one of agent, ca"):
        measure("gpu")


def test_symlink_cycle_refused(tree: Path) -> None:
    (tree / "modelyo" / "tee" / "loop").symlink_to(tree / "modelyo")
    with pytest.raises(PlatformError, match="cycle"):
        measure("agent", source_root=tree)


def test_cli_text() -> None:
    result = CliRunner().invoke(cli, ["measure", "ca"])
    assert result.exit_code == 0, result.output
    expected = measure("ca")
    lines = result.stdout.splitlines()
    assert lines[0] == f"MRENCLAVE {expected.hex}"
    assert f"{expected.file_count} files" in lines[1]
    assert "SIMULATED" in result.stdout


def test_cli_json_with_source_root(tree: Path) -> None:
    result = CliRunner().invoke(cli, ["measure", "agent", "--json", "--source-root", str(tree)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    expected = measure("agent", source_root=tree)
    assert data["register"] == "MRTD"
    assert data["tee"] == "tdx"
    assert data["value"] == expected.hex
    assert data["file_count"] == expected.file_count
    assert data["simulated"] is True


def test_cli_via_main(capsys: pytest.CaptureFixture[str], tree: Path) -> None:
    assert main(["measure", "agent", "--source-root", str(tree)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"MRTD {measure('agent', source_root=tree).hex}\n")
    assert main(["measure", "gpu"]) == 2


def test_cli_warns_when_optional_package_missing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(locate_packages("ca")["modelyo"], src / "modelyo")
    result = CliRunner().invoke(cli, ["measure", "ca", "--source-root", str(src)])
    assert result.exit_code == 0
    assert "ca_enclave not found" in result.stderr
