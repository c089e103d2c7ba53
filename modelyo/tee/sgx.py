"""SGX quotes inside a Gramine enclave, through Gramine's ``/dev/attestation`` pseudo-files.

The protocol is Gramine's (Documentation/attestation.rst, "Low-level /dev/attestation
interface"): ``attestation_type`` names the scheme (``none``, ``epid`` or ``dcap``); write the
64-byte REPORTDATA to ``user_report_data``, then read ``quote``. The pseudo-files are
process-local, so threads of this process are serialised around the write/read pair. The
returned quote is parsed and refused unless it is an SGX quote carrying exactly the
REPORTDATA we asked for.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import ClassVar

from modelyo.errors import PlatformError
from modelyo.tee.provider import QuoteProvider, Tee, check_quote_binding, check_report_data

DEFAULT_GRAMINE_ROOT = Path("/dev/attestation")

_MANIFEST_HINT = (
    'set sgx.remote_attestation = "dcap" in the enclave\'s Gramine manifest, '
    "re-sign it (gramine-sgx-sign) and restart"
)


class GramineProvider(QuoteProvider):
    """SGX DCAP quotes for the enclave this process runs in, under Gramine."""

    tee = Tee.SGX
    # /dev/attestation keeps one user_report_data per process: without this lock two threads
    # could each read the quote carrying the other's REPORTDATA.
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, root: Path = DEFAULT_GRAMINE_ROOT) -> None:
        self.root = Path(root)

    @property
    def name(self) -> str:
        return "sgx (gramine /dev/attestation)"

    @classmethod
    def detect(cls, root: Path = DEFAULT_GRAMINE_ROOT) -> bool:
        """Return True when `root` is Gramine's attestation interface with DCAP enabled."""
        try:
            return (Path(root) / "attestation_type").read_bytes().strip() == b"dcap"
        except OSError:
            return False

    def get_quote(self, report_data: bytes) -> bytes:
        """Return an SGX quote whose REPORTDATA is `report_data` (exactly 64 bytes)."""
        wanted = check_report_data(report_data)
        if not self.root.is_dir():
            raise PlatformError(
                f"Gramine's attestation interface not found at {self.root}: run the CA inside "
                "an SGX enclave with gramine-sgx, and " + _MANIFEST_HINT
            )
        self._check_attestation_type()
        with self._lock:
            self._write_report_data(wanted)
            raw = self._read_quote()
        if not raw:
            raise PlatformError(
                f"Gramine returned an empty quote from {self.root / 'quote'}: the quoting "
                "enclave could not be reached; check aesmd on the host and the DCAP quote "
                "provider library's PCCS configuration (/etc/sgx_default_qcnl.conf)"
            )
        check_quote_binding(raw, wanted, Tee.SGX, source=f"Gramine ({self.root})")
        return raw

    def _check_attestation_type(self) -> None:
        path = self.root / "attestation_type"
        try:
            kind = path.read_bytes().decode("ascii", "replace").strip()
        except OSError as exc:
            raise PlatformError(
                f"cannot read {path} ({exc.strerror or exc}): this does not look like Gramine's "
                "attestation interface; run the CA under gramine-sgx"
            ) from exc
        if kind == "dcap":
            return
        if kind == "none":
            raise PlatformError(
                "Gramine reports attestation_type 'none': the enclave's manifest lacks "
                'sgx.remote_attestation = "dcap"; ' + _MANIFEST_HINT
            )
        if kind == "epid":
            raise PlatformError(
                "Gramine reports attestation_type 'epid': Modelyo verifies DCAP (ECDSA) quotes "
                "only and Intel has retired EPID; " + _MANIFEST_HINT
            )
        raise PlatformError(
            f"Gramine reports an unknown attestation_type {kind!r} in {path}; "
            "Modelyo needs 'dcap': " + _MANIFEST_HINT
        )

    def _write_report_data(self, data: bytes) -> None:
        path = self.root / "user_report_data"
        # No O_CREAT: the pseudo-file exists under Gramine; creating a plain file would
        # silently produce a quote over stale data.
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        except OSError as exc:
            raise PlatformError(
                f"writing REPORTDATA to {path} failed ({exc.strerror or exc}); check that the "
                "CA runs under gramine-sgx with remote attestation enabled"
            ) from exc

    def _read_quote(self) -> bytes:
        path = self.root / "quote"
        try:
            return path.read_bytes()
        except OSError as exc:
            raise PlatformError(
                f"reading the quote from {path} failed ({exc.strerror or exc}): Gramine could "
                "not obtain a quote from the quoting enclave; check aesmd on the host and the "
                "DCAP quote provider library's PCCS configuration (/etc/sgx_default_qcnl.conf)"
            ) from exc


def detect(root: Path = DEFAULT_GRAMINE_ROOT) -> bool:
    """Return True when Gramine's ``/dev/attestation`` at `root` offers DCAP quotes."""
    return GramineProvider.detect(root)
