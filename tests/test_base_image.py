"""The job base image: its input hash (pure), and what the built image holds (Docker)."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import docker
import pytest
from rich.console import Console

import modelyo
from modelyo.cli.main import EXIT_ERROR, main
from modelyo.errors import EngineError
from modelyo.images import base

REPO = Path(__file__).resolve().parent.parent
VERSION = re.compile(r"^\d+\.\d+(\.\d+)?")

# Runs inside the image: what a job can count on, as JSON.
PROBE = """
import io, json, os, sys
import cryptography, pandas, pyarrow, modelyo
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

frame = pandas.DataFrame({"a": [1, 2, 3]})
buffer = io.BytesIO()
frame.to_parquet(buffer)
key, nonce = AESGCM.generate_key(bit_length=256), os.urandom(12)
sealed = AESGCM(key).encrypt(nonce, b"data", None)
print(json.dumps({
    "python": sys.version.split()[0],
    "executable": sys.executable,
    "pandas": pandas.__version__,
    "pyarrow": pyarrow.__version__,
    "cryptography": cryptography.__version__,
    "modelyo": modelyo.__version__,
    # A native buffer: Arrow can abort at exit after reading a Python file (arrow#50482).
    "parquet_rows": len(pandas.read_parquet(pyarrow.BufferReader(buffer.getvalue()))),
    "aead_roundtrip": AESGCM(key).decrypt(nonce, sealed, None) == b"data",
}))
"""


def _tree(root: Path) -> Path:
    (root / "modelyo" / "sub").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "modelyo"\ndependencies = ["rich"]\n')
    (root / "modelyo" / "__init__.py").write_text('__version__ = "0.1.0"\n')
    (root / "modelyo" / "sub" / "mod.py").write_text("X = 1\n")
    (root / "modelyo" / "images").mkdir()
    (root / "modelyo" / "images" / "Dockerfile.base").write_text("FROM scratch\n")
    return root


# --- the input hash, no Docker needed ----------------------------------------------------------


def test_source_digest_is_stable_for_the_same_tree(tmp_path: Path) -> None:
    root = _tree(tmp_path / "a")
    first = base.source_digest(root)
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    assert base.source_digest(root) == first
    # Only relative paths count: the same tree elsewhere hashes the same.
    assert base.source_digest(shutil.copytree(root, tmp_path / "b")) == first


@pytest.mark.parametrize(
    "change",
    [
        lambda r: (r / "modelyo" / "sub" / "mod.py").write_text("X = 2\n"),
        lambda r: (r / "modelyo" / "new.py").write_text(""),
        lambda r: (r / "modelyo" / "sub" / "mod.py").rename(r / "modelyo" / "sub" / "other.py"),
        lambda r: (r / "modelyo" / "images" / "Dockerfile.base").write_text("FROM debian\n"),
        lambda r: (r / "pyproject.toml").write_text('[project]\nname = "modelyo"\n'),
    ],
    ids=["edit", "add", "rename", "package-data", "pyproject"],
)
def test_source_digest_changes_when_the_source_changes(tmp_path: Path, change) -> None:
    root = _tree(tmp_path)
    before = base.source_digest(root)
    change(root)
    assert base.source_digest(root) != before


def test_source_digest_ignores_bytecode_and_files_outside_the_package(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    before = base.source_digest(root)
    (root / "modelyo" / "sub" / "__pycache__").mkdir()
    (root / "modelyo" / "sub" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
    (root / "modelyo" / "stray.pyc").write_bytes(b"\0")
    (root / "README.md").write_text("docs do not change the image\n")
    (root / "tests").mkdir()
    (root / "tests" / "test_x.py").write_text("")
    assert base.source_digest(root) == before


def test_inputs_digest_depends_on_every_input() -> None:
    wheels = ["b-1-py3-none-any.whl", "a-2-py3-none-any.whl"]
    digest = base.inputs_digest("s" * 64, wheels, "sha256:1")
    assert base.inputs_digest("s" * 64, list(reversed(wheels)), "sha256:1") == digest
    assert base.inputs_digest("t" * 64, wheels, "sha256:1") != digest
    assert base.inputs_digest("s" * 64, [*wheels, "c-1-py3-none-any.whl"], "sha256:1") != digest
    assert base.inputs_digest("s" * 64, wheels, "sha256:2") != digest


def test_requirements_are_the_job_libraries_and_modelyo_dependencies() -> None:
    reqs = base.requirements(REPO)
    assert reqs[:3] == ["pandas", "pyarrow", "cryptography"]
    assert any(r.startswith("dcap-qvl") for r in reqs)
    assert any(r.startswith("pydantic") for r in reqs)


@pytest.mark.parametrize(("machine", "arch"), [("x86_64", "x86_64"), ("arm64", "aarch64")])
def test_wheel_platforms_follow_the_engine_architecture(machine: str, arch: str) -> None:
    platforms = base.wheel_platforms(machine)
    assert platforms[0] == f"manylinux_2_36_{arch}"
    assert f"manylinux_2_17_{arch}" in platforms
    assert f"manylinux2014_{arch}" in platforms
    assert all(p.endswith(arch) for p in platforms)
    assert base.wheel_set_key(["pandas"], machine) != base.wheel_set_key(["pandas", "x"], machine)


def test_unknown_engine_architecture_is_refused() -> None:
    with pytest.raises(EngineError, match="s390x"):
        base.wheel_platforms("s390x")


def test_mmdebstrap_gets_its_sources_explicitly(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODELYO_DEBIAN_MIRROR", "http://mirror.example/debian/")
    cmd = base.mmdebstrap_command("aarch64", tmp_path / "out.tar")
    assert cmd[0] == "mmdebstrap"
    assert "--architectures=arm64" in cmd
    assert "--variant=essential" in cmd
    suite = cmd.index("bookworm")
    assert cmd[suite + 1] == str(tmp_path / "out.tar")
    # Without source lines mmdebstrap would read them from stdin, which CI closes.
    assert cmd[suite + 2 :] == [
        "deb http://mirror.example/debian bookworm main",
        "deb http://mirror.example/debian bookworm-updates main",
        "deb http://deb.debian.org/debian-security bookworm-security main",
    ]


def test_missing_mmdebstrap_says_how_to_install_it(monkeypatch, tmp_path: Path) -> None:
    class Images:
        def get(self, ref: str) -> None:
            raise docker.errors.ImageNotFound(ref)

    monkeypatch.setattr(base.shutil, "which", lambda name: None)
    monkeypatch.setenv("MODELYO_CACHE_DIR", str(tmp_path))
    steps = base._Steps(Console(file=io.StringIO()))
    with pytest.raises(EngineError, match="apt-get install mmdebstrap"):
        base.ensure_debian_base(SimpleNamespace(images=Images()), "x86_64", steps)


def test_cli_without_an_engine_exits_1_and_says_what_to_do(monkeypatch, capsys) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    assert main(["image", "build-base"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "no Docker engine answers at unix:///nonexistent/docker.sock" in err
    assert "docker info" in err


# --- the built image ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def job_image(docker_client: docker.DockerClient) -> docker.models.images.Image:
    try:
        return docker_client.images.get(base.DEFAULT_TAG)
    except docker.errors.ImageNotFound:
        pytest.fail(
            f"{base.DEFAULT_TAG} is missing: run `modelyo image build-base` (make test does)"
        )


@pytest.mark.docker
def test_job_image_runs_offline_with_the_job_libraries(docker_client, job_image) -> None:
    out = docker_client.containers.run(
        job_image.id, ["python", "-c", PROBE], network_disabled=True, remove=True
    )
    found = json.loads(out)
    assert found["modelyo"] == modelyo.__version__
    assert found["python"].startswith("3.11.")
    assert found["executable"] == "/opt/modelyo/bin/python"
    # The native parts load and work: Parquet through pyarrow, AES-GCM through OpenSSL.
    assert found["parquet_rows"] == 3
    assert found["aead_roundtrip"] is True
    for library in ("pandas", "pyarrow", "cryptography"):
        assert VERSION.match(found[library]), (library, found[library])
    labels = job_image.labels
    # The versions that run are the wheels the label lists.
    for library in ("pandas", "pyarrow", "cryptography"):
        assert f"{library}-{found[library]}-" in labels[base.LABEL_WHEELS]


@pytest.mark.docker
def test_job_image_label_is_the_hash_of_the_current_tree(docker_client, job_image) -> None:
    labels = job_image.labels
    source = base.source_digest(REPO)
    assert labels[base.LABEL_SOURCE] == source, (
        "the job image was built from another tree: run `modelyo image build-base`"
    )
    debian = docker_client.images.get(base.DEBIAN_TAG)
    assert labels[base.LABEL_BASE] == debian.id
    wheels = labels[base.LABEL_WHEELS].split(",")
    cached = base.cached_wheels(base.requirements(REPO), docker_client.info()["Architecture"])
    assert cached is not None and list(cached.names) == sorted(wheels)
    assert labels[base.LABEL_INPUTS] == base.inputs_digest(source, wheels, debian.id)
    assert labels[base.LABEL_VERSION] == modelyo.__version__


@pytest.mark.docker
def test_build_base_reuses_an_up_to_date_image(job_image) -> None:
    out = io.StringIO()
    result = base.build_base(console=Console(file=out))
    assert not result.built, out.getvalue()
    assert result.image_id == job_image.id
    assert "is up to date" in out.getvalue()


@pytest.mark.docker
@pytest.mark.slow
def test_failed_build_tags_nothing_and_shows_the_log(docker_client, job_image, monkeypatch):
    tag = "modelyo/test-failed-build:1"
    broken = "ARG BASE\nFROM ${BASE}\nRUN echo marker-before-failure && exit 3\n"
    monkeypatch.setattr(base, "dockerfile_text", lambda: broken)
    with pytest.raises(EngineError) as caught:
        base.build_base(tag, console=Console(file=io.StringIO()))
    assert "marker-before-failure" in str(caught.value)
    assert "docker build of the job image failed" in str(caught.value)
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(tag)
