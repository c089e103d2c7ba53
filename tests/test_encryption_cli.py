"""`modelyo encrypt` / `modelyo decrypt`: arguments, key sources, streams, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelyo.cli.crypt import EXIT_ERROR, EXIT_OK, EXIT_REFUSED, main

LEAN = [sys.executable, "-m", "modelyo.cli.crypt"]


@pytest.fixture
def key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "key"
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    monkeypatch.setenv("MODELYO_KEY_FILE", str(path))
    return path


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    root = tmp_path / "my_plain"
    (root / "sub" / "empty").mkdir(parents=True)
    (root / "a.csv").write_bytes(b"x,y\n1,2\n")
    (root / "sub" / "b.bin").write_bytes(os.urandom(3000))
    return root


def test_folder_round_trip_as_the_document_shows(
    plain: Path, tmp_path: Path, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    enc, dec = tmp_path / "my_encrypted", tmp_path / "my_plain2"
    assert main(["encrypt", f"{plain}/", f"{enc}/"]) == EXIT_OK
    assert "encrypted 2 files in 3 folders" in capsys.readouterr().err
    assert main(["decrypt", f"{enc}/", f"{dec}/", "--quiet"]) == EXIT_OK
    assert capsys.readouterr().err == ""
    assert (dec / "a.csv").read_bytes() == b"x,y\n1,2\n"
    assert (dec / "sub" / "b.bin").read_bytes() == (plain / "sub" / "b.bin").read_bytes()
    assert (dec / "sub" / "empty").is_dir()


def test_existing_destination_and_force(
    plain: Path, tmp_path: Path, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    enc = tmp_path / "enc"
    enc.mkdir()
    assert main(["encrypt", "-q", str(plain), str(enc)]) == EXIT_ERROR
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["encrypt", "-q", "--force", str(plain), str(enc)]) == EXIT_OK
    assert sorted(os.listdir(enc)) == ["a.csv", "sub"]


def test_tampering_exits_3_naming_the_file(
    plain: Path, tmp_path: Path, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    enc = tmp_path / "enc"
    assert main(["encrypt", "-q", str(plain), str(enc)]) == EXIT_OK
    victim = enc / "sub" / "b.bin"
    victim.write_bytes(victim.read_bytes()[:-1])
    assert main(["decrypt", "-q", str(enc), str(tmp_path / "dec")]) == EXIT_REFUSED
    err = capsys.readouterr().err
    assert err.startswith("refused: ") and "sub/b.bin" in err
    assert not (tmp_path / "dec").exists()


def test_wrong_key_exits_3(
    plain: Path, tmp_path: Path, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["encrypt", "-q", str(plain / "a.csv"), str(tmp_path / "a.enc")]) == EXIT_OK
    other = tmp_path / "other"
    other.write_text(os.urandom(32).hex() + "\n")  # the hex form
    other.chmod(0o600)
    code = main(
        ["decrypt", "-q", "--key-file", str(other), str(tmp_path / "a.enc"), str(tmp_path / "a")]
    )
    assert code == EXIT_REFUSED
    assert "does not match this file's key commitment" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_no_key_says_how_to_get_one(
    plain: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MODELYO_KEY_FILE", raising=False)
    assert main(["encrypt", str(plain), str(tmp_path / "enc")]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "--key-file" in err and "MODELYO_KEY_FILE" in err and "modelyo attest" in err
    assert not (tmp_path / "enc").exists()


@pytest.mark.parametrize(
    ("content", "mode", "reason"),
    [(os.urandom(32), 0o644, "chmod 600"), (b"short", 0o600, "exactly 32 raw bytes")],
)
def test_bad_key_files_are_refused(
    plain: Path,
    tmp_path: Path,
    content: bytes,
    mode: int,
    reason: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key = tmp_path / "k"
    key.write_bytes(content)
    key.chmod(mode)
    assert main(["encrypt", "--key-file", str(key), str(plain), str(tmp_path / "e")]) == EXIT_ERROR
    assert reason in capsys.readouterr().err


def test_key_id_travels_in_the_header(
    plain: Path, tmp_path: Path, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    enc = tmp_path / "a.enc"
    assert (
        main(["encrypt", "-q", "--key-id", "project-x", str(plain / "a.csv"), str(enc)]) == EXIT_OK
    )
    assert main(["decrypt", "-q", str(enc), str(tmp_path / "a")]) == EXIT_ERROR
    assert "no key for key id 'project-x'" in capsys.readouterr().err
    assert (
        main(["decrypt", "-q", "--key-id", "project-x", str(enc), str(tmp_path / "a")]) == EXIT_OK
    )
    assert main(["encrypt", "--key-id", "bad id", str(plain), str(tmp_path / "x")]) == 2
    assert "invalid key id 'bad id'" in capsys.readouterr().err


def test_skipped_entries_are_reported_even_when_quiet(
    plain: Path, tmp_path: Path, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (plain / "link").symlink_to("/etc/passwd")
    assert main(["encrypt", "-q", str(plain), str(tmp_path / "enc")]) == EXIT_OK
    assert "skipped" in capsys.readouterr().err
    assert not (tmp_path / "enc" / "link").exists()


def test_help_documents_exit_codes() -> None:
    out = subprocess.run([*LEAN, "decrypt", "--help"], capture_output=True, text=True, check=True)
    assert "Exit codes:" in out.stdout and "3  refused" in out.stdout


def test_commands_are_registered_in_modelyo() -> None:
    import click

    from modelyo.cli.main import cli

    with click.Context(cli) as ctx:
        assert {"encrypt", "decrypt"} <= set(cli.list_commands(ctx))
        assert cli.get_command(ctx, "encrypt").name == "encrypt"


def test_stdin_to_stdout_streaming(tmp_path: Path, key_file: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 5)
    enc = subprocess.run([*LEAN, "encrypt", "-", "-"], input=data, capture_output=True, check=True)
    assert enc.stdout[:8] == b"\x89MYENC\r\n"
    dec = subprocess.run(
        [*LEAN, "decrypt", "-", "-"], input=enc.stdout, capture_output=True, check=True
    )
    assert dec.stdout == data
    # stdin to a file, and a file to stdout
    subprocess.run([*LEAN, "encrypt", "-q", "-", str(tmp_path / "s.enc")], input=data, check=True)
    out = subprocess.run(
        [*LEAN, "decrypt", str(tmp_path / "s.enc"), "-"], capture_output=True, check=True
    )
    assert out.stdout == data
    # a tampered stream: exit 3, and the message says to discard what was written
    bad = bytearray(enc.stdout)
    bad[-3] ^= 1
    dec = subprocess.run([*LEAN, "decrypt", "-", "-"], input=bytes(bad), capture_output=True)
    assert dec.returncode == EXIT_REFUSED
    assert b"discard what was written to stdout" in dec.stderr
    assert len(dec.stdout) < len(data)


def test_exit_code_3_through_the_modelyo_entry_point(tmp_path: Path, key_file: Path) -> None:
    ct = subprocess.run(
        [*LEAN, "encrypt", "-", "-"], input=b"x" * 100, capture_output=True, check=True
    )
    (tmp_path / "f.enc").write_bytes(ct.stdout[:-1])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelyo.cli.main",
            "decrypt",
            str(tmp_path / "f.enc"),
            str(tmp_path / "f"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == EXIT_REFUSED, proc.stderr
    assert "f.enc" in proc.stderr


def test_progress_bar_takes_updates_from_threads() -> None:
    import threading

    from modelyo.cli.crypt import _Bar

    with _Bar("encrypting", total_bytes=4000, total_files=4) as bar:
        workers = [
            threading.Thread(target=lambda: [bar.advance(10) for _ in range(100)]) for _ in range(4)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        for _ in range(4):
            bar.file_done()
        task = bar._bar.tasks[0]
        assert task.completed == 4000
        assert task.fields["files"] == "4/4 files"
