"""Files and trees on disk: mirroring, refusals, atomicity, crashes, --force."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelyo.encryption import (
    StaticKeySource,
    check_relative_path,
    decrypt_file,
    decrypt_tree,
    encrypt_file,
    encrypt_tree,
)
from modelyo.encryption.files import UnnamedFile, temp_name
from modelyo.errors import EncryptionError, TamperError

KEY = bytes(range(32))
KEYS = StaticKeySource.single(KEY)


def _make_tree(root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "empty" / "deeper").mkdir(parents=True)
    (root / "top.txt").write_bytes(b"top")
    (root / "a" / "data.bin").write_bytes(os.urandom(70_000))
    (root / "a" / "b" / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "a" / "b" / "run.sh").chmod(0o750)
    (root / "a" / "secret").write_bytes(b"s")
    (root / "a" / "secret").chmod(0o600)
    (root / "zero").write_bytes(b"")
    (root / "sp ace é").write_bytes(b"unicode")
    (root / os.fsdecode(b"raw\xff")).write_bytes(b"not utf-8")
    ro = root / "readonly"
    ro.mkdir()
    (ro / "inside").write_bytes(b"in a read-only folder")
    ro.chmod(0o555)
    (root / "a").chmod(0o750)


def _snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Relative path -> (mode, content or None for folders), without following links."""
    out: dict[str, tuple[int, bytes | None]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = Path(dirpath, d)
            out[str(p.relative_to(root))] = (p.lstat().st_mode & 0o777, None)
        for f in filenames:
            p = Path(dirpath, f)
            if p.is_symlink() or not p.is_file():
                continue
            out[str(p.relative_to(root))] = (p.lstat().st_mode & 0o777, p.read_bytes())
    return out


def _entries(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "plain"
    src.mkdir()
    src.chmod(0o751)
    _make_tree(src)
    yield src
    for p in tmp_path.rglob("*"):  # let pytest remove read-only folders
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)


def test_tree_round_trip_mirrors_paths_empty_folders_and_modes(tree: Path, tmp_path: Path) -> None:
    enc, dec = tmp_path / "enc", tmp_path / "dec"
    result = encrypt_tree(tree, enc, KEYS)
    assert (result.files, result.folders) == (8, 5)
    before = _snapshot(tree)
    encrypted = _snapshot(enc)
    assert {k: v[0] for k, v in encrypted.items()} == {k: v[0] for k, v in before.items()}
    assert all(encrypted[k][1] != v[1] for k, v in before.items() if v[1] is not None)
    assert enc.stat().st_mode & 0o777 == 0o751
    decrypt_tree(enc, dec, KEYS)
    assert _snapshot(dec) == before
    assert dec.stat().st_mode & 0o777 == 0o751
    assert _entries(tmp_path) == ["dec", "enc", "plain"]  # no staging folder left


def test_symlinks_and_special_files_are_skipped_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "private").write_bytes(b"must not be encrypted into the tree")
    src = tmp_path / "src"
    src.mkdir()
    (src / "real").write_bytes(b"real")
    (src / "to-file").symlink_to(outside / "private")
    (src / "to-dir").symlink_to(outside)
    (src / "dangling").symlink_to(tmp_path / "nowhere")
    os.mkfifo(src / "fifo")
    skipped: list[tuple[str, str]] = []
    result = encrypt_tree(src, tmp_path / "enc", KEYS, on_skip=lambda p, r: skipped.append((p, r)))
    assert sorted(p for p, _ in skipped) == ["dangling", "fifo", "to-dir", "to-file"]
    assert all("not followed" in r for p, r in skipped if p != "fifo")
    assert sorted(result.skipped) == sorted(skipped)
    assert _entries(tmp_path / "enc") == ["real"]


