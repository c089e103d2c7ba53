"""Verification of the real Intel quotes: dcap-qvl under the Intel root, then our policy."""

from __future__ import annotations

import json
import time

import pytest

from modelyo.attestation.policy import SgxPolicy, TcbPolicy, TdxPolicy
from modelyo.attestation.verify import TrustRoot, explain_dcap_error, verify_quote
from modelyo.errors import AttestationError
from tests.vectors import ALL, BY_NAME

ANY_STATUS = TcbPolicy(
    accepted_statuses=[
        "UpToDate",
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
        "OutOfDate",
        "OutOfDateConfigurationNeeded",
    ]
)


def _policy(vector, **pins):
    cls = SgxPolicy if vector.tee == "sgx" else TdxPolicy
    return cls(tcb=ANY_STATUS, **pins)


@pytest.mark.parametrize("vector", ALL, ids=lambda v: v.name)
def test_each_vector_verifies_or_is_rejected_as_its_readme_says(vector):
    verdict = verify_quote(
        vector.raw,
        vector.collateral,
        root=TrustRoot.intel(),
        now=vector.verify_at,
        policy=_policy(vector),
    )
    if vector.status is None:
        assert not verdict.accepted
        assert "no TCB level" in verdict.reason()
        assert "No matching TCB level found" in verdict.reason()
    else:
        assert verdict.accepted, verdict.reason()
        assert verdict.status == vector.status
        assert tuple(verdict.advisories) == vector.advisories
        assert not verdict.simulated


@pytest.mark.parametrize("vector", ALL, ids=lambda v: v.name)
def test_each_vector_fails_today_with_expired_collateral(vector):
    verdict = verify_quote(
        vector.raw, vector.collateral, root=TrustRoot.intel(), policy=_policy(vector)
    )
    assert not verdict.accepted
    assert verdict.checked_at >= int(time.time()) - 60
    assert "collateral expired" in verdict.reason()
    assert "fetch fresh collateral" in verdict.reason()


def test_default_tcb_policy_refuses_configuration_needed_and_names_the_field():
    vector = BY_NAME["sgx_quote"]
    verdict = verify_quote(
        vector.raw,
        vector.collateral,
        root=TrustRoot.intel(),
        now=vector.verify_at,
        policy=SgxPolicy(),
        policy_name="ca",
    )
    assert not verdict.accepted
    assert [c.name for c in verdict.failures] == ["tcb status"]
    assert "ca.tcb.accepted_statuses" in verdict.reason()
    with pytest.raises(AttestationError, match="ConfigurationAndSWHardeningNeeded"):
        verdict.raise_for_refusal()


def test_advisory_allow_list():
    vector = BY_NAME["sgx_quote"]
    tcb = ANY_STATUS.model_copy(update={"allowed_advisories": ["INTEL-SA-00289"]})
    verdict = verify_quote(
        vector.raw,
        vector.collateral,
        root=TrustRoot.intel(),
        now=vector.verify_at,
        policy=SgxPolicy(tcb=tcb),
        policy_name="ca",
    )
    assert not verdict.accepted
    assert "INTEL-SA-00615" in verdict.reason()
    assert "ca.tcb.allowed_advisories" in verdict.reason()


def test_pinned_mrenclave_accepts_the_right_one_and_refuses_another():
    vector = BY_NAME["sgx_quote"]
    good = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
    ok = verify_quote(
        vector.raw,
        vector.collateral,
        root=TrustRoot.intel(),
        now=vector.verify_at,
        policy=_policy(vector, allowed_mrenclave=[good]),
        policy_name="ca",
    )
    assert ok.accepted and any(c.name == "mrenclave" and c.ok for c in ok.checks)
    bad = verify_quote(
        vector.raw,
        vector.collateral,
        root=TrustRoot.intel(),
        now=vector.verify_at,
        policy=_policy(vector, allowed_mrenclave=["ab" * 32]),
        policy_name="ca",
    )
    assert not bad.accepted
    assert "MRENCLAVE=33d8736db756ed49" in bad.reason()
    assert "ca.allowed_mrenclave" in bad.reason()
    assert "modelyo measure ca" in bad.reason()


def test_isv_fields_are_checked():
    vector = BY_NAME["sgx_quote"]
    verdict = verify_quote(
        vector.raw,
        vector.collateral,
        root=TrustRoot.intel(),
        now=vector.verify_at,
        policy=_policy(vector, isv_prod_id=7, min_isv_svn=1),
        policy_name="ca",
    )
    assert {c.name for c in verdict.failures} == {"isv_prod_id", "isv_svn"}


