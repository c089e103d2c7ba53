"""Attestation policy: which measurements and TCB states a verifier accepts.

A policy file (TOML or JSON) has one section per party, `ca` (the SGX enclave) and `tdx` (the
agent's TD):

    [ca]
    allowed_mrenclave = ["…64 hex digits…"]      # run `modelyo measure ca`
    allowed_mrsigner = []
    isv_prod_id = 0
    min_isv_svn = 0

    [tdx]
    allowed_mrtd = ["…96 hex digits…"]           # run `modelyo measure agent`
    allowed_rtmr3 = []

    [ca.tcb]                                     # likewise [tdx.tcb]
    accepted_statuses = ["UpToDate", "SWHardeningNeeded"]
    allowed_advisories = ["INTEL-SA-00615"]      # omit to accept any advisory

An empty list pins nothing for that register. Debug enclaves and TDs are always refused.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from modelyo.errors import ConfigError

TcbStatus = Literal[
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
]


def _hex_of(size: int):  # type: ignore[no-untyped-def]
    def check(value: object) -> str:
        if not isinstance(value, str):
            raise ValueError("must be a hex string")
        text = value.strip().lower().removeprefix("0x")
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise ValueError(f"{value!r} is not hex") from None
        if len(raw) != size:
            raise ValueError(f"must be {size} bytes ({2 * size} hex digits), got {len(raw)}")
        return text

    return BeforeValidator(check)


Hex32 = Annotated[str, _hex_of(32)]
Hex48 = Annotated[str, _hex_of(48)]


class TcbPolicy(BaseModel):
    """Which platform TCB states are acceptable."""

    model_config = ConfigDict(extra="forbid")

    accepted_statuses: list[TcbStatus] = Field(
        default_factory=lambda: ["UpToDate", "SWHardeningNeeded"]
    )
    # None accepts any advisory of an accepted status; a list accepts only those advisories.
    allowed_advisories: list[str] | None = None


class SgxPolicy(BaseModel):
    """What an SGX enclave (the Modelyo CA) must be."""

    model_config = ConfigDict(extra="forbid")

    allowed_mrenclave: list[Hex32] = Field(default_factory=list)
    allowed_mrsigner: list[Hex32] = Field(default_factory=list)
    isv_prod_id: int | None = None
    min_isv_svn: int | None = None
    tcb: TcbPolicy = Field(default_factory=TcbPolicy)

    def pins_anything(self) -> bool:
        return bool(self.allowed_mrenclave or self.allowed_mrsigner)


class TdxPolicy(BaseModel):
    """What a TDX VM (the Modelyo agent) must be."""

    model_config = ConfigDict(extra="forbid")

    allowed_mrtd: list[Hex48] = Field(default_factory=list)
    allowed_rtmr0: list[Hex48] = Field(default_factory=list)
    allowed_rtmr1: list[Hex48] = Field(default_factory=list)
    allowed_rtmr2: list[Hex48] = Field(default_factory=list)
    allowed_rtmr3: list[Hex48] = Field(default_factory=list)
    allowed_mrconfigid: list[Hex48] = Field(default_factory=list)
    tcb: TcbPolicy = Field(default_factory=TcbPolicy)

    def pins_anything(self) -> bool:
        return bool(self.allowed_mrtd)


class Policy(BaseModel):
    """A whole policy file: the CA's enclave and the agents' TDs."""

    model_config = ConfigDict(extra="forbid")

    ca: SgxPolicy = Field(default_factory=SgxPolicy)
    tdx: TdxPolicy = Field(default_factory=TdxPolicy)


# Which register each pinned list constrains, in the order checks are reported.
SGX_PINS = {"allowed_mrenclave": "mrenclave", "allowed_mrsigner": "mrsigner"}
TDX_PINS = {
    "allowed_mrtd": "mrtd",
    "allowed_rtmr0": "rtmr0",
    "allowed_rtmr1": "rtmr1",
    "allowed_rtmr2": "rtmr2",
    "allowed_rtmr3": "rtmr3",
    "allowed_mrconfigid": "mrconfigid",
}


def load_policy(path: str | Path) -> Policy:
    """Read a policy file (TOML, or JSON when it ends in .json)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read policy {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"policy {path} is not valid {path.suffix or 'TOML'}: {exc}") from None
    return parse_policy(data, source=str(path))


def parse_policy(data: object, *, source: str = "policy") -> Policy:
    """Validate a policy from already-decoded data, with errors naming the field."""
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{source} is invalid: {problems}") from None
