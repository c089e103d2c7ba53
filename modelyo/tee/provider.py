"""The quote-provider interface shared by hardware and simulated platforms."""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import StrEnum

from modelyo.errors import PlatformError

REPORT_DATA_SIZE = 64


class Tee(StrEnum):
    """The kind of trusted execution environment a quote comes from."""

    SGX = "sgx"
    TDX = "tdx"


def check_report_data(report_data: bytes) -> bytes:
    """Return `report_data` if it is exactly 64 bytes, else raise `PlatformError`."""
    if not isinstance(report_data, bytes | bytearray) or len(report_data) != REPORT_DATA_SIZE:
        got = len(report_data) if isinstance(report_data, bytes | bytearray) else type(report_data)
        raise PlatformError(
            f"REPORTDATA must be exactly {REPORT_DATA_SIZE} bytes, got {got}; "
            "build it with modelyo.attestation.binding.report_data()"
        )
    return bytes(report_data)


class QuoteProvider(ABC):
    """Produces DCAP quotes whose 64-byte REPORTDATA the caller chooses.

    `simulated` is True only for the software platform; everything that shows a result
    derived from such a quote must say SIMULATED.
    """

    tee: Tee
    simulated: bool = False

    @property
    @abstractmethod
    def name(self) -> str:
        """A short human-readable name, e.g. "tdx (configfs-tsm)"."""

    @abstractmethod
    def get_quote(self, report_data: bytes) -> bytes:
        """Return a quote over `report_data` (exactly 64 bytes).

        Raises `PlatformError` with a message that says what failed and what to check.
        """
