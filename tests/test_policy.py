"""Policy files: what a user writes, and the errors they get when it is wrong."""

from __future__ import annotations

import json

import pytest

from modelyo.attestation.policy import Policy, load_policy, parse_policy
from modelyo.errors import ConfigError


def test_toml_policy_loads(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(
        f"""
[ca]
allowed_mrenclave = ["0x{"AB" * 32}"]
isv_prod_id = 3

[ca.tcb]
accepted_statuses = ["UpToDate"]

[tdx]
allowed_mrtd = ["{"cd" * 48}"]
"""
    )
    policy = load_policy(path)
    assert policy.ca.allowed_mrenclave == ["ab" * 32]  # normalised: lowercase, no prefix
    assert policy.ca.tcb.accepted_statuses == ["UpToDate"]
    assert policy.tdx.allowed_mrtd == ["cd" * 48]
    assert policy.tdx.tcb.accepted_statuses == ["UpToDate", "SWHardeningNeeded"]


def test_json_policy_loads(tmp_path):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"tdx": {"allowed_rtmr3": ["00" * 48]}}))
    assert load_policy(path).tdx.allowed_rtmr3 == ["00" * 48]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"ca": {"allowed_mrenclave": ["ab" * 31]}}, "ca.allowed_mrenclave.0"),
        ({"ca": {"allowed_mrenclave": ["zz" * 32]}}, "is not hex"),
        ({"tdx": {"allowed_mrtd": ["ab" * 32]}}, "must be 48 bytes"),
        ({"ca": {"allowed_mrenclav": []}}, "ca.allowed_mrenclav"),
        ({"ca": {"tcb": {"accepted_statuses": ["Fine"]}}}, "ca.tcb.accepted_statuses.0"),
    ],
)
def test_invalid_policy_names_the_field(data, message):
    with pytest.raises(ConfigError, match="invalid") as info:
        parse_policy(data)
    assert message in str(info.value)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read policy"):
        load_policy(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[ca\n")
    with pytest.raises(ConfigError, match="not valid"):
        load_policy(bad)


def test_default_policy_pins_nothing():
    policy = Policy()
    assert not policy.ca.pins_anything() and not policy.tdx.pins_anything()
