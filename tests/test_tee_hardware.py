"""Hardware quote providers against fakes of the kernel's and Gramine's file protocols.

configfs-tsm (drivers/virt/coco/guest/report.c) is emulated by `FakeTsm`: `mkdir` under its
root is intercepted to create an entry with the attributes the kernel creates (`provider`,
`generation` starting at 0, `inblob`, `outblob`). `inblob` and `outblob` are FIFOs served by
a thread per entry, so, as in the kernel, the written REPORTDATA is taken when the writer
closes `inblob` (bumping `generation`) and `outblob` is produced from it when it is read.
The quote is the real TDX v4 vector with the requested REPORTDATA spliced in (the provider
does not verify signatures, so only layout and content matter), or the untouched vector to
play a platform that hands back someone else's quote.

Gramine's /dev/attestation is emulated by `FakeGramine`: `attestation_type` and
`user_report_data` are plain files and `quote` is a FIFO whose content is produced, when
read, from what `user_report_data` holds at that moment.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from modelyo.errors import PlatformError
from modelyo.tee.sgx import GramineProvider
from modelyo.tee.tdx import ConfigfsTsmProvider
from tests.vectors import VECTORS

TDX_QUOTE = (VECTORS / "tdx_quote").read_bytes()  # v4, REPORTDATA at 568..632
SGX_QUOTE = (VECTORS / "sgx_quote").read_bytes()  # v3, REPORTDATA at 368..432
TDX_RD = slice(568, 632)
SGX_RD = slice(368, 432)

# Every byte value matters: 0x00 and 0x0a catch text-mode or newline handling.
REQUEST = bytes(range(64))
OTHER = bytes(range(64, 128))

_real_mkdir = os.mkdir
_real_rmdir = os.rmdir


def splice(quote: bytes, where: slice, report_data: bytes) -> bytes:
    """`quote` with its REPORTDATA replaced, as a platform would produce it for a request."""
    assert len(report_data) == 64
    return quote[: where.start] + report_data + quote[where.stop :]


def _poke(path: Path, flags: int) -> None:
    """Open and close the other end of a FIFO so a thread blocked in open() wakes up."""
    try:
        os.close(os.open(path, flags | os.O_NONBLOCK))
    except OSError:
        pass


class _Entry:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None


class FakeTsm:
    """The kernel side of /sys/kernel/config/tsm/report, for one tmp directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.provider = "tdx_guest"
        # outblob as a function of the inblob that was committed.
        self.outblob: Callable[[bytes], bytes] = lambda inblob: splice(TDX_QUOTE, TDX_RD, inblob)
        # Writes another process makes to inblob after ours and before outblob is read.
        self.intruder_writes: list[bytes] = []
        self.mkdir_error: OSError | None = None
        self.inblobs: list[bytes] = []
        self.created: list[Path] = []
        self.removed: list[Path] = []
        self._entries: dict[Path, _Entry] = {}

    def _ours(self, path: os.PathLike[str] | str) -> bool:
        return Path(path).parent == self.root

    def mkdir(self, path: os.PathLike[str] | str, mode: int = 0o777, **kw: object) -> None:
        if not self._ours(path):
            _real_mkdir(path, mode, **kw)  # type: ignore[arg-type]
            return
        if self.mkdir_error is not None:
            raise self.mkdir_error
        entry = Path(path)
        _real_mkdir(entry)
        (entry / "provider").write_text(f"{self.provider}\n")
        (entry / "generation").write_text("0\n")
        os.mkfifo(entry / "inblob", 0o200)
        os.mkfifo(entry / "outblob", 0o444)
        state = _Entry(entry)
        state.thread = threading.Thread(target=self._serve, args=(state,), daemon=True)
        self._entries[entry] = state
        self.created.append(entry)
        state.thread.start()

    def _serve(self, state: _Entry) -> None:
        entry = state.path
        try:
            # Binary configfs attributes take effect when the writer closes the file.
            with open(entry / "inblob", "rb") as f:  # blocks until the provider opens it
                inblob = f.read()
            if state.stop.is_set():
                return
            self.inblobs.append(inblob)
            generation = 1
            for other in self.intruder_writes:
                inblob = other
                generation += 1
            (entry / "generation").write_text(f"{generation}\n")
            # The kernel generates the report on the first read after a write.
            with open(entry / "outblob", "wb") as f:  # blocks until the provider reads
                if state.stop.is_set():
                    return
                f.write(self.outblob(inblob))
        except BrokenPipeError:
            pass

    def rmdir(self, path: os.PathLike[str] | str, **kw: object) -> None:
        if not self._ours(path):
            _real_rmdir(path, **kw)  # type: ignore[arg-type]
            return
        entry = Path(path)
        state = self._entries.pop(entry)
        state.stop.set()
        deadline = time.monotonic() + 10
        assert state.thread is not None
        while state.thread.is_alive() and time.monotonic() < deadline:
            _poke(entry / "inblob", os.O_WRONLY)
            _poke(entry / "outblob", os.O_RDONLY)
            state.thread.join(0.01)
        assert not state.thread.is_alive(), "fake kernel thread did not stop"
        for name in ("provider", "generation", "inblob", "outblob"):
            (entry / name).unlink()
        _real_rmdir(entry)
        self.removed.append(entry)

    def leftover(self) -> list[Path]:
        return sorted(self.root.iterdir())

    def close(self) -> None:
        for entry in list(self._entries):
            self.rmdir(entry)


