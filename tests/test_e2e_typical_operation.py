"""The product document's typical operation, end to end, with the real tool, a real CA and agent
on loopback (SIMULATED platform) and this machine's real Docker engine:

encrypt a folder locally; build and save an image whose program takes an encrypted file from
untrusted storage, decrypts it through /modelyo/dec_in → dec_out, processes it, encrypts the
result through /modelyo/enc_in → enc_out and stores it back; load, create, run, wait, stop and
delete through the tool; decrypt the result locally and check it.
"""

from __future__ import annotations

import contextlib
import shutil

import docker
import pytest

from modelyo.cli.main import EXIT_REFUSED, main
from modelyo.demo import build_job_image

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture
def job_image(docker_client, tmp_path):
    """The demo's job image, built and saved here; only the tarball is left locally."""
    tag = "modelyo-e2e-job:1"
    tarball = build_job_image(docker_client, tag, tmp_path)
    yield tag, tarball
    with contextlib.suppress(docker.errors.ImageNotFound):  # never loaded, or deleted
        docker_client.images.remove(tag, force=True)


def test_the_documents_typical_operation(stack, job_image, tmp_path, monkeypatch, capsys):
    tag, tarball = job_image
    home = tmp_path / "project"
    home.mkdir()
    monkeypatch.chdir(home)

    # Attestation, both steps, found without flags after `modelyo dev up`.
    assert main(["attest"]) == 0
    out = capsys.readouterr().out
    assert "CA attested" in out and "TDX VM attested" in out and "SIMULATED" in out
    assert "GPU 0" in out
    for name in (
        "ca.pem",
        "ca_client.pem",
        "ca_client.key",
        "tdx_ca.pem",
        "tdx_client.pem",
        "tdx_client.key",
    ):
        assert (home / name).is_file(), name

    # 1. Encrypt a folder locally, and put it in untrusted storage.
    (home / "my_plain").mkdir()
    (home / "my_plain" / "numbers.csv").write_text("1\n2\n3\n4\n")
    assert main(["encrypt", "--quiet", "my_plain/", "my_encrypted/"]) == 0
    storage = tmp_path / "untrusted-storage"
    (storage / "in").mkdir(parents=True)
    shutil.copy(home / "my_encrypted" / "numbers.csv", storage / "in" / "numbers.csv")
    assert b"1\n2\n3" not in (storage / "in" / "numbers.csv").read_bytes()

    # 2. Load, create, copy the encrypted input in, run, wait.
    assert main(["docker", "load", "--quiet", "-f", str(tarball)]) == 0
    assert tag in capsys.readouterr().out
    assert main(["docker", "create", "-i", tag, "-n", "my_container"]) == 0
    try:
        assert (
            main(["docker", "cp", str(storage / "in" / "numbers.csv"), "my_container:/data/in/"])
            == 0
        )
        assert main(["docker", "run", "my_container"]) == 0
        assert main(["docker", "wait", "--timeout", "120", "my_container"]) == 0
        capsys.readouterr()
        assert main(["docker", "logs", "my_container"]) == 0
        assert "job done" in capsys.readouterr().out

        # 3. The encrypted result goes back to untrusted storage.
        (storage / "out").mkdir()
        assert (
            main(
                ["docker", "cp", "my_container:/data/out/sum.txt", str(storage / "out" / "sum.txt")]
            )
            == 0
        )
        assert b"sum=" not in (storage / "out" / "sum.txt").read_bytes()
        assert main(["docker", "stop", "my_container"]) == 0
    finally:
        assert main(["docker", "delete", "my_container"]) == 0
    capsys.readouterr()
    assert main(["docker", "ps"]) == 0
    assert "my_container" not in capsys.readouterr().out

    # 4. Decrypt the result locally and check it.
    assert main(["decrypt", "--quiet", str(storage / "out"), "my_result/"]) == 0
    assert (home / "my_result" / "sum.txt").read_text() == "sum=10 count=4\n"


def test_docker_commands_are_refused_without_the_owner_certificate(
    stack, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    assert main(["docker", "ps"]) == 1
    assert "`modelyo attest` in a shell, there first" in capsys.readouterr().err


def test_a_foreign_client_certificate_is_refused(stack, tmp_path, monkeypatch, capsys):
    owner = tmp_path / "owner"
    owner.mkdir()
    monkeypatch.chdir(owner)
    assert main(["attest"]) == 0
    # Another party's directory: the same CA files, but a client certificate of its own making.
    from modelyo import pki

    other = tmp_path / "other"
    shutil.copytree(owner, other)
    root_key, root = pki.create_root("not the Modelyo CA")
    key = pki.new_key()
    cert = pki.issue(
        key.public_key(),
        issuer_key=root_key,
        issuer_cert=root,
        role=pki.Role.VM_OWNER,
        common_name="intruder",
    )
    pki.write_cert(other / "tdx_client.pem", cert, root)
    pki.write_private_key(other / "tdx_client.key", key)
    monkeypatch.chdir(other)
    capsys.readouterr()
    assert main(["docker", "ps"]) == 1
    assert "rejected our client certificate" in capsys.readouterr().err


def test_truncated_image_upload_leaves_nothing_loaded(
    stack, job_image, tmp_path, monkeypatch, capsys, docker_client
):
    tag, tarball = job_image
    monkeypatch.chdir(tmp_path)
    assert main(["attest"]) == 0
    truncated = tmp_path / "truncated.tar"
    data = tarball.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main(["docker", "load", "--quiet", "-f", str(truncated)]) == 1
    err = capsys.readouterr().err
    assert "refused" in err.lower() or "truncated" in err.lower(), err
    assert main(["docker", "images"]) == 0
    assert tag not in capsys.readouterr().out
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(tag)


def test_tampered_gpu_measurement_is_refused(tmp_path, monkeypatch, capsys):
    """An agent whose simulated GPU reports a measurement off its reference."""
    from modelyo import dev

    directory = tmp_path / "dev"
    monkeypatch.setenv("MODELYO_DEV_DIR", str(directory))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    dev.up(directory, ca_port=0, agent_port=0, tampered_gpus=(0,))
    try:
        home = tmp_path / "project"
        home.mkdir()
        monkeypatch.chdir(home)
        assert main(["attest"]) == EXIT_REFUSED
        err = capsys.readouterr().err
        assert "GPU 0" in err and "measurement" in err
        assert not (home / "tdx_client.key").exists()
    finally:
        dev.down(directory)
