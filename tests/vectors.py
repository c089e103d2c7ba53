"""The real Intel DCAP quotes in ../shared/vectors/dcap/, as the tests use them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from modelyo.attestation.collateral import Collateral
from modelyo.attestation.quote import quote_from_file_bytes

# The shared folder sits beside the checkout (../shared), in CI as for developers.
VECTORS = Path(
    os.environ.get(
        "MODELYO_DCAP_VECTORS",
        Path(__file__).resolve().parents[2] / "shared" / "vectors" / "dcap",
    )
)


@dataclass(frozen=True)
class Vector:
    """One quote with its collateral and the outcome its README states."""

    name: str
    quote_file: str
    collateral_file: str
    version: int
    tee: str
    verify_at: int
    status: str | None  # None: rejected at verify_at
    advisories: tuple[str, ...] = ()

    @property
    def raw(self) -> bytes:
        return quote_from_file_bytes((VECTORS / self.quote_file).read_bytes())

    @property
    def collateral(self) -> Collateral:
        return Collateral.from_file(VECTORS / self.collateral_file)


ALL = [
    Vector(
        "sgx_quote",
        "sgx_quote",
        "sgx_quote_collateral.json",
        3,
        "sgx",
        1750334171,
        "ConfigurationAndSWHardeningNeeded",
        ("INTEL-SA-00289", "INTEL-SA-00615"),
    ),
    Vector("tdx_quote", "tdx_quote", "tdx_quote_collateral.json", 4, "tdx", 1750331763, "UpToDate"),
    Vector(
        "tdx_quote_2",
        "tdx_quote_2.hex",
        "tdx_quote_2_collateral.json",
        4,
        "tdx",
        1756802519,
        "UpToDate",
    ),
    Vector(
        "tdx_quote_outdated",
        "tdx_quote_outdated",
        "tdx_quote_outdated_collateral.json",
        5,
        "tdx",
        1771415931,
        None,
    ),
]
BY_NAME = {v.name: v for v in ALL}
