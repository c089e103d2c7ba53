"""The simulated platform: genuine-layout quotes that dcap-qvl accepts only under its root."""

from __future__ import annotations

import hashlib
import multiprocessing
import stat
import time
from pathlib import Path
from typing import Any

import dcap_qvl
import pytest

from modelyo.attestation.quote import (
    CERT_TYPE_PCK_CHAIN,
    INTEL_QE_VENDOR_ID,
    SgxReportBody,
    TdReportBody,
    parse_quote,
    qe_report_data,
)
from modelyo.errors import PlatformError
from modelyo.tee.provider import QuoteProvider, Tee
from modelyo.tee.sim import SimulatedPlatform, SimulatedQuoteProvider, default_platform

NOW = 1_790_000_000  # 2026-09-21; certificates are valid for any time 2018..2049
DAY = 86_400
MR_ENCLAVE = hashlib.sha256(b"test enclave").digest()
MR_SIGNER = hashlib.sha256(b"test signer").digest()
MR_TD = hashlib.sha384(b"test td").digest()
RTMRS = tuple(hashlib.sha384(b"rtmr%d" % i).digest() for i in range(4))
MR_CONFIG_ID = hashlib.sha384(b"config").digest()
REPORT_DATA = hashlib.sha512(b"modelyo-ratls-v1:test").digest()
NON_UPTODATE = (
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> SimulatedPlatform:
    return SimulatedPlatform(tmp_path_factory.mktemp("sim") / "state")


@pytest.fixture(scope="module")
def sgx(platform: SimulatedPlatform) -> SimulatedQuoteProvider:
    return platform.sgx_enclave(MR_ENCLAVE, MR_SIGNER, isv_prod_id=7, isv_svn=3)


@pytest.fixture(scope="module")
def tdx(platform: SimulatedPlatform) -> SimulatedQuoteProvider:
    return platform.tdx_guest(MR_TD, RTMRS, MR_CONFIG_ID)


@pytest.fixture(scope="module")
def quotes(sgx: SimulatedQuoteProvider, tdx: SimulatedQuoteProvider) -> dict[Tee, bytes]:
    return {Tee.SGX: sgx.get_quote(REPORT_DATA), Tee.TDX: tdx.get_quote(REPORT_DATA)}


def verify(
    platform: SimulatedPlatform, raw: bytes, tee: Tee, now: int = NOW, **kwargs: object
) -> dcap_qvl.VerifiedReport:
    collateral = platform.collateral(tee, now=NOW, **kwargs).to_dcap()
    return dcap_qvl.verify_with_root_ca(raw, collateral, platform.root_certificate_der(), now)


def flip(raw: bytes, position: int, bit: int = 0) -> bytes:
    out = bytearray(raw)
    out[position] ^= 1 << bit
    return bytes(out)


def test_providers_are_marked_simulated(
    platform: SimulatedPlatform, sgx: SimulatedQuoteProvider, tdx: SimulatedQuoteProvider
) -> None:
    assert platform.SIMULATED and "SIMULATED" in platform.name
    for provider, tee in ((sgx, Tee.SGX), (tdx, Tee.TDX)):
        assert isinstance(provider, QuoteProvider)
        assert provider.simulated is True
        assert provider.tee is tee
        assert "SIMULATED" in provider.name
    root = platform.root_certificate_pem().decode()
    assert "BEGIN CERTIFICATE" in root


def test_sgx_quote_layout_and_verification(
    platform: SimulatedPlatform, quotes: dict[Tee, bytes]
) -> None:
    raw = quotes[Tee.SGX]
    quote = parse_quote(raw)
    assert quote.version == 3 and quote.tee is Tee.SGX
    assert quote.header.qe_vendor_id == INTEL_QE_VENDOR_ID
    body = quote.body
    assert isinstance(body, SgxReportBody)
    assert (body.mr_enclave, body.mr_signer) == (MR_ENCLAVE, MR_SIGNER)
    assert (body.isv_prod_id, body.isv_svn) == (7, 3)
    assert body.report_data == REPORT_DATA and not body.debug
    sig = quote.signature_data
    assert sig.cert_type == CERT_TYPE_PCK_CHAIN and len(sig.pck_chain_pem()) == 3
    assert sig.qe_report.report_data == qe_report_data(sig.attestation_key, sig.qe_auth_data)
    assert sig.qe_report.isv_prod_id == 1
    assert quote.header.user_data[:16] == parse_quote(quotes[Tee.TDX]).header.user_data[:16]

    report = verify(platform, raw, Tee.SGX)
    assert report.status == "UpToDate" and report.advisory_ids == []
    assert dcap_qvl.parse_quote(raw).ca() == "platform"


def test_tdx_quote_layout_and_verification(
    platform: SimulatedPlatform, quotes: dict[Tee, bytes]
) -> None:
    raw = quotes[Tee.TDX]
    quote = parse_quote(raw)
    assert quote.version == 4 and quote.tee is Tee.TDX
    assert quote.header.qe_vendor_id == INTEL_QE_VENDOR_ID
    body = quote.body
    assert isinstance(body, TdReportBody)
    assert body.mr_td == MR_TD and body.mr_config_id == MR_CONFIG_ID
    assert (body.rtmr0, body.rtmr1, body.rtmr2, body.rtmr3) == RTMRS
    assert body.report_data == REPORT_DATA
    assert body.sept_ve_disable and not body.debug
    assert quote.signature_data.qe_report.isv_prod_id == 2
    assert quote.signature_data.cert_type == CERT_TYPE_PCK_CHAIN

    report = verify(platform, raw, Tee.TDX)
    assert report.status == "UpToDate" and report.advisory_ids == []


def test_collateral_defaults_to_the_clock(
    platform: SimulatedPlatform, sgx: SimulatedQuoteProvider
) -> None:
    now = int(time.time())
    collateral = platform.collateral(Tee.SGX)
    raw = sgx.get_quote(REPORT_DATA)
    root = platform.root_certificate_der()
    assert dcap_qvl.verify_with_root_ca(raw, collateral.to_dcap(), root, now).status == "UpToDate"
    assert collateral.tcb_info()["id"] == "SGX"


@pytest.mark.parametrize("tee", list(Tee))
def test_intel_root_refuses_simulated_quotes(
    platform: SimulatedPlatform, quotes: dict[Tee, bytes], tee: Tee
) -> None:
    collateral = platform.collateral(tee, now=NOW).to_dcap()
    with pytest.raises(ValueError):
        dcap_qvl.verify(quotes[tee], collateral, NOW)


@pytest.mark.slow
@pytest.mark.parametrize("tee", list(Tee))
def test_every_byte_of_the_signed_region_is_protected(
    platform: SimulatedPlatform, quotes: dict[Tee, bytes], tee: Tee
) -> None:
    raw = quotes[tee]
    signed_size = parse_quote(raw).signed_size
    assert signed_size == {Tee.SGX: 432, Tee.TDX: 632}[tee]
    collateral = platform.collateral(tee, now=NOW).to_dcap()
    root = platform.root_certificate_der()
    dcap_qvl.verify_with_root_ca(raw, collateral, root, NOW)  # the untouched quote passes
    report_data_at = raw.index(REPORT_DATA)
    accepted = []
    for position in range(signed_size):
        try:
            dcap_qvl.verify_with_root_ca(flip(raw, position, position % 8), collateral, root, NOW)
        except ValueError as exc:
            # A changed REPORTDATA parses fine: only the quote signature can catch it.
            if report_data_at <= position < report_data_at + 64:
                assert "signature" in str(exc).lower(), str(exc)
        else:
            accepted.append(position)
    assert accepted == []


@pytest.mark.parametrize("tee", list(Tee))
@pytest.mark.parametrize(
    "part", ["qe_report", "qe_report_signature", "attestation_key", "signature"]
)
def test_signature_data_is_protected(
    platform: SimulatedPlatform, quotes: dict[Tee, bytes], tee: Tee, part: str
) -> None:
    raw = quotes[tee]
    sig = parse_quote(raw).signature_data
    value = sig.qe_report.to_bytes() if part == "qe_report" else getattr(sig, part)
    start = raw.index(value)
    assert raw.count(value) == 1
    collateral = platform.collateral(tee, now=NOW).to_dcap()
    root = platform.root_certificate_der()
    positions = [*range(0, len(value), 23), len(value) - 1]
    for position in positions:
        with pytest.raises(ValueError):
            dcap_qvl.verify_with_root_ca(
                flip(raw, start + position, position % 8), collateral, root, NOW
            )


@pytest.mark.parametrize("tee", list(Tee))
def test_expired_collateral_is_refused(
    platform: SimulatedPlatform, quotes: dict[Tee, bytes], tee: Tee
) -> None:
    assert verify(platform, quotes[tee], tee, now=NOW + 29 * DAY).status == "UpToDate"
    with pytest.raises(ValueError):
        verify(platform, quotes[tee], tee, now=NOW + 60 * DAY)


@pytest.mark.parametrize("tee", list(Tee))
@pytest.mark.parametrize("status", NON_UPTODATE)
def test_each_tcb_status_comes_out_of_dcap_qvl(
    platform: SimulatedPlatform, quotes: dict[Tee, bytes], tee: Tee, status: str
) -> None:
    report = verify(platform, quotes[tee], tee, tcb_status=status)
    assert report.status == status
    assert report.advisory_ids == ["INTEL-SA-00615"]


@pytest.mark.parametrize("tee", list(Tee))
def test_revoked_tcb_is_refused(
    platform: SimulatedPlatform, quotes: dict[Tee, bytes], tee: Tee
) -> None:
    with pytest.raises(ValueError, match="Revoked"):
        verify(platform, quotes[tee], tee, tcb_status="Revoked")


def test_advisory_ids_and_unknown_status(
    platform: SimulatedPlatform, quotes: dict[Tee, bytes]
) -> None:
    ids = ["INTEL-SA-00001", "INTEL-SA-00002"]
    report = verify(
        platform, quotes[Tee.SGX], Tee.SGX, tcb_status="SWHardeningNeeded", advisory_ids=ids
    )
    assert report.advisory_ids == ids
    with pytest.raises(PlatformError, match="UpToDate"):
        platform.collateral(Tee.SGX, now=NOW, tcb_status="Fine")


def test_debug_enclave_and_td_are_refused(platform: SimulatedPlatform) -> None:
    sgx = platform.sgx_enclave(MR_ENCLAVE, MR_SIGNER, debug=True).get_quote(REPORT_DATA)
    assert parse_quote(sgx).debug
    tdx = platform.tdx_guest(MR_TD, debug=True).get_quote(REPORT_DATA)
    assert parse_quote(tdx).debug and parse_quote(tdx).body.sept_ve_disable
    with pytest.raises(ValueError, match=r"[Dd]ebug"):
        verify(platform, sgx, Tee.SGX)
    with pytest.raises(ValueError, match=r"[Dd]ebug"):
        verify(platform, tdx, Tee.TDX)


def test_bad_inputs_raise_platform_error(
    platform: SimulatedPlatform, sgx: SimulatedQuoteProvider
) -> None:
    with pytest.raises(PlatformError, match="64 bytes"):
        sgx.get_quote(b"short")
    with pytest.raises(PlatformError, match="MRENCLAVE"):
        platform.sgx_enclave(b"x" * 31, MR_SIGNER)
    with pytest.raises(PlatformError, match="ISVSVN"):
        platform.sgx_enclave(MR_ENCLAVE, MR_SIGNER, isv_svn=70_000)
    with pytest.raises(PlatformError, match="RTMR2"):
        platform.tdx_guest(MR_TD, (bytes(48), bytes(48), bytes(47), bytes(48)))


def test_state_persists_with_private_modes(tmp_path: Path) -> None:
    state = tmp_path / "sim"
    first = SimulatedPlatform(state)
    raw = first.tdx_guest(MR_TD).get_quote(REPORT_DATA)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    keys = sorted(state.glob("*.key"))
    assert len(keys) == 6
    for private in [*keys, state / "platform_secret.bin"]:
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private

    second = SimulatedPlatform(state)
    assert second.root_certificate_der() == first.root_certificate_der()
    assert second.platform_secret == first.platform_secret and len(first.platform_secret) == 32
    assert verify(second, raw, Tee.TDX).status == "UpToDate"
    # A fresh quote of the reloaded platform verifies under the first one's collateral too.
    again = second.tdx_guest(MR_TD).get_quote(REPORT_DATA)
    assert verify(first, again, Tee.TDX).status == "UpToDate"

    other = SimulatedPlatform(tmp_path / "other")
    assert other.root_certificate_der() != first.root_certificate_der()
    assert other.platform_secret != first.platform_secret
    with pytest.raises(ValueError):
        verify(other, raw, Tee.TDX)


def test_unsafe_or_damaged_state_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "sim"
    SimulatedPlatform(state).root_certificate_der()
    (state / "pck.key").chmod(0o644)
    with pytest.raises(PlatformError, match="chmod 600"):
        SimulatedPlatform(state).root_certificate_der()
    (state / "pck.key").chmod(0o600)
    (state / "pck.pem").unlink()
    with pytest.raises(PlatformError, match="damaged"):
        SimulatedPlatform(state).root_certificate_der()
    state.chmod(0o755)
    with pytest.raises(PlatformError, match="chmod 700"):
        SimulatedPlatform(state).root_certificate_der()


def test_default_platform_uses_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELYO_SIM_DIR", str(tmp_path / "env-sim"))
    platform = default_platform()
    assert platform is default_platform()
    assert platform.state_dir == tmp_path / "env-sim"
    platform.root_certificate_der()
    assert (tmp_path / "env-sim" / "platform.json").is_file()


def _root_of(state_dir: str, barrier: Any) -> bytes:
    barrier.wait()  # start every process's first use at the same moment
    return SimulatedPlatform(Path(state_dir)).root_certificate_der()


@pytest.mark.slow
def test_concurrent_creation_yields_one_platform(tmp_path: Path) -> None:
    state = tmp_path / "sim"
    context = multiprocessing.get_context("spawn")
    workers = 4
    with context.Manager() as manager:
        barrier = manager.Barrier(workers)
        with context.Pool(workers) as pool:
            roots = pool.starmap(_root_of, [(str(state), barrier)] * workers)
    assert len(set(roots)) == 1
    platform = SimulatedPlatform(state)
    assert platform.root_certificate_der() == roots[0]
    raw = platform.sgx_enclave(MR_ENCLAVE, MR_SIGNER).get_quote(REPORT_DATA)
    assert verify(platform, raw, Tee.SGX).status == "UpToDate"