def test_relative_path_check_refuses_escapes() -> None:
    assert check_relative_path("a/b c/d.csv") == ("a", "b c", "d.csv")
    for bad in ["/etc/passwd", "../up", "a/../../b", "a//b", "./a", "a/", "", "a\x00b", "x" * 5000]:
        with pytest.raises(EncryptionError, match="refused path"):
            check_relative_path(bad)


def test_destination_inside_source_is_refused(tree: Path) -> None:
    with pytest.raises(EncryptionError, match="overlap"):
        encrypt_tree(tree, tree / "enc", KEYS)
    with pytest.raises(EncryptionError, match="overlap"):
        encrypt_tree(tree / "a", tree, KEYS, force=True)


def test_existing_destination_needs_force(tree: Path, tmp_path: Path) -> None:
    dst = tmp_path / "enc"
    dst.mkdir()
    (dst / "old").write_bytes(b"old")
    with pytest.raises(EncryptionError, match="already exists; pass --force"):
        encrypt_tree(tree, dst, KEYS)
    assert _entries(dst) == ["old"]
    # --force replaces it atomically, even when it holds read-only folders.
    (dst / "ro").mkdir()
    (dst / "ro" / "f").write_bytes(b"x")
    (dst / "ro").chmod(0o500)
    encrypt_tree(tree, dst, KEYS, force=True)
    assert "old" not in _entries(dst)
    decrypt_tree(dst, tmp_path / "dec", KEYS)
    assert _snapshot(tmp_path / "dec") == _snapshot(tree)
    assert _entries(tmp_path) == ["dec", "enc", "plain"]


