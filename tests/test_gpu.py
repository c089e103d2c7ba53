"""GPU evidence: the SPDM report format, simulated GPUs, NVML collection and verification."""

from __future__ import annotations

import base64
import datetime as dt
import os
import random
import stat
import threading
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelyo.api.agent import GpuReport
from modelyo.errors import GpuEvidenceError, PlatformError
from modelyo.gpu import (
    TAMPERED_MEASUREMENT,
    NvmlSource,
    ReferenceMeasurements,
    SimulatedGpu,
    SimulatedGpuPlatform,
    SimulatedSource,
    collect,
    describe,
    verify,
)
from modelyo.gpu import nvml as nvml_module
from modelyo.gpu.report import (
    MAX_REPORT_SIZE,
    REQUEST_SIZE,
    SIGNATURE_SIZE,
    encode_report,
    parse_report,
)
from modelyo.gpu.sim import MEASUREMENT_COUNT, reference_measurements

NONCE = bytes(range(32))
OTHER_NONCE = bytes(range(1, 33))


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> SimulatedGpuPlatform:
    return SimulatedGpuPlatform(tmp_path_factory.mktemp("sim") / "gpu")


@pytest.fixture(scope="module")
def other_state(tmp_path_factory) -> SimulatedGpuPlatform:
    return SimulatedGpuPlatform(tmp_path_factory.mktemp("other") / "gpu")


@pytest.fixture(scope="module")
def report_bytes(state) -> bytes:
    return state.gpu(0).attestation_report(NONCE)


def simulated(state: SimulatedGpuPlatform, **options) -> GpuReport:
    return collect(NONCE, source=SimulatedSource(state_dir=state.state_dir, **options))


def check(
    state: SimulatedGpuPlatform, report: GpuReport, nonce: bytes = NONCE, **options
) -> GpuReport:
    options.setdefault("roots", [state.device_root()])
    options.setdefault("references", state.reference_measurements())
    return verify(report, nonce, **options)


def with_report(report: GpuReport, index: int, raw: bytes) -> GpuReport:
    gpus = list(report.gpus)
    gpus[index] = gpus[index].model_copy(update={"report": base64.b64encode(raw).decode()})
    return report.model_copy(update={"gpus": gpus})


def problems(report: GpuReport) -> list[str]:
    return [p for gpu in report.gpus for p in gpu.problems]


# --- simulated evidence verifies, and each kind of tampering is caught ---------------------


def test_simulated_evidence_verifies(state):
    collected = simulated(state, count=2)
    assert collected.detail.startswith("2 SIMULATED GPUs")
    assert [g.verified for g in collected.gpus] == [False, False]  # not verified until verify()
    result = check(state, collected)
    assert [g.verified for g in result.gpus] == [True, True], problems(result)
    assert all(g.simulated and not g.problems for g in result.gpus)
    assert result.detail.startswith("2 SIMULATED GPUs verified")
    assert len({g.uuid for g in result.gpus}) == 2
    assert all("SIMULATED" in line and line.endswith("verified") for line in describe(result))


def test_evidence_survives_the_wire(state):
    wire = simulated(state).model_dump_json()
    assert check(state, GpuReport.model_validate_json(wire)).gpus[0].verified


def test_verify_recomputes_and_never_trusts_the_claimed_result(state):
    collected = simulated(state, tampered=(0,))
    forged = collected.model_copy(
        update={"gpus": [collected.gpus[0].model_copy(update={"verified": True})]}
    )
    assert not check(state, forged).gpus[0].verified


def test_wrong_nonce_is_caught(state):
    result = check(state, simulated(state), nonce=OTHER_NONCE)
    assert not result.gpus[0].verified
    found = problems(result)
    assert any("GPU 0: the signed report is for nonce" in p for p in found), found
    assert any("GPU 0: the evidence was collected for nonce" in p for p in found), found


def test_report_for_another_nonce_is_caught_even_when_the_label_is_changed(state):
    collected = simulated(state)
    raw = state.gpu(0).attestation_report(OTHER_NONCE)  # genuine, signed, but another nonce
    result = check(state, with_report(collected, 0, raw))
    assert not result.gpus[0].verified
    assert problems(result) == [
        f"GPU 0: the signed report is for nonce {OTHER_NONCE.hex()[:16]}…, not the expected "
        f"{NONCE.hex()[:16]}… (REPORTDATA[0:32] of the TD quote): an old or relayed report"
    ]


def test_flipped_bit_in_a_measurement_breaks_the_signature(state):
    collected = simulated(state)
    raw = bytearray(base64.b64decode(collected.gpus[0].report))
    raw[REQUEST_SIZE + 8 + 7 + 5] ^= 0x01  # inside measurement 1's digest
    found = problems(check(state, with_report(collected, 0, bytes(raw))))
    assert any("signature does not verify" in p for p in found), found
    assert any(p.startswith("GPU 0: measurement 1 is") for p in found), found


