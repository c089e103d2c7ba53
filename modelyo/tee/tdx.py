"""TDX quotes through the Linux configfs-tsm report interface (Linux >= 6.7).

The protocol is the kernel's (Documentation/ABI/testing/configfs-tsm-report):

1. ``mkdir $root/$name``: the kernel creates a report entry and populates its attribute
   files (``provider``, ``generation``, ``inblob``, ``outblob``, ...).
2. Write up to 64 bytes to ``inblob`` (for ``tdx_guest`` exactly 64: they become REPORTDATA).
   Binary configfs attributes are committed when the file is closed.
3. Read ``outblob``: the kernel asks the host's Quote Generation Service (QGS) for a quote.
4. ``generation`` counts writes to the entry; reading it after ``outblob`` and finding the
   count we expect proves nobody else wrote ``inblob`` in between.
5. ``rmdir`` the entry.

We create one fresh entry per request, so concurrent callers never share one; the generation
check additionally catches another process writing into our entry. The returned quote is
parsed and refused unless it is a TDX quote carrying exactly the REPORTDATA we asked for.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
from pathlib import Path

from modelyo.errors import PlatformError
from modelyo.tee.provider import QuoteProvider, Tee, check_quote_binding, check_report_data

log = logging.getLogger(__name__)

DEFAULT_TSM_REPORT_ROOT = Path("/sys/kernel/config/tsm/report")
TDX_PROVIDER_NAME = "tdx_guest"

_MOUNT_HINT = (
    "run inside a TDX guest with Linux >= 6.7 and configfs mounted "
    "(mount -t configfs none /sys/kernel/config)"
)


class ConfigfsTsmProvider(QuoteProvider):
    """TDX quotes from ``/sys/kernel/config/tsm/report`` (the kernel's ``tdx_guest`` provider)."""

    tee = Tee.TDX

    def __init__(self, root: Path = DEFAULT_TSM_REPORT_ROOT) -> None:
        self.root = Path(root)

    @property
    def name(self) -> str:
        return "tdx (configfs-tsm)"

    @classmethod
    def detect(cls, root: Path = DEFAULT_TSM_REPORT_ROOT) -> bool:
        """Return True when `root` is a directory this process may create report entries in."""
        root = Path(root)
        return root.is_dir() and os.access(root, os.W_OK | os.X_OK)

    def get_quote(self, report_data: bytes) -> bytes:
        """Return a TDX quote whose REPORTDATA is `report_data` (exactly 64 bytes)."""
        wanted = check_report_data(report_data)
        if not self.root.is_dir():
            raise PlatformError(f"configfs-tsm not found at {self.root}: {_MOUNT_HINT}")
        entry = self._create_entry()
        try:
            raw = self._request(entry, wanted)
        finally:
            self._remove_entry(entry)
        check_quote_binding(raw, wanted, Tee.TDX, source=f"configfs-tsm ({self.root})")
        return raw

    def _create_entry(self) -> Path:
        # A random name: a fresh entry per request is how the ABI says to avoid sharing one.
        entry = self.root / f"modelyo-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            os.mkdir(entry)
        except OSError as exc:
            raise self._error(exc, "creating report entry", entry) from exc
        return entry

    def _request(self, entry: Path, report_data: bytes) -> bytes:
        provider = self._read_text(entry / "provider")
        if provider != TDX_PROVIDER_NAME:
            raise PlatformError(
                f"configfs-tsm at {self.root} is served by provider {provider!r}, not "
                f"{TDX_PROVIDER_NAME!r}: this is not a TDX guest (sev_guest is AMD SEV-SNP); "
                "use the provider for this platform, or run the agent in a TDX VM"
            )
        before = self._read_generation(entry)
        if before != 0:
            raise PlatformError(
                f"fresh report entry {entry} already has generation {before}: another process "
                "wrote to it; retry, and look for software tampering with configfs-tsm entries"
            )
        self._write_blob(entry / "inblob", report_data)
        raw = self._read_blob(entry / "outblob")
        after = self._read_generation(entry)
        if after != before + 1:
            raise PlatformError(
                f"report entry {entry} reached generation {after} instead of {before + 1}: "
                "another process wrote to it while the quote was generated, so the quote may "
                "carry someone else's REPORTDATA; retry"
            )
        if not raw:
            raise PlatformError(
                f"quote generation failed: {entry / 'outblob'} is empty; the host's Quote "
                "Generation Service (QGS) may be down or unreachable; check qgsd on the host "
                "and the VM's quote-generation socket configuration"
            )
        return raw

    def _remove_entry(self, entry: Path) -> None:
        # A leaked entry is not a security problem (it only pins the provider module), so a
        # valid quote is still returned; but say so, because entries accumulate otherwise.
        try:
            os.rmdir(entry)
        except OSError as exc:
            log.warning(
                "could not remove configfs-tsm report entry %s (%s); remove it with rmdir",
                entry,
                exc.strerror or exc,
            )

    def _read_text(self, path: Path) -> str:
        try:
            return path.read_bytes().decode("ascii").strip()
        except OSError as exc:
            raise self._error(exc, "reading", path) from exc
        except UnicodeDecodeError as exc:
            raise PlatformError(
                f"{path} does not hold ASCII text as configfs-tsm attributes do; "
                f"check that {self.root} is the kernel's tsm/report directory"
            ) from exc

    def _read_generation(self, entry: Path) -> int:
        text = self._read_text(entry / "generation")
        try:
            return int(text, 10)
        except ValueError:
            raise PlatformError(
                f"{entry / 'generation'} holds {text!r}, not a number; "
                f"check that {self.root} is the kernel's tsm/report directory"
            ) from None

    def _write_blob(self, path: Path, data: bytes) -> None:
        # os.open without O_CREAT/O_TRUNC: the attribute must already exist (the kernel made
        # it on mkdir). The kernel applies a binary attribute's content on close, so close
        # errors (for example EBUSY) are real errors too.
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._error(exc, "writing", path) from exc

    def _read_blob(self, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise self._error(exc, "reading", path) from exc

    def _error(self, exc: OSError, action: str, path: Path) -> PlatformError:
        """Turn an OSError from configfs-tsm into a PlatformError that says what to do."""
        code = exc.errno
        if isinstance(exc, PermissionError) or code in (errno.EACCES, errno.EPERM):
            what = (
                f"permission denied {action} {path}: configfs-tsm is writable by root only by "
                f"default; run the agent as root or grant its user write access to {self.root}"
            )
        elif code == errno.ENXIO:
            what = (
                f"{action} {path}: no quote provider is registered with configfs-tsm; load the "
                "TDX guest driver (modprobe tdx_guest) and check this VM is a TDX guest "
                "(dmesg | grep -i tdx)"
            )
        elif code == errno.EBUSY:
            what = (
                f"{action} {path}: a previous quote request is still in flight at the host "
                "(EBUSY); retry in a few seconds"
            )
        elif code == errno.ETIMEDOUT:
            what = (
                f"quote generation failed ({action} {path}): the host's Quote Generation "
                "Service (QGS) did not answer in time; check qgsd on the host and the VM's "
                "quote-generation socket configuration"
            )
        elif code == errno.EIO:
            what = (
                f"quote generation failed ({action} {path}): the host refused the GetQuote "
                "request; its Quote Generation Service (QGS) may be down or unable to reach "
                "its PCCS"
            )
        elif code == errno.EFBIG:
            what = (
                f"{action} {path}: the quote exceeds configfs-tsm's size limit (EFBIG); this "
                "kernel does not support the platform's quote format, update the guest kernel"
            )
        elif code == errno.EINVAL:
            what = (
                f"{action} {path}: the kernel rejected the request (EINVAL); tdx_guest needs "
                "exactly 64 bytes in inblob before outblob is read"
            )
        elif code == errno.EINTR:
            what = f"{action} {path}: interrupted while waiting for the quote; retry"
        elif code == errno.ENOENT:
            what = (
                f"{action} {path}: no such file; the entry vanished (another process removed "
                f"it) or {self.root} is not the kernel's tsm/report directory; retry"
            )
        else:
            what = f"{action} {path} failed: {exc.strerror or exc}; check dmesg for tdx_guest"
        return PlatformError(what)


def detect(root: Path = DEFAULT_TSM_REPORT_ROOT) -> bool:
    """Return True when configfs-tsm at `root` looks usable for TDX quotes."""
    return ConfigfsTsmProvider.detect(root)
