"""RA-TLS and the REPORTDATA binding, end to end on the simulated platform."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization

from modelyo.attestation import binding, ratls
from modelyo.attestation.policy import SgxPolicy, TdxPolicy
from modelyo.attestation.verify import TrustRoot, verify_quote
from modelyo.measure import measure
from modelyo.tee.sim import SimulatedPlatform

DAY = 86400


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    return SimulatedPlatform(tmp_path_factory.mktemp("sim"))


@pytest.fixture(scope="module")
def sim_root(platform):
    return TrustRoot("simulation", platform.root_certificate_der(), simulated=True)


@pytest.fixture(scope="module")
def ca_enclave(platform):
    return platform.sgx_enclave(mr_enclave=measure("ca").value, mr_signer=bytes(range(32)))


def test_binding_formula_is_sha512_of_tag_key_and_nonce():
    import hashlib

    spki, nonce = b"spki-bytes", bytes(32)
    assert (
        binding.report_data(spki, nonce)
        == hashlib.sha512(b"modelyo-ratls-v1:" + spki + nonce).digest()
    )
    assert binding.matches(binding.report_data(spki), spki)
    assert not binding.matches(binding.report_data(spki), spki, nonce)
    with pytest.raises(ValueError, match="32 random bytes"):
        binding.report_data(spki, b"short")


def test_certificate_quote_binds_its_key_and_verifies_under_the_simulation_root(
    platform, sim_root, ca_enclave
):
    key = ratls.new_tls_key()
    cert = ratls.create_certificate(ca_enclave, key, common_name="Modelyo CA")
    policy = SgxPolicy(allowed_mrenclave=[measure("ca").hex])
    verdict = ratls.verify_certificate(
        cert, platform.collateral("sgx"), root=sim_root, policy=policy, policy_name="ca"
    )
    assert verdict.accepted, verdict.reason()
    assert verdict.simulated
    assert verdict.status == "UpToDate"
    assert {c.name for c in verdict.checks} >= {"report data", "mrenclave", "tcb status"}


def test_simulated_quote_is_refused_under_the_intel_root(platform, ca_enclave):
    key = ratls.new_tls_key()
    cert = ratls.create_certificate(ca_enclave, key, common_name="Modelyo CA")
    verdict = ratls.verify_certificate(
        cert, platform.collateral("sgx"), root=TrustRoot.intel(), policy=SgxPolicy()
    )
    assert not verdict.accepted
    assert "does not lead to the trusted root" in verdict.reason()


def test_swapped_certificate_is_refused(platform, sim_root, ca_enclave):
    """A certificate for another key carrying a genuine quote: the binding catches it."""
    genuine = ratls.create_certificate(ca_enclave, ratls.new_tls_key(), common_name="CA")
    attacker_key = ratls.new_tls_key()
    # Re-issue the genuine quote inside a certificate for the attacker's key.
    forged = _reissue_with_quote(attacker_key, ratls.quote_from_certificate(genuine))
    verdict = ratls.verify_certificate(
        forged, platform.collateral("sgx"), root=sim_root, policy=SgxPolicy()
    )
    assert [c.name for c in verdict.failures] == ["report data"]


def test_certificate_without_quote_is_refused(platform, sim_root):
    plain = _reissue_with_quote(ratls.new_tls_key(), None)
    verdict = ratls.verify_certificate(
        plain, platform.collateral("sgx"), root=sim_root, policy=SgxPolicy()
    )
    assert not verdict.accepted
    assert "no Modelyo quote extension" in verdict.reason()


def test_challenge_with_wrong_nonce_or_wrong_key_is_refused(platform, sim_root):
    td = platform.tdx_guest(mr_td=measure("agent").value)
    key = ratls.new_tls_key()
    cert = ratls.create_certificate(td, key, common_name="agent")
    nonce = binding.new_nonce()
    quote = td.get_quote(binding.report_data(binding.spki_der(key.public_key()), nonce))
    collateral = platform.collateral("tdx")
    policy = TdxPolicy(allowed_mrtd=[measure("agent").hex])

    ok = ratls.verify_challenge(
        quote, nonce, cert, collateral, root=sim_root, policy=policy, policy_name="tdx"
    )
    assert ok.accepted, ok.reason()

    other_nonce = ratls.verify_challenge(
        quote, binding.new_nonce(), cert, collateral, root=sim_root, policy=policy
    )
    assert [c.name for c in other_nonce.failures] == ["report data"]

    other_cert = ratls.create_certificate(td, ratls.new_tls_key(), common_name="agent")
    other_key = ratls.verify_challenge(
        quote, nonce, other_cert, collateral, root=sim_root, policy=policy
    )
    assert [c.name for c in other_key.failures] == ["report data"]


def test_wrong_measurement_is_refused_with_the_policy_field(platform, sim_root):
    td = platform.tdx_guest(mr_td=bytes(48))
    quote = td.get_quote(bytes(64))
    verdict = verify_quote(
        quote,
        platform.collateral("tdx"),
        root=sim_root,
        policy=TdxPolicy(allowed_mrtd=[measure("agent").hex]),
        policy_name="tdx",
    )
    assert [c.name for c in verdict.failures] == ["mrtd"]
    assert "tdx.allowed_mrtd" in verdict.reason()
    assert "modelyo measure agent" in verdict.reason()


def test_debug_td_is_refused(platform, sim_root):
    td = platform.tdx_guest(mr_td=bytes(48), debug=True)
    verdict = verify_quote(
        td.get_quote(bytes(64)), platform.collateral("tdx"), root=sim_root, policy=TdxPolicy()
    )
    assert not verdict.accepted
    assert "debug" in {c.name for c in verdict.failures}


def test_after_the_collateral_window_it_is_refused(platform, sim_root, ca_enclave):
    import time

    issued = int(time.time())
    quote = ca_enclave.get_quote(bytes(64))
    collateral = platform.collateral("sgx", now=issued)
    inside = verify_quote(quote, collateral, root=sim_root, now=issued + 29 * DAY)
    assert inside.accepted, inside.reason()
    after = verify_quote(quote, collateral, root=sim_root, now=issued + 31 * DAY)
    assert not after.accepted
    assert "collateral expired" in after.reason()


@pytest.mark.parametrize(
    ("status", "accepted"),
    [("UpToDate", True), ("SWHardeningNeeded", True), ("OutOfDate", False), ("Revoked", False)],
)
def test_tcb_status_policy_on_simulated_collateral(
    platform, sim_root, ca_enclave, status, accepted
):
    quote = ca_enclave.get_quote(bytes(64))
    verdict = verify_quote(
        quote, platform.collateral("sgx", tcb_status=status), root=sim_root, policy=SgxPolicy()
    )
    assert verdict.accepted is accepted, verdict.reason()


def test_simulation_root_from_file_is_labelled_simulated(platform, tmp_path):
    path = tmp_path / "root.pem"
    path.write_bytes(platform.root_certificate_pem())
    root = TrustRoot.from_file(path)
    assert root.simulated and root.der == platform.root_certificate_der()


def _reissue_with_quote(key, quote):
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forged")])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if quote is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(ratls.QUOTE_OID, quote), critical=False
        )
    cert = builder.sign(key, hashes.SHA256())
    assert cert.public_bytes(serialization.Encoding.PEM)
    return cert