def test_any_flipped_bit_is_refused(state):
    collected = simulated(state)
    raw = base64.b64decode(collected.gpus[0].report)
    rng = random.Random(7)
    for bit in rng.sample(range(len(raw) * 8), 40):
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        result = check(state, with_report(collected, 0, bytes(flipped)))
        assert not result.gpus[0].verified, f"bit {bit} flipped went unnoticed"
        assert result.gpus[0].problems


def test_chain_from_another_root_is_refused(state, other_state):
    result = check(state, simulated(other_state))
    assert not result.gpus[0].verified
    assert any("does not lead to a trusted device root" in p for p in problems(result))


def test_leaf_grafted_onto_a_trusted_chain_is_refused(state, other_state):
    collected = simulated(other_state)
    foreign_leaf = collected.gpus[0].certificate_chain[0]
    chain = [foreign_leaf, *state.gpu(0).certificate_chain_pem()[1:]]
    gpu = collected.gpus[0].model_copy(update={"certificate_chain": chain})
    result = check(state, collected.model_copy(update={"gpus": [gpu]}))
    assert not result.gpus[0].verified
    assert any("is not signed by the next one" in p for p in problems(result)), problems(result)


def test_chain_without_its_root_is_anchored_by_the_configured_root(state, other_state):
    collected = simulated(state)
    gpu = collected.gpus[0]
    gpu = gpu.model_copy(update={"certificate_chain": gpu.certificate_chain[:2]})
    shortened = collected.model_copy(update={"gpus": [gpu]})
    assert check(state, shortened).gpus[0].verified
    assert not check(state, shortened, roots=[other_state.device_root()]).gpus[0].verified


def test_chain_swapped_for_another_devices_chain_is_refused(state):
    collected = simulated(state, count=2)
    gpus = list(collected.gpus)
    gpus[0] = gpus[0].model_copy(update={"certificate_chain": gpus[1].certificate_chain})
    result = check(state, collected.model_copy(update={"gpus": gpus}))
    assert [g.verified for g in result.gpus] == [False, True]
    assert any("signature does not verify" in p for p in result.gpus[0].problems)


def test_report_from_other_firmware_than_the_leaf_certifies_is_refused(state):
    # Same device key, but firmware (FWID) other than the one its leaf certificate names.
    gpu = SimulatedGpu(0, state._leaf(0), vbios_version="96.00.AA.00.01")
    result = check(state, with_report(simulated(state), 0, gpu.attestation_report(NONCE)))
    found = problems(result)
    assert any("differs from the device leaf's" in p for p in found), found


def test_tampered_gpu_measurement_is_caught(state):
    result = check(state, simulated(state, count=2, tampered=(1,)))
    assert [g.verified for g in result.gpus] == [True, False]
    (problem,) = result.gpus[1].problems
    assert problem.startswith(f"GPU 1: measurement {TAMPERED_MEASUREMENT} is ")
    assert "differs from the reference" in problem
    assert result.detail.startswith("1 of 2 SIMULATED GPUs refused: GPU 1: measurement")
    assert describe(result)[1].endswith(f"REFUSED: {problem.removeprefix('GPU 1: ')}")


@pytest.mark.parametrize(("mode", "words"), [("off", "mode is off"), ("devtools", "DEVTOOLS")])
def test_cc_mode_not_on_is_refused(state, mode, words):
    result = check(state, simulated(state, cc_mode=mode))
    assert not result.gpus[0].verified
    assert [p for p in problems(result) if words in p], problems(result)


def test_missing_configuration_is_said_not_pretended(state):
    result = check(state, simulated(state), roots=[], references=None)
    found = problems(result)
    assert not result.gpus[0].verified
    assert any("no GPU device root is configured" in p for p in found), found
    assert any("no reference measurements are configured" in p for p in found), found


def test_references_for_another_driver_are_refused(state):
    references = reference_measurements(driver_version="999.0.0")
    result = check(state, simulated(state), references=references)
    assert any("nothing for driver version 550.127.05" in p for p in problems(result))


def test_evidence_stating_other_versions_than_signed_is_refused(state):
    collected = simulated(state)
    gpu = collected.gpus[0].model_copy(update={"driver_version": "999.0.0"})
    result = check(state, collected.model_copy(update={"gpus": [gpu]}))
    assert any("driver version '999.0.0' but the GPU signed" in p for p in problems(result))


def test_expired_chain_is_refused(state):
    later = dt.datetime(2051, 1, 1, tzinfo=dt.UTC)
    result = check(state, simulated(state), now=later)
    assert any("is not valid at 2051-01-01" in p for p in problems(result))


