"""The `modelyo+enc://` papermill I/O handler: encrypted notebooks in untrusted storage.

Unit tests hand the handler static keys; the last tests go through the real stack (the
workspace's CA releases the keys) and through papermill itself.
"""

from __future__ import annotations

import json
import os
import re
import stat
import threading

import nbformat
import pytest

from modelyo.cli.main import main
from modelyo.encryption import StaticKeySource, decrypt_bytes
from modelyo.errors import (
    EncryptionError,
    KeyUnavailableError,
    NotAttestedError,
    TamperError,
    WrongKeyError,
)
from modelyo_jupyter.papermill_io import PREFIX, EncryptedNotebookHandler, parse_url

KEY = bytes(range(32))
KEYS = StaticKeySource({"default": {1: KEY}, "team": {3: bytes(32)}})


def notebook(marker: str = "hello") -> str:
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(f"print({marker!r})"))
    return nbformat.writes(nb)


@pytest.fixture
def keys(tmp_path, monkeypatch):
    """Static keys in the handler, a scratch folder as the current directory."""
    monkeypatch.chdir(tmp_path)
    EncryptedNotebookHandler.use_keys(KEYS)
    yield KEYS
    EncryptedNotebookHandler.use_keys(None)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("modelyo+enc://out.ipynb", ("out.ipynb", None)),
        ("modelyo+enc://runs/out.ipynb", ("runs/out.ipynb", None)),
        ("modelyo+enc:///data/out.ipynb", ("/data/out.ipynb", None)),
        ("modelyo+enc://out.ipynb?key_id=team", ("out.ipynb", "team")),
    ],
)
def test_addresses_name_a_path_and_an_optional_key_id(url, expected):
    assert parse_url(url) == expected


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("out.ipynb", "is not a modelyo+enc://"),
        ("modelyo+enc://", "names no file"),
        ("modelyo+enc://out.ipynb?key=team", "unknown option key"),
        ("modelyo+enc://out.ipynb?key_id=a&key_id=b", "exactly once"),
        ("modelyo+enc://out.ipynb?key_id=", "exactly once"),
        ("modelyo+enc://out.ipynb?nonsense", "cannot parse"),
    ],
)
def test_bad_addresses_are_refused_with_what_to_write(url, complaint):
    with pytest.raises(ValueError, match=re.escape(complaint)):
        parse_url(url)


def test_papermill_finds_the_handler_by_its_prefix():
    from papermill.iorw import papermill_io

    assert papermill_io.get_handler(f"{PREFIX}out.ipynb") is EncryptedNotebookHandler
    assert papermill_io.get_handler("out.ipynb") is not EncryptedNotebookHandler


def test_a_written_notebook_is_ciphertext_and_reads_back(keys, tmp_path):
    text = notebook("secret-marker")
    EncryptedNotebookHandler.write(text, f"{PREFIX}out.ipynb")
    raw = (tmp_path / "out.ipynb").read_bytes()
    assert b"secret-marker" not in raw and b"cells" not in raw
    assert stat.S_IMODE((tmp_path / "out.ipynb").stat().st_mode) == 0o600
    # An ordinary Modelyo encrypted file: the library (and `modelyo decrypt`) opens it too.
    assert decrypt_bytes(raw, keys).decode() == text
    assert EncryptedNotebookHandler.read(f"{PREFIX}out.ipynb") == text
    assert EncryptedNotebookHandler.read(f"{PREFIX}{tmp_path}/out.ipynb") == text


def test_the_key_id_in_the_address_is_used_and_checked_on_read(keys, tmp_path):
    text = notebook()
    EncryptedNotebookHandler.write(text, f"{PREFIX}out.ipynb?key_id=team")
    raw = (tmp_path / "out.ipynb").read_bytes()
    with pytest.raises(WrongKeyError):  # not under "default"
        decrypt_bytes(raw, StaticKeySource({"team": {3: KEY}}))
    assert EncryptedNotebookHandler.read(f"{PREFIX}out.ipynb?key_id=team") == text
    with pytest.raises(EncryptionError, match="under key id 'team', not 'default'"):
        EncryptedNotebookHandler.read(f"{PREFIX}out.ipynb?key_id=default")


def test_an_unknown_key_id_writes_nothing(keys, tmp_path):
    with pytest.raises(KeyUnavailableError, match="'other'"):
        EncryptedNotebookHandler.write(notebook(), f"{PREFIX}out.ipynb?key_id=other")
    with pytest.raises(ValueError, match="invalid key id"):
        EncryptedNotebookHandler.write(notebook(), f"{PREFIX}out.ipynb?key_id=../x")
    assert list(tmp_path.iterdir()) == []


def test_rewrites_replace_the_whole_file_and_leave_no_temporaries(keys, tmp_path):
    for i in range(5):
        EncryptedNotebookHandler.write(notebook(f"version {i}"), f"{PREFIX}out.ipynb")
    assert [p.name for p in tmp_path.iterdir()] == ["out.ipynb"]
    assert "version 4" in EncryptedNotebookHandler.read(f"{PREFIX}out.ipynb")


