"""Verification collateral: what a verifier needs besides the quote.

The wire and file format is dcap-qvl's `QuoteCollateralV3` JSON (byte fields as hex): issuer
chains (PEM), the root CA CRL and PCK CRL (DER), TCB info and QE identity (the exact signed JSON
text) with their raw r||s signatures. Intel's PCS/PCCS serve these pieces; the simulated
platform issues its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dcap_qvl

from modelyo.errors import CollateralError

REQUIRED_FIELDS = (
    "pck_crl_issuer_chain",
    "root_ca_crl",
    "pck_crl",
    "tcb_info_issuer_chain",
    "tcb_info",
    "tcb_info_signature",
    "qe_identity_issuer_chain",
    "qe_identity",
    "qe_identity_signature",
)


@dataclass(frozen=True)
class Collateral:
    """Collateral for one quote, kept as its canonical JSON text."""

    json_text: str

    @classmethod
    def from_json(cls, text: str | bytes) -> Collateral:
        """Validate collateral JSON (dcap-qvl's QuoteCollateralV3 format)."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CollateralError(
                f"collateral is not JSON ({exc.msg} at line {exc.lineno}); expected dcap-qvl's "
                "QuoteCollateralV3 JSON as a PCCS or `modelyo` writes it"
            ) from None
        if not isinstance(data, dict):
            raise CollateralError("collateral JSON must be an object")
        missing = [name for name in REQUIRED_FIELDS if name not in data]
        if missing:
            raise CollateralError(
                f"collateral lacks {', '.join(missing)}; fetch the complete bundle again"
            )
        try:
            dcap_qvl.QuoteCollateralV3.from_json(text)
        except (ValueError, TypeError) as exc:
            raise CollateralError(f"collateral is malformed: {exc}") from None
        return cls(text)

    @classmethod
    def from_file(cls, path: str | Path) -> Collateral:
        """Read collateral JSON from a file."""
        try:
            return cls.from_json(Path(path).read_bytes())
        except OSError as exc:
            raise CollateralError(f"cannot read collateral {path}: {exc.strerror}") from None

    @classmethod
    def from_parts(cls, parts: dict[str, Any]) -> Collateral:
        """Build collateral from its pieces (bytes for CRLs and signatures, str for the rest)."""
        obj = dcap_qvl.QuoteCollateralV3(**parts)
        return cls(obj.to_json())

    def to_dcap(self) -> dcap_qvl.QuoteCollateralV3:
        return dcap_qvl.QuoteCollateralV3.from_json(self.json_text)

    def as_dict(self) -> dict[str, Any]:
        return json.loads(self.json_text)

    def tcb_info(self) -> dict[str, Any]:
        """The signed TCB info object (issueDate, nextUpdate, fmspc, levels)."""
        return json.loads(self.as_dict()["tcb_info"])