def test_pinned_mrtd_and_rtmr():
    vector = BY_NAME["tdx_quote"]
    mrtd = (
        "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407"
        "de03ae6dc5f87f27428b2538873118b7"
    )
    ok = verify_quote(
        vector.raw,
        vector.collateral,
        root=TrustRoot.intel(),
        now=vector.verify_at,
        policy=_policy(vector, allowed_mrtd=[mrtd], allowed_rtmr3=["00" * 48]),
    )
    assert ok.accepted, ok.reason()
    bad = verify_quote(
        vector.raw,
        vector.collateral,
        root=TrustRoot.intel(),
        now=vector.verify_at,
        policy=_policy(vector, allowed_mrtd=[mrtd], allowed_rtmr3=["11" * 48]),
        policy_name="tdx",
    )
    assert [c.name for c in bad.failures] == ["rtmr3"]
    assert "tdx.allowed_rtmr3" in bad.reason()


def test_policy_of_the_wrong_tee_is_refused():
    vector = BY_NAME["tdx_quote"]
    verdict = verify_quote(
        vector.raw,
        vector.collateral,
        root=TrustRoot.intel(),
        now=vector.verify_at,
        policy=SgxPolicy(tcb=ANY_STATUS),
    )
    assert [c.name for c in verdict.failures] == ["tee"]


def test_unpinned_policy_says_identity_was_not_checked():
    vector = BY_NAME["tdx_quote"]
    verdict = verify_quote(
        vector.raw,
        vector.collateral,
        root=TrustRoot.intel(),
        now=vector.verify_at,
        policy=_policy(vector),
    )
    assert verdict.accepted
    unchecked = [c for c in verdict.checks if c.ok is None]
    assert unchecked and "NOT checked" in unchecked[0].detail


def test_report_data_binding_must_match():
    vector = BY_NAME["sgx_quote"]
    quoted = vector.raw[368:432]  # REPORTDATA of an SGX v3 quote
    ok = verify_quote(
        vector.raw,
        vector.collateral,
        root=TrustRoot.intel(),
        now=vector.verify_at,
        policy=_policy(vector),
        expected_report_data=quoted,
    )
    assert ok.accepted
    wrong = bytearray(quoted)
    wrong[63] ^= 1
    bad = verify_quote(
        vector.raw,
        vector.collateral,
        root=TrustRoot.intel(),
        now=vector.verify_at,
        policy=_policy(vector),
        expected_report_data=bytes(wrong),
    )
    assert [c.name for c in bad.failures] == ["report data"]
    assert "replayed or relayed" in bad.reason()


def test_malformed_quote_gives_a_verdict_not_an_exception():
    vector = BY_NAME["tdx_quote"]
    verdict = verify_quote(
        vector.raw[:700], vector.collateral, root=TrustRoot.intel(), now=vector.verify_at
    )
    assert not verdict.accepted
    assert verdict.failures[0].name == "format"
    assert "offset" in verdict.reason()


def test_tampered_real_quote_is_refused():
    vector = BY_NAME["tdx_quote"]
    raw = bytearray(vector.raw)
    raw[200] ^= 0x01  # inside MRTD
    verdict = verify_quote(
        bytes(raw),
        vector.collateral,
        root=TrustRoot.intel(),
        now=vector.verify_at,
        policy=_policy(vector),
    )
    assert not verdict.accepted
    assert "signature does not verify" in verdict.reason()


def test_verdict_json_is_complete():
    vector = BY_NAME["tdx_quote"]
    verdict = verify_quote(
        vector.raw,
        vector.collateral,
        root=TrustRoot.intel(),
        now=vector.verify_at,
        policy=_policy(vector),
    )
    data = json.loads(json.dumps(verdict.to_dict()))
    assert data["accepted"] is True
    assert data["tcb_status"] == "UpToDate"
    assert data["measurements"]["mrtd"].startswith("91eb2b44")
    assert data["simulated"] is False
    assert data["collateral_expires"] > vector.verify_at


def test_explain_dcap_error_keeps_the_original_text():
    text = explain_dcap_error("Verification failed: Something new")
    assert "Something new" in text
    expired = explain_dcap_error(
        "Verification failed: CrlExpired { time: UnixTime(1796412732), "
        "next_update: UnixTime(1775215317) }"
    )
    assert "2026-04-03" in expired and "collateral expired" in expired