@pytest.fixture
def tsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTsm]:
    root = tmp_path / "tsm" / "report"
    root.mkdir(parents=True)
    fake = FakeTsm(root)
    monkeypatch.setattr(os, "mkdir", fake.mkdir)
    monkeypatch.setattr(os, "rmdir", fake.rmdir)
    try:
        yield fake
    finally:
        fake.close()


def assert_cleaned(tsm: FakeTsm) -> None:
    assert tsm.leftover() == []
    assert tsm.created, "the provider never created an entry"
    assert sorted(tsm.removed) == sorted(tsm.created)


# ---- configfs-tsm (TDX) -------------------------------------------------------------------


def test_tdx_success_returns_quote_and_leaves_no_entry(tsm: FakeTsm) -> None:
    quote = ConfigfsTsmProvider(tsm.root).get_quote(REQUEST)
    assert quote == splice(TDX_QUOTE, TDX_RD, REQUEST)
    assert len(tsm.created) == 1
    assert_cleaned(tsm)


def test_tdx_report_data_reaches_inblob_byte_exact(tsm: FakeTsm) -> None:
    ConfigfsTsmProvider(tsm.root).get_quote(REQUEST)
    ConfigfsTsmProvider(tsm.root).get_quote(OTHER)
    assert tsm.inblobs == [REQUEST, OTHER]
    # One fresh entry per request.
    assert len(set(tsm.created)) == 2
    assert_cleaned(tsm)


def test_tdx_genuine_quote_accepted_when_its_report_data_was_requested(tsm: FakeTsm) -> None:
    tsm.outblob = lambda inblob: TDX_QUOTE  # the platform's fixed, real quote
    assert ConfigfsTsmProvider(tsm.root).get_quote(TDX_QUOTE[TDX_RD]) == TDX_QUOTE


def test_tdx_report_data_mismatch_refused(tsm: FakeTsm) -> None:
    tsm.outblob = lambda inblob: TDX_QUOTE  # someone else's quote
    with pytest.raises(PlatformError, match="REPORTDATA"):
        ConfigfsTsmProvider(tsm.root).get_quote(REQUEST)
    assert tsm.inblobs == [REQUEST]
    assert_cleaned(tsm)


def test_tdx_wrong_provider_refused(tsm: FakeTsm) -> None:
    tsm.provider = "sev_guest"
    with pytest.raises(PlatformError, match=r"'sev_guest'.*not 'tdx_guest'"):
        ConfigfsTsmProvider(tsm.root).get_quote(REQUEST)
    assert tsm.inblobs == []  # nothing was requested from the wrong platform
    assert_cleaned(tsm)


def test_tdx_generation_mismatch_refused(tsm: FakeTsm) -> None:
    # Another process writes the same bytes into our entry: only the generation reveals it.
    tsm.intruder_writes = [REQUEST]
    with pytest.raises(PlatformError, match="generation 2 instead of 1"):
        ConfigfsTsmProvider(tsm.root).get_quote(REQUEST)
    assert_cleaned(tsm)