def test_force_never_follows_links_in_what_it_replaces(tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    (outside / "keep" / "data").write_bytes(b"not yours to delete")
    outside.chmod(0o751)
    dst = tmp_path / "enc"
    (dst / "ro").mkdir(parents=True)
    (dst / "ro" / "link").symlink_to(outside)
    (dst / "ro").chmod(0o500)
    encrypt_tree(tree, dst, KEYS, force=True)
    assert (outside / "keep" / "data").read_bytes() == b"not yours to delete"
    assert outside.stat().st_mode & 0o777 == 0o751
    assert not (dst / "ro").exists()


def test_force_replaces_a_file_with_a_file(tmp_path: Path) -> None:
    (tmp_path / "p").write_bytes(b"new plaintext")
    (tmp_path / "e").write_bytes(b"old contents")
    with pytest.raises(EncryptionError, match="already exists"):
        encrypt_file(tmp_path / "p", tmp_path / "e", KEYS)
    assert (tmp_path / "e").read_bytes() == b"old contents"
    encrypt_file(tmp_path / "p", tmp_path / "e", KEYS, force=True)
    decrypt_file(tmp_path / "e", tmp_path / "d", KEYS)
    assert (tmp_path / "d").read_bytes() == b"new plaintext"
    assert _entries(tmp_path) == ["d", "e", "p"]


def test_writing_over_the_source_is_refused(tmp_path: Path) -> None:
    (tmp_path / "p").write_bytes(b"x")
    with pytest.raises(EncryptionError, match="source itself"):
        encrypt_file(tmp_path / "p", tmp_path / "p", KEYS, force=True)
    assert (tmp_path / "p").read_bytes() == b"x"


def test_a_fifo_or_folder_is_not_a_file(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(EncryptionError, match="not a regular file"):
        encrypt_file(tmp_path / "fifo", tmp_path / "e", KEYS)
    with pytest.raises(EncryptionError, match="is a folder"):
        encrypt_file(tmp_path, tmp_path / "e", KEYS)


def test_one_tampered_file_fails_the_whole_tree(tree: Path, tmp_path: Path) -> None:
    enc = tmp_path / "enc"
    encrypt_tree(tree, enc, KEYS)
    target = enc / "a" / "data.bin"
    target.chmod(0o600)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x04
    target.write_bytes(bytes(data))
    with pytest.raises(TamperError, match=r"a/data\.bin: .*failed authentication"):
        decrypt_tree(enc, tmp_path / "dec", KEYS)
    assert _entries(tmp_path) == ["enc", "plain"]  # no destination, no staging, no plaintext


def test_files_moved_or_swapped_in_storage_are_refused(tree: Path, tmp_path: Path) -> None:
    enc = tmp_path / "enc"
    encrypt_tree(tree, enc, KEYS)
    a, b = enc / "top.txt", enc / "zero"
    tmp = enc / "swap"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    with pytest.raises(TamperError, match=r"encrypted as 'zero'.*moved or swapped"):
        decrypt_tree(enc, tmp_path / "dec", KEYS)
    assert not (tmp_path / "dec").exists()
    # On its own the file still decrypts: the binding is only checked within trees.
    decrypt_file(enc / "top.txt", tmp_path / "alone", KEYS)
    assert (tmp_path / "alone").read_bytes() == b""


def test_a_singly_encrypted_file_can_join_a_tree(tree: Path, tmp_path: Path) -> None:
    enc = tmp_path / "enc"
    encrypt_tree(tree, enc, KEYS)
    (tmp_path / "new").write_bytes(b"result from a container")
    encrypt_file(tmp_path / "new", enc / "result.myo", KEYS)
    decrypt_tree(enc, tmp_path / "dec", KEYS)
    assert (tmp_path / "dec" / "result.myo").read_bytes() == b"result from a container"


def test_a_file_under_another_key_fails_cleanly(tree: Path, tmp_path: Path) -> None:
    enc = tmp_path / "enc"
    encrypt_tree(tree, enc, KEYS)
    other = StaticKeySource({"other": {1: os.urandom(32)}})
    (tmp_path / "x").write_bytes(b"x")
    encrypt_file(tmp_path / "x", enc / "x.myo", other, "other")
    with pytest.raises(EncryptionError, match=r"x\.myo: .*no key for key id 'other'"):
        decrypt_tree(enc, tmp_path / "dec", KEYS)
    assert not (tmp_path / "dec").exists()


def test_interrupt_mid_tree_cleans_up(tree: Path, tmp_path: Path) -> None:
    class Boom:
        def __init__(self) -> None:
            self.files = 0

        def advance(self, nbytes: int) -> None:
            pass

        def file_done(self) -> None:
            self.files += 1
            if self.files == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        encrypt_tree(tree, tmp_path / "enc", KEYS, progress=Boom())
    assert _entries(tmp_path) == ["plain"]


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_dir = tmp_path / f".out.modelyo-staging-{dead.pid}-0123abcd"
    (stale_dir / "sub").mkdir(parents=True)
    (stale_dir / "sub" / "plain").write_bytes(b"left by a killed run")
    (stale_dir / "sub").chmod(0o500)
    stale_file = tmp_path / f".out.modelyo-tmp-{dead.pid}-89abcdef"
    stale_file.write_bytes(b"partial")
    live = tmp_path / f".out.modelyo-staging-{os.getpid()}-00000000"
    live.mkdir()  # a run still in progress: left alone
    unrelated = tmp_path / ".other.modelyo-tmp-1-00000000"
    unrelated.write_bytes(b"not ours to clean")
    (tmp_path / "p").write_bytes(b"p")
    encrypt_file(tmp_path / "p", tmp_path / "out", KEYS)
    assert _entries(tmp_path) == sorted(["out", "p", live.name, unrelated.name])


def test_without_o_tmpfile_a_hidden_temporary_stands_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(UnnamedFile, "_tmpfile_ok", False)
    (tmp_path / "p").write_bytes(os.urandom(5000))
    encrypt_file(tmp_path / "p", tmp_path / "e", KEYS, segment_size=1024)
    decrypt_file(tmp_path / "e", tmp_path / "d", KEYS)
    assert (tmp_path / "d").read_bytes() == (tmp_path / "p").read_bytes()
    data = bytearray((tmp_path / "e").read_bytes())
    data[-1] ^= 1
    (tmp_path / "e").write_bytes(bytes(data))
    with pytest.raises(TamperError):
        decrypt_file(tmp_path / "e", tmp_path / "d2", KEYS)
    assert _entries(tmp_path) == ["d", "e", "p"]


def test_temp_names_stay_short() -> None:
    assert len(os.fsencode(temp_name("x" * 255, "staging"))) < 255


_KILL_SCRIPT = """
import os, sys, time
from modelyo.encryption import StaticKeySource, decrypt_file, decrypt_tree

class Stall:
    # Signal the test once some plaintext was written, then hang until killed.
    def __init__(self):
        self.total = 0
    def advance(self, n):
        self.total += n
        if self.total > int(sys.argv[4]):
            print("stalled", flush=True)
            time.sleep(60)
    def file_done(self):
        pass

keys = StaticKeySource.single(bytes(range(32)))
fn = decrypt_tree if sys.argv[1] == "tree" else decrypt_file
fn(sys.argv[2], sys.argv[3], keys, progress=Stall(), threads=1)
"""


@pytest.mark.parametrize("kind", ["tree", "file"])
def test_sigkill_mid_run_leaves_no_destination_or_partial_plaintext(
    tmp_path: Path, kind: str
) -> None:
    src = tmp_path / "plain"
    src.mkdir()
    (src / "a-small").write_bytes(b"first file, complete before the kill")
    (src / "b-big").write_bytes(os.urandom(6 << 20))
    enc = tmp_path / "enc"
    encrypt_tree(src, enc, KEYS)
    source = enc if kind == "tree" else enc / "b-big"
    dst = tmp_path / "dst"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, kind, str(source), str(dst), str(3 << 20)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "stalled"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not dst.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".dst.modelyo-")]
    if kind == "file":
        assert leftovers == []  # the plaintext was an O_TMPFILE inode: gone with the process
    else:
        # A staging folder (mode 0700) may remain; it holds only whole, authenticated files.
        for staging in leftovers:
            assert staging.stat().st_mode & 0o777 == 0o700
            for f in staging.rglob("*"):
                assert f.is_file() and f.read_bytes() == (src / f.name).read_bytes()
    # The next run cleans it up and completes.
    start = time.monotonic()
    (decrypt_tree if kind == "tree" else decrypt_file)(source, dst, KEYS)
    assert time.monotonic() - start < 10
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dst.modelyo-")]
    if kind == "tree":
        assert _snapshot(dst) == _snapshot(src)
    else:
        assert dst.read_bytes() == (src / "b-big").read_bytes()


def test_threads_share_a_folder_when_files_are_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelyo.encryption import tree as tree_mod

    # Pretend files are slow to create so the second half of each folder goes to threads.
    monkeypatch.setattr(tree_mod, "_SLOW_FILE", 0.0)
    monkeypatch.setattr(tree_mod, "_PROBE_FILES", 4)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(120):
        (src / f"f{i:03d}").write_bytes(os.urandom(i * 37))
        (src / "sub" / f"g{i:03d}").write_bytes(os.urandom(i))
    (src / "big").write_bytes(os.urandom(3 << 20))
    enc, dec = tmp_path / "enc", tmp_path / "dec"
    assert encrypt_tree(src, enc, KEYS, threads=2, fsync=False).files == 241
    decrypt_tree(enc, dec, KEYS, threads=2)
    assert _snapshot(dec) == _snapshot(src)
    data = bytearray((enc / "sub" / "g100").read_bytes())
    data[-1] ^= 1
    (enc / "sub" / "g100").write_bytes(bytes(data))
    with pytest.raises(TamperError, match="g100"):
        decrypt_tree(enc, tmp_path / "dec2", KEYS, threads=2)
    assert _entries(tmp_path) == ["dec", "enc", "src"]