def test_nonce_must_be_32_bytes(state):
    for bad in (b"", bytes(31), bytes(33), bytes(64)):
        with pytest.raises(GpuEvidenceError, match="exactly 32 bytes"):
            collect(bad, source=SimulatedSource(state_dir=state.state_dir))
        with pytest.raises(GpuEvidenceError, match="exactly 32 bytes"):
            verify(GpuReport(), bad, roots=[], references=None)


# --- the report format --------------------------------------------------------------------


def test_report_layout_round_trips(report_bytes):
    report = parse_report(report_bytes)
    assert report.nonce == NONCE
    assert len(report.measurements) == MEASUREMENT_COUNT
    assert all(len(v) == 48 for v in report.measurements.values())
    assert (report.driver_version, report.vbios_version) == ("550.127.05", "96.00.9F.00.04")
    assert encode_report(report.request, report.response) == report_bytes
    assert report.signed_bytes + report.signature == report_bytes
    assert len(report.signature) == SIGNATURE_SIZE


def test_truncated_reports_are_refused_naming_field_and_offset(report_bytes):
    for size in range(len(report_bytes)):
        with pytest.raises(GpuEvidenceError) as caught:
            parse_report(report_bytes[:size])
        assert caught.value.field and caught.value.offset is not None
    with pytest.raises(GpuEvidenceError, match=r"response\.signature at offset"):
        parse_report(report_bytes[:-1])


def test_oversized_reports_are_refused(report_bytes):
    with pytest.raises(GpuEvidenceError) as caught:
        parse_report(report_bytes + b"\0")
    assert (caught.value.field, caught.value.offset) == ("report.trailing", len(report_bytes))
    with pytest.raises(GpuEvidenceError, match="larger than NVML"):
        parse_report(report_bytes + bytes(MAX_REPORT_SIZE))


@pytest.mark.parametrize(
    ("offset", "value", "field"),
    [
        (0, 0x12, "request.version"),
        (1, 0x81, "request.code"),
        (2, 0x00, "request.param1"),
        (3, 0x05, "request.param2"),
        (REQUEST_SIZE + 1, 0x7F, "response.code"),
        (REQUEST_SIZE + 4, 0, "response.number_of_blocks"),
        (REQUEST_SIZE + 8 + 1, 0x02, "response.measurement_record.block[0].specification"),
        (REQUEST_SIZE + 8 + 5, 47, "response.measurement_record.block[0].size"),
    ],
)
def test_malformed_fields_are_named(report_bytes, offset, value, field):
    bad = bytearray(report_bytes)
    bad[offset] = value
    with pytest.raises(GpuEvidenceError) as caught:
        parse_report(bytes(bad))
    assert caught.value.field == field


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_parser_raises_only_its_error_type(report_bytes, data):
    mode = data.draw(st.sampled_from(["random", "mutate", "splice"]))
    if mode == "random":
        blob = data.draw(st.binary(max_size=600))
    elif mode == "mutate":
        blob = bytearray(report_bytes)
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
        blob = bytes(blob)
    else:
        cut = data.draw(st.integers(0, len(report_bytes)))
        blob = report_bytes[:cut] + data.draw(st.binary(max_size=64))
    try:
        parsed = parse_report(blob)
    except GpuEvidenceError as exc:
        assert exc.field is not None and exc.offset is not None
    else:
        assert encode_report(parsed.request, parsed.response) == blob


# --- NVML -------------------------------------------------------------------------------------


def test_no_gpu_on_this_machine_is_reported_cleanly():
    report = collect(NONCE, source=NvmlSource())
    assert report.gpus == []
    assert report.detail.startswith("no NVIDIA GPU: NVML")
    assert verify(report, NONCE, roots=[], references=None).detail == report.detail
    assert describe(report) == [report.detail]