def test_tdx_intruder_quote_refused(tsm: FakeTsm) -> None:
    tsm.intruder_writes = [OTHER]
    with pytest.raises(PlatformError, match="generation"):
        ConfigfsTsmProvider(tsm.root).get_quote(REQUEST)
    assert_cleaned(tsm)


def test_tdx_empty_outblob_refused(tsm: FakeTsm) -> None:
    tsm.outblob = lambda inblob: b""
    with pytest.raises(PlatformError, match=r"quote generation failed.*QGS"):
        ConfigfsTsmProvider(tsm.root).get_quote(REQUEST)
    assert_cleaned(tsm)


def test_tdx_sgx_quote_refused(tsm: FakeTsm) -> None:
    tsm.outblob = lambda inblob: splice(SGX_QUOTE, SGX_RD, inblob)
    with pytest.raises(PlatformError, match="SGX quote where a TDX quote"):
        ConfigfsTsmProvider(tsm.root).get_quote(REQUEST)
    assert_cleaned(tsm)


def test_tdx_garbage_outblob_refused(tsm: FakeTsm) -> None:
    tsm.outblob = lambda inblob: b"\x04\x00" + bytes(100)
    with pytest.raises(PlatformError, match="not a DCAP quote"):
        ConfigfsTsmProvider(tsm.root).get_quote(REQUEST)
    assert_cleaned(tsm)


def test_tdx_missing_root_refused_with_mount_hint(tmp_path: Path) -> None:
    root = tmp_path / "no" / "tsm" / "report"
    with pytest.raises(PlatformError) as info:
        ConfigfsTsmProvider(root).get_quote(REQUEST)
    message = str(info.value)
    assert f"configfs-tsm not found at {root}" in message
    assert "Linux >= 6.7" in message
    assert "mount -t configfs none /sys/kernel/config" in message
    assert not root.exists()


def test_tdx_permission_denied(tsm: FakeTsm) -> None:
    # Tests may run as root, so the kernel's EACCES for other users is played by the fake.
    tsm.mkdir_error = PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(PlatformError, match=r"permission denied.*run the agent as root"):
        ConfigfsTsmProvider(tsm.root).get_quote(REQUEST)
    assert tsm.leftover() == []


def test_tdx_no_provider_registered(tsm: FakeTsm) -> None:
    tsm.mkdir_error = OSError(errno.ENXIO, "No such device or address")
    with pytest.raises(PlatformError, match="modprobe tdx_guest"):
        ConfigfsTsmProvider(tsm.root).get_quote(REQUEST)


@pytest.mark.parametrize("bad", [b"", bytes(63), bytes(65), "x" * 64])
def test_tdx_wrong_report_data_length_refused(tsm: FakeTsm, bad: object) -> None:
    with pytest.raises(PlatformError, match="exactly 64 bytes"):
        ConfigfsTsmProvider(tsm.root).get_quote(bad)  # type: ignore[arg-type]
    assert tsm.created == []