def test_a_reader_never_sees_a_partial_notebook_while_papermill_rewrites_it(keys, tmp_path):
    # papermill saves the output after every cell; someone may read it meanwhile (or crash).
    big = "x" * 300_000  # several segments, so a torn write would show
    EncryptedNotebookHandler.write(notebook(f"0 {big}"), f"{PREFIX}out.ipynb")
    stop = threading.Event()
    seen: list[int] = []
    failures: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                cells = json.loads(EncryptedNotebookHandler.read(f"{PREFIX}out.ipynb"))["cells"]
                seen.append(int("".join(cells[0]["source"]).split()[0][7:]))
            except BaseException as exc:  # any torn read fails the test
                failures.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(1, 40):
            EncryptedNotebookHandler.write(notebook(f"{i} {big}"), f"{PREFIX}out.ipynb")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[0]
    assert seen, "the readers never ran"
    assert f"39 {big}" in EncryptedNotebookHandler.read(f"{PREFIX}out.ipynb")


def test_tampering_wrong_keys_and_plaintext_are_refused(keys, tmp_path):
    EncryptedNotebookHandler.write(notebook(), f"{PREFIX}out.ipynb")
    path = tmp_path / "out.ipynb"
    data = bytearray(path.read_bytes())
    data[-5] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(TamperError, match="failed authentication"):
        EncryptedNotebookHandler.read(f"{PREFIX}out.ipynb")

    EncryptedNotebookHandler.write(notebook(), f"{PREFIX}out.ipynb")
    EncryptedNotebookHandler.use_keys(StaticKeySource({"default": {1: bytes(32)}}))
    with pytest.raises(WrongKeyError):
        EncryptedNotebookHandler.read(f"{PREFIX}out.ipynb")

    (tmp_path / "plain.ipynb").write_text(notebook())
    with pytest.raises(TamperError):
        EncryptedNotebookHandler.read(f"{PREFIX}plain.ipynb")
    with pytest.raises(EncryptionError, match=r"cannot read missing\.ipynb"):
        EncryptedNotebookHandler.read(f"{PREFIX}missing.ipynb")


def test_a_missing_folder_is_reported(keys):
    with pytest.raises(EncryptionError, match="create it first"):
        EncryptedNotebookHandler.write(notebook(), f"{PREFIX}nowhere/out.ipynb")


def test_listdir_answers_in_addresses(keys, tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "a.ipynb").write_bytes(b"")
    (tmp_path / "runs" / "b.txt").write_bytes(b"")
    assert EncryptedNotebookHandler.listdir(f"{PREFIX}runs?key_id=team") == [
        f"{PREFIX}runs/a.ipynb?key_id=team",
        f"{PREFIX}runs/b.txt?key_id=team",
    ]
    assert EncryptedNotebookHandler.pretty_path(f"{PREFIX}x.ipynb") == f"{PREFIX}x.ipynb"


@pytest.mark.slow
def test_papermill_executes_into_an_encrypted_output(keys, tmp_path):
    """papermill itself (a local python3 kernel), with its repeated saves, into ciphertext."""
    import papermill

    nb = nbformat.v4.new_notebook()
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells.append(nbformat.v4.new_code_cell("n = 1", metadata={"tags": ["parameters"]}))
    nb.cells.append(nbformat.v4.new_code_cell("print('result', n * 6)"))
    nbformat.write(nb, tmp_path / "in.ipynb")
    papermill.execute_notebook(
        "in.ipynb",
        f"{PREFIX}out.ipynb",
        parameters={"n": 7},
        kernel_name="python3",
        progress_bar=False,
    )
    assert b"result" not in (tmp_path / "out.ipynb").read_bytes()
    out = nbformat.reads(EncryptedNotebookHandler.read(f"{PREFIX}out.ipynb"), as_version=4)
    assert out.metadata.papermill.parameters == {"n": 7}
    assert out.cells[-1].outputs[0]["text"] == "result 42\n"


def test_without_an_attested_workspace_keys_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NotAttestedError, match="`modelyo attest` in a shell, there first"):
        EncryptedNotebookHandler.write(notebook(), f"{PREFIX}out.ipynb")
    assert list(tmp_path.iterdir()) == []


def test_keys_come_from_the_workspaces_ca(stack, tmp_path, monkeypatch, capsys):
    """The real stack: `modelyo attest` here, then the CA releases the notebook's key."""
    home = tmp_path / "project"
    home.mkdir()
    monkeypatch.chdir(home)
    assert main(["attest"]) == 0
    EncryptedNotebookHandler.write(notebook("via the CA"), f"{PREFIX}out.ipynb")
    assert b"via the CA" not in (home / "out.ipynb").read_bytes()
    assert "via the CA" in EncryptedNotebookHandler.read(f"{PREFIX}out.ipynb")
    # The same file through the command line a user would reach for.
    assert main(["decrypt", "--quiet", "out.ipynb", "plain.ipynb"]) == 0
    assert (
        nbformat.read(home / "plain.ipynb", as_version=4).cells[0].source == "print('via the CA')"
    )
    os.remove(home / "plain.ipynb")