class FakeNvml:
    """A pynvml-shaped module backed by simulated GPUs (what NVML returns, byte for byte)."""

    class NVMLError(Exception):
        pass

    def __init__(self, gpus, *, init_error=False, cc=1, devtools=0, fail_report=()):
        self.gpus, self.init_error, self.fail_report = gpus, init_error, fail_report
        self.state = SimpleNamespace(environment=2, ccFeature=cc, devToolsMode=devtools)
        self.shut_down = False

    def nvmlInit(self):
        if self.init_error:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        self.shut_down = True

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlSystemGetConfComputeState(self):
        return self.state

    def nvmlSystemGetDriverVersion(self):
        return self.gpus[0].driver_version

    def nvmlDeviceGetHandleByIndex(self, index):
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, gpu):
        return gpu.uuid.encode()  # older bindings return bytes

    def nvmlDeviceGetName(self, gpu):
        return gpu.name

    def nvmlDeviceGetArchitecture(self, gpu):
        return 9

    def nvmlDeviceGetVbiosVersion(self, gpu):
        return gpu.vbios_version

    def nvmlDeviceGetConfComputeGpuAttestationReport(self, gpu, nonce):
        if gpu.index in self.fail_report:
            raise self.NVMLError("Not Supported")
        data = gpu.attestation_report(bytes(nonce))
        return SimpleNamespace(
            attestationReport=list(data) + [0] * 64, attestationReportSize=len(data)
        )

    def nvmlDeviceGetConfComputeGpuCertificate(self, gpu):
        chain = "".join(gpu.certificate_chain_pem()).encode()
        return SimpleNamespace(
            attestationCertChain=list(chain) + [0] * 64, attestationCertChainSize=len(chain)
        )


def test_nvml_path_collects_each_gpu(state):
    library = FakeNvml([state.gpu(0), state.gpu(1)])
    collected = collect(NONCE, source=NvmlSource(library))
    assert library.shut_down
    assert [g.arch for g in collected.gpus] == ["HOPPER", "HOPPER"]
    assert collected.gpus[0].uuid == state.gpu(0).uuid
    assert collected.gpus[0].certificate_chain == state.gpu(0).certificate_chain_pem()
    assert parse_report(base64.b64decode(collected.gpus[1].report)).nonce == NONCE
    result = check(state, collected)
    # Hardware-labelled evidence that chains to the SIMULATED root is named for what it is.
    assert all(g.simulated and not g.verified for g in result.gpus)
    assert all(
        p.endswith("says simulated=False but its chain leads to a SIMULATED root")
        for p in problems(result)
    ), problems(result)


def test_nvml_failures_are_reported_per_gpu_and_kept_through_verification(state):
    library = FakeNvml([state.gpu(0), state.gpu(1)], fail_report=(1,), devtools=1)
    collected = collect(NONCE, source=NvmlSource(library))
    assert collected.gpus[0].cc_mode == "devtools"
    assert collected.gpus[1].report == ""
    once = check(state, collected)
    twice = check(state, once)  # the tool re-verifies what the agent verified
    for result in (once, twice):
        found = result.gpus[1].problems
        assert any(
            "collection: the GPU gave no attestation report (Not Supported)" in p for p in found
        )
        assert any("no attestation report was collected" in p for p in found)


def test_nvml_that_cannot_start_means_no_gpu():
    report = collect(NONCE, source=NvmlSource(FakeNvml([], init_error=True)))
    assert report.gpus == [] and "NVML could not start (NVML Shared Library Not Found)" in (
        report.detail
    )
    assert collect(NONCE, source=NvmlSource(FakeNvml([]))).detail.startswith("no NVIDIA GPU")


def test_pem_chain_split_ignores_padding(state):
    chain = "".join(state.gpu(0).certificate_chain_pem()).encode() + bytes(100)
    assert nvml_module.split_pem_chain(chain) == state.gpu(0).certificate_chain_pem()


# --- state ------------------------------------------------------------------------------------


def test_state_persists_across_instances(tmp_path):
    directory = tmp_path / "gpu"
    first = SimulatedGpuPlatform(directory)
    report = collect(NONCE, source=SimulatedSource(state_dir=directory))
    second = SimulatedGpuPlatform(directory)  # a restart: same keys, same GPUs
    assert second.device_root().der == first.device_root().der
    assert second.gpu(0).uuid == first.gpu(0).uuid == report.gpus[0].uuid
    result = verify(
        report,
        NONCE,
        roots=[second.device_root()],
        references=ReferenceMeasurements.from_file(second.references_path),
    )
    assert result.gpus[0].verified, problems(result)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for key in directory.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "SIMULATED" in first.device_root().subject


def test_default_state_lives_privately_inside_the_platform_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELYO_SIM_DIR", str(tmp_path / "new" / "sim"))
    report = collect(NONCE, source=SimulatedSource())
    assert report.gpus[0].simulated
    for directory in (tmp_path / "new", tmp_path / "new" / "sim", tmp_path / "new" / "sim" / "gpu"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_concurrent_first_use_creates_one_root(tmp_path):
    directory = tmp_path / "gpu"
    roots: list[bytes] = []

    def start() -> None:
        roots.append(SimulatedGpuPlatform(directory).device_root().der)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(roots) == 4 and len(set(roots)) == 1


def test_state_open_to_others_is_refused(tmp_path):
    directory = tmp_path / "gpu"
    directory.mkdir()
    os.chmod(directory, 0o755)
    with pytest.raises(PlatformError, match="open to other users"):
        SimulatedGpuPlatform(directory).device_root()
