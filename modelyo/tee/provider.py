"""The quote-provider interface shared by hardware and simulated platforms."""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import StrEnum

from modelyo.errors import PlatformError, QuoteFormatError

REPORT_DATA_SIZE = 64
# configfs-tsm: outblobs larger than 8 KiB are CBOR Web Tokens from DICE-based TDX platforms.
DICE_CWT_MIN_SIZE = 8 * 1024


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


def check_quote_binding(raw: bytes, report_data: bytes, tee: Tee, *, source: str) -> None:
    """Refuse `raw` unless it parses as a `tee` quote whose REPORTDATA equals `report_data`.

    A platform handing back someone else's quote (a stale one, or one produced for a
    concurrent request) must never reach a caller that will bind its TLS key to it.
    """
    # Imported here: the quote module itself imports `Tee` from this module.
    from modelyo.attestation.quote import parse_quote

    try:
        quote = parse_quote(raw)
    except QuoteFormatError as exc:
        hint = "check the platform's quoting stack"
        if tee is Tee.TDX and len(raw) > DICE_CWT_MIN_SIZE:
            hint = (
                "quotes over 8 KiB are CBOR Web Tokens from DICE-based TDX platforms, "
                "which Modelyo does not support"
            )
        raise PlatformError(
            f"{source} returned {len(raw)} bytes that are not a DCAP quote ({exc}); {hint}"
        ) from exc
    if quote.tee != tee:
        raise PlatformError(
            f"{source} returned a {Tee(quote.tee).name} quote where a {tee.name} quote was "
            f"expected; check that this provider matches the platform it runs on"
        )
    if quote.report_data != report_data:
        raise PlatformError(
            f"{source} returned a quote whose REPORTDATA ({quote.report_data.hex()[:16]}…) "
            f"differs from the one requested ({report_data.hex()[:16]}…): another process may "
            "have changed the request concurrently; retry, and treat repeated failures as "
            "tampering"
        )


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