def test_tdx_concurrent_requests_each_get_their_own_quote(tsm: FakeTsm) -> None:
    provider = ConfigfsTsmProvider(tsm.root)
    wanted = [bytes([i]) * 64 for i in range(8)]
    results: dict[int, bytes] = {}

    def run(i: int) -> None:
        results[i] = provider.get_quote(wanted[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(wanted))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert {i: q[TDX_RD] for i, q in results.items()} == dict(enumerate(wanted))
    assert_cleaned(tsm)


def test_tdx_detect(tsm: FakeTsm, tmp_path: Path) -> None:
    assert ConfigfsTsmProvider.detect(tsm.root)
    assert not ConfigfsTsmProvider.detect(tmp_path / "absent")


# ---- Gramine /dev/attestation (SGX) -------------------------------------------------------


class FakeGramine:
    """Gramine's /dev/attestation pseudo-files in a tmp directory."""

    def __init__(self, root: Path, attestation_type: str = "dcap") -> None:
        self.root = root
        root.mkdir()
        (root / "attestation_type").write_text(attestation_type)
        (root / "user_report_data").write_bytes(bytes(64))
        os.mkfifo(root / "quote", 0o444)
        self.quote_for: Callable[[bytes], bytes] = lambda rd: splice(SGX_QUOTE, SGX_RD, rd)
        self.served = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        # One quote read per test: Gramine makes the quote when `quote` is opened, from the
        # REPORTDATA written before.
        try:
            with open(self.root / "quote", "wb") as f:  # blocks until the provider reads
                if self._stop.is_set():
                    return
                f.write(self.quote_for((self.root / "user_report_data").read_bytes()))
                self.served += 1
        except BrokenPipeError:
            pass

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            _poke(self.root / "quote", os.O_RDONLY)
            self._thread.join(0.01)


@pytest.fixture
def gramine(tmp_path: Path) -> Iterator[FakeGramine]:
    fake = FakeGramine(tmp_path / "attestation")
    try:
        yield fake
    finally:
        fake.close()


def test_sgx_success(gramine: FakeGramine) -> None:
    quote = GramineProvider(gramine.root).get_quote(REQUEST)
    assert quote == splice(SGX_QUOTE, SGX_RD, REQUEST)
    assert (gramine.root / "user_report_data").read_bytes() == REQUEST
    assert gramine.served == 1


def test_sgx_genuine_quote_accepted_when_its_report_data_was_requested(
    gramine: FakeGramine,
) -> None:
    gramine.quote_for = lambda rd: SGX_QUOTE
    assert GramineProvider(gramine.root).get_quote(SGX_QUOTE[SGX_RD]) == SGX_QUOTE


def test_sgx_report_data_mismatch_refused(gramine: FakeGramine) -> None:
    gramine.quote_for = lambda rd: SGX_QUOTE  # REPORTDATA "Hello, world!": not ours
    with pytest.raises(PlatformError, match="REPORTDATA"):
        GramineProvider(gramine.root).get_quote(REQUEST)


def test_sgx_attestation_type_none_refused(tmp_path: Path) -> None:
    fake = FakeGramine(tmp_path / "attestation", attestation_type="none")
    try:
        with pytest.raises(PlatformError, match=r'manifest lacks sgx.remote_attestation = "dcap"'):
            GramineProvider(fake.root).get_quote(REQUEST)
        assert (fake.root / "user_report_data").read_bytes() == bytes(64)
        assert fake.served == 0
    finally:
        fake.close()


def test_sgx_attestation_type_epid_refused(tmp_path: Path) -> None:
    fake = FakeGramine(tmp_path / "attestation", attestation_type="epid")
    try:
        with pytest.raises(PlatformError, match="EPID"):
            GramineProvider(fake.root).get_quote(REQUEST)
    finally:
        fake.close()


def test_sgx_tdx_quote_refused(gramine: FakeGramine) -> None:
    gramine.quote_for = lambda rd: splice(TDX_QUOTE, TDX_RD, rd)
    with pytest.raises(PlatformError, match="TDX quote where a SGX quote"):
        GramineProvider(gramine.root).get_quote(REQUEST)


def test_sgx_empty_quote_refused(gramine: FakeGramine) -> None:
    gramine.quote_for = lambda rd: b""
    with pytest.raises(PlatformError, match="empty quote"):
        GramineProvider(gramine.root).get_quote(REQUEST)


def test_sgx_missing_dev_attestation_refused(tmp_path: Path) -> None:
    root = tmp_path / "dev" / "attestation"
    with pytest.raises(PlatformError, match=r"not found at .*gramine-sgx"):
        GramineProvider(root).get_quote(REQUEST)


@pytest.mark.parametrize("bad", [bytes(32), bytes(65)])
def test_sgx_wrong_report_data_length_refused(gramine: FakeGramine, bad: bytes) -> None:
    with pytest.raises(PlatformError, match="exactly 64 bytes"):
        GramineProvider(gramine.root).get_quote(bad)
    assert (gramine.root / "user_report_data").read_bytes() == bytes(64)


def test_sgx_detect(gramine: FakeGramine, tmp_path: Path) -> None:
    assert GramineProvider.detect(gramine.root)
    assert not GramineProvider.detect(tmp_path / "absent")
    (gramine.root / "attestation_type").write_text("none")
    assert not GramineProvider.detect(gramine.root)
