"""The agent without HTTP: its configuration and measurement, its state, registration retries,
attestation, ownership, who may call what, and how container errors become answers.

The CA is the real `CaService` in process (no HTTP): the agent's CSR and quote go to
`register_vm`, and its answer through the agent's own checks (`check_registration`).
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import io
import json
import os
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from ca_enclave.sealing import SimulatedSealer
from ca_enclave.service import SIMULATED_MRSIGNER, CaService, Platform, issue_tls_identity
from ca_enclave.store import Store
from modelyo import pki
from modelyo.api.agent import (
    ContainerInfo,
    ContainerSpec,
    ImageInfo,
    OwnershipClaim,
    WaitResult,
)
from modelyo.api.ca import CaPolicy, VmRegistration, VmRule
from modelyo.attestation import binding, ratls
from modelyo.attestation.policy import TdxPolicy
from modelyo.attestation.verify import TrustRoot
from modelyo.errors import (
    ConfigError,
    ContainerConflictError,
    ContainerError,
    ContainerNotFoundError,
    StateError,
    UploadTooLargeError,
)
from modelyo.gpu import simulated_platform, verify
from modelyo.measure import measure
from modelyo.service.errors import (
    AlreadyOwned,
    BadRequest,
    Forbidden,
    NotFound,
    ServiceError,
    TooLarge,
    Unauthenticated,
    Unavailable,
)
from modelyo.tee.sim import SimulatedPlatform
from tdx_agent import server
from tdx_agent.boot import (
    Registrar,
    RegistrationError,
    RegistrationStatus,
    backoff_delay,
    check_registration,
    make_platform,
    register,
)
from tdx_agent.config import AgentConfig, mr_config_id, parse_args
from tdx_agent.gpus import make_gpus
from tdx_agent.service import AgentService
from tdx_agent.state import OWNER_FILE, AgentState, RegistrationRecord

CA_URL = "https://ca.example:8443"
CA_MRENCLAVE = "ab" * 32


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sim")


@pytest.fixture(scope="module")
def agent_mrtd() -> str:
    return measure("agent").hex


def _config(state_dir: Path, sim_dir: Path, **changes) -> AgentConfig:
    values = dict(
        host="127.0.0.1",
        port=0,
        state_dir=state_dir,
        ca_url=CA_URL,
        ca_mrenclave=(CA_MRENCLAVE,),
        ca_root="simulation",
        platform="simulated",
        sim_dir=sim_dir,
        simulated_gpus=1,
        max_image_bytes=1000,
    )
    values.update(changes)
    return AgentConfig(**values)


def _ca(directory: Path, sim_dir: Path, mrtd: str, key_ids=("default",)) -> CaService:
    sim = SimulatedPlatform(sim_dir)
    mrenclave = hashlib.sha256(b"agent service test CA").digest()
    platform = Platform(
        name="simulated",
        provider=sim.sgx_enclave(mrenclave, SIMULATED_MRSIGNER),
        simulated=True,
        collateral=lambda: sim.collateral("sgx"),
        sim_platform=sim,
    )
    policy = CaPolicy(
        root="simulation",
        vms=[VmRule(name="agents", tdx=TdxPolicy(allowed_mrtd=[mrtd]), key_ids=list(key_ids))],
    )
    store = Store.open(directory, SimulatedSealer(sim, mrenclave), initial_policy=policy)
    return CaService(store, platform, issue_tls_identity(store, platform.provider, ["ca"]))


class FakeRuntime:
    """Stands in for the Docker runtime: records calls, raises what a test sets."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []
        self.error: Exception | None = None
        self.received = b""
        self.archive: list[bytes] = [b"tar-1", b"tar-2"]
        self.archive_error: Exception | None = None

    def _call(self, name: str, *args):
        self.calls.append((name, args))
        if self.error is not None:
            raise self.error

    def load(self, chunks: Iterable[bytes], *, max_bytes: int) -> list[ImageInfo]:
        self._call("load", max_bytes)
        self.received = b"".join(chunks)
        return [ImageInfo(id="sha256:" + "0" * 64, tags=["job:1"], size=len(self.received))]

    def images(self) -> list[ImageInfo]:
        self._call("images")
        return []

    def create(self, spec: ContainerSpec) -> ContainerInfo:
        self._call("create", spec)
        return self._info(spec.name)

    def start(self, name: str) -> ContainerInfo:
        self._call("start", name)
        return self._info(name)

    def stop(self, name: str, *, timeout: int = 10) -> ContainerInfo:
        self._call("stop", name, timeout)
        return self._info(name)

    def delete(self, name: str) -> None:
        self._call("delete", name)

    def list(self) -> list[ContainerInfo]:
        self._call("list")
        return []

    def inspect(self, name: str) -> ContainerInfo:
        self._call("inspect", name)
        return self._info(name)

    def logs(self, name: str, *, follow: bool = False) -> Iterator[bytes]:
        self._call("logs", name, follow)
        return iter([b"hello\n"])

    def wait(self, name: str, *, timeout: float | None = None) -> WaitResult:
        self._call("wait", name, timeout)
        return WaitResult(name=name, exit_code=0)

    def get_archive(self, name: str, path: str) -> Iterator[bytes]:
        self._call("get_archive", name, path)

        def stream() -> Iterator[bytes]:
            if self.archive_error is not None:
                raise self.archive_error
            yield from self.archive

        return stream()

    def put_archive(self, name: str, path: str, chunks: Iterable[bytes]) -> None:
        self._call("put_archive", name, path)
        self.received = b"".join(chunks)

    @staticmethod
    def _info(name: str) -> ContainerInfo:
        return ContainerInfo(
            name=name,
            id="c" * 64,
            image="job:1",
            status="created",
            key_id="default",
            gpu=False,
            created_at="now",
        )


class Agent:
    """An agent service over a real state directory and simulated platform."""

    def __init__(self, directory: Path, sim_dir: Path, **changes) -> None:
        self.config = _config(directory, sim_dir, **changes)
        self.state = AgentState.open(directory)
        self.platform = make_platform(self.config)
        self.status = RegistrationStatus()
        self.runtime = FakeRuntime()
        self.service = AgentService(
            self.state,
            self.platform,
            self.status,
            make_gpus(self.config),
            lambda _record: self.runtime,
            max_image_bytes=self.config.max_image_bytes,
        )

    def registration_request(self, name: str = "vm-1") -> VmRegistration:
        quote = self.platform.provider.get_quote(binding.report_data(self.state.spki))
        return VmRegistration(
            name=name,
            csr=pki.csr_pem(pki.make_csr(self.state.key, name)),
            quote=base64.b64encode(quote).decode(),
            collateral=self.platform.collateral().json_text,
        )

    def register_with(self, ca: CaService) -> RegistrationRecord:
        result = ca.register_vm(self.registration_request())
        root = ca.store.root_certificate
        record = check_registration(result, root, self.state, name="vm-1", ca_url=CA_URL)
        self.state.save_registration(record)
        self.status.succeeded(record)
        self.service.registered(record)
        return record

    def close(self) -> None:
        self.state.close()


@pytest.fixture
def ca(tmp_path, sim_dir, agent_mrtd) -> CaService:
    return _ca(tmp_path / "ca", sim_dir, agent_mrtd)


@pytest.fixture
def agent(tmp_path, sim_dir) -> Iterator[Agent]:
    made = Agent(tmp_path / "agent", sim_dir)
    yield made
    made.close()


@pytest.fixture
def registered(agent, ca) -> Agent:
    agent.register_with(ca)
    return agent


def _claim(service: AgentService, key=None, name: str = "owner"):
    key = key or pki.new_key()
    grant = service.claim_ownership(OwnershipClaim(csr=pki.csr_pem(pki.make_csr(key, name))))
    return key, grant


# --- configuration and measurement -------------------------------------------------------------


def test_mrconfigid_is_sha384_of_the_canonical_measured_configuration(tmp_path, sim_dir):
    config = _config(tmp_path, sim_dir)
    canonical = (
        '{"ca_mrenclave":["' + CA_MRENCLAVE + '"],"ca_root":"simulation",'
        '"ca_url":"https://ca.example:8443","format":"modelyo-agent-config-v1",'
        '"platform":"simulated"}'
    )
    assert config.mr_config_id() == hashlib.sha384(canonical.encode()).digest()
    # A trailing slash is the same CA; another address, measurement or root is not.
    assert _config(tmp_path, sim_dir, ca_url=CA_URL + "/").mr_config_id() == config.mr_config_id()
    for change in (
        {"ca_url": "https://other.example:8443"},
        {"ca_mrenclave": ("cd" * 32,)},
        {"ca_root": "intel"},
        {"platform": "tdx"},
    ):
        assert _config(tmp_path, sim_dir, **change).mr_config_id() != config.mr_config_id()
    # Not measured: where it listens, its state, GPUs, names.
    assert (
        _config(tmp_path / "x", sim_dir, port=9, simulated_gpus=0, name="n").mr_config_id()
        == config.mr_config_id()
    )


def test_the_command_line_resolves_and_checks_the_measured_part(tmp_path):
    base = ["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path), "--ca", "https://ca:1/"]
    config, print_only = parse_args([*base, "--max-image-bytes", "512M"])
    assert not print_only and config.ca_url == "https://ca:1"
    assert config.ca_root == "simulation" and config.ca_mrenclave == (measure("ca").hex,)
    assert config.max_image_bytes == 512 << 20
    tdx, _ = parse_args([*base, "--platform", "tdx", "--ca-mrenclave", "AB" * 32])
    assert tdx.ca_root == "intel" and tdx.ca_mrenclave == ("ab" * 32,)
    with pytest.raises(ConfigError, match="needs --ca-mrenclave"):
        parse_args([*base, "--platform", "tdx"])
    with pytest.raises(ConfigError, match="64 hex digits"):
        parse_args([*base, "--ca-mrenclave", "abc"])
    with pytest.raises(ConfigError, match="https://"):
        parse_args([*base[:-1], "http://ca:1"])
    with pytest.raises(ConfigError, match="not a size"):
        parse_args([*base, "--max-image-bytes", "lots"])
    out = io.StringIO()
    with redirect_stdout(out):
        assert server.main([*base, "--ca-mrenclave", CA_MRENCLAVE, "--print-mrconfigid"]) == 0
    expected = mr_config_id(
        {
            "format": "modelyo-agent-config-v1",
            "ca_url": "https://ca:1",
            "ca_mrenclave": [CA_MRENCLAVE],
            "ca_root": "simulation",
            "platform": "simulated",
        }
    )
    assert out.getvalue().strip() == expected.hex()


# --- state -------------------------------------------------------------------------------------


def test_state_is_private_its_key_persists_and_one_agent_serves_it(tmp_path):
    directory = tmp_path / "state"
    state = AgentState.open(directory)
    assert state.created
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(state.key_path.stat().st_mode) == 0o600
    with pytest.raises(StateError, match=f"another modelyo-agent \\(pid {os.getpid()}\\)"):
        AgentState.open(directory)
    spki = state.spki
    state.close()
    again = AgentState.open(directory)
    assert not again.created and again.spki == spki
    again.close()
    os.chmod(directory, 0o755)
    with pytest.raises(StateError, match="open to other users"):
        AgentState.open(directory)


# --- registration ------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap():
    assert [backoff_delay(n, cap=10) for n in range(7)] == [0, 1, 2, 4, 8, 10, 10]
    assert backoff_delay(10_000, cap=60) == 60


def test_the_registrar_retries_says_why_and_stops_at_success(registered):
    record = registered.state.registration
    reasons = ["CA unreachable: connection refused", "the CA refused the registration: no"]
    seen: list[str] = []
    done: list[RegistrationRecord] = []
    status = RegistrationStatus()

    def attempt() -> RegistrationRecord:
        seen.append(status.reason)
        if reasons:
            raise RegistrationError(reasons.pop(0))
        return record

    registrar = Registrar(attempt, status, on_registered=done.append, cap=0.01, initial=0.001)
    assert registrar.run() == record
    assert seen == [
        "the first attempt is under way",
        "CA unreachable: connection refused",
        "the CA refused the registration: no",
    ]
    assert status.failures == 2 and status.record == record and done == [record]


def test_a_registrar_stops_when_told(tmp_path):
    status = RegistrationStatus()
    registrar = Registrar(
        lambda: (_ for _ in ()).throw(RegistrationError("CA unreachable: down")),
        status,
        on_registered=lambda _r: None,
        cap=30,
        initial=30,
    )
    thread = threading.Thread(target=registrar.run)
    thread.start()
    while status.failures == 0:
        time.sleep(0.01)
    registrar.stop()
    thread.join(5)
    assert not thread.is_alive() and status.record is None


def test_an_unreachable_ca_is_the_reason(agent):
    config = _config(agent.config.state_dir, agent.config.sim_dir, ca_url="https://127.0.0.1:9")
    with pytest.raises(RegistrationError, match=r"^CA unreachable: cannot connect"):
        register(config, agent.platform, agent.state)


def test_registration_answers_for_another_key_or_root_are_refused(agent, ca, tmp_path, sim_dir):
    result = ca.register_vm(agent.registration_request())
    root = ca.store.root_certificate
    record = check_registration(result, root, agent.state, name="vm-1", ca_url=CA_URL)
    assert record.vm_id == result.vm_id and record.ca_fingerprint == pki.fingerprint(root)
    other = Agent(tmp_path / "other", sim_dir)
    try:
        with pytest.raises(RegistrationError, match="not for this agent's key"):
            check_registration(result, root, other.state, name="vm-1", ca_url=CA_URL)
    finally:
        other.close()
    _key, another_root = pki.create_root("another CA")
    with pytest.raises(RegistrationError, match="not the attested one"):
        check_registration(result, another_root, agent.state, name="vm-1", ca_url=CA_URL)


def test_a_ca_policy_without_this_mrtd_refuses_the_agent(agent, tmp_path, sim_dir):
    strict = _ca(tmp_path / "strict", sim_dir, "cd" * 48)
    with pytest.raises(ServiceError, match=r"vms\[0\]\.tdx\.allowed_mrtd"):
        strict.register_vm(agent.registration_request())


# --- before registration -----------------------------------------------------------------------


def test_before_registration_everything_answers_503_with_the_last_reason(agent):
    agent.status.failed("CA unreachable: connection refused")
    with pytest.raises(Unavailable, match=r"^not registered with the CA yet: CA unreachable"):
        agent.service.attestation("00" * 32)
    with pytest.raises(BadRequest, match="64 hex digits"):
        agent.service.attestation("00")
    with pytest.raises(Unavailable, match="not registered"):
        _claim(agent.service)
    with pytest.raises(Unavailable, match="not registered"):
        agent.service.gpus(None)
    with pytest.raises(Unavailable, match="not registered"):
        agent.service.containers(None)
    assert agent.runtime.calls == []


# --- attestation -------------------------------------------------------------------------------


def test_attestation_binds_the_key_and_nonce_with_gpu_evidence_over_reportdata(
    registered, sim_dir, agent_mrtd
):
    nonce = binding.new_nonce()
    body = registered.service.attestation(nonce.hex())
    record = registered.state.registration
    assert body.certificate_chain == [record.server_certificate, record.ca_certificate]
    assert body.simulated and body.vm_id == record.vm_id
    server_cert = pki.load_cert(record.server_certificate)
    verdict = ratls.verify_challenge(
        base64.b64decode(body.quote),
        nonce,
        server_cert,
        registered.platform.collateral(),
        root=TrustRoot.simulation(sim_dir),
        policy=TdxPolicy(
            allowed_mrtd=[agent_mrtd],
            allowed_mrconfigid=[registered.config.mr_config_id().hex()],
        ),
    )
    assert verdict.accepted, verdict.reason()
    gpu_nonce = binding.report_data(binding.spki_der(server_cert.public_key()), nonce)[:32]
    assert [g.nonce for g in body.gpus.gpus] == [gpu_nonce.hex()]
    assert body.gpus.gpus[0].verified and "verified" in body.gpus.detail
    gpus = simulated_platform(sim_dir / "gpu")
    ours = verify(
        body.gpus, gpu_nonce, roots=[gpus.device_root()], references=gpus.reference_measurements()
    )
    assert ours.gpus[0].verified
    # Another nonce gives another quote and other GPU evidence.
    assert registered.service.attestation(binding.new_nonce().hex()).quote != body.quote


def test_without_gpus_the_report_says_so(tmp_path, sim_dir, ca):
    agent = Agent(tmp_path / "nogpu", sim_dir, simulated_gpus=0)
    try:
        agent.register_with(ca)
        report = agent.service.attestation("11" * 32).gpus
        assert report.gpus == [] and "0 GPUs" in report.detail
    finally:
        agent.close()


# --- ownership ---------------------------------------------------------------------------------


def test_the_first_of_concurrent_claims_wins_durably(registered, ca, tmp_path, sim_dir):
    keys = [pki.new_key() for _ in range(20)]
    barrier = threading.Barrier(len(keys))

    def claim(key):
        barrier.wait()
        try:
            return key, _claim(registered.service, key)[1]
        except AlreadyOwned as exc:
            return key, exc

    with concurrent.futures.ThreadPoolExecutor(len(keys)) as pool:
        results = list(pool.map(claim, keys))
    winners = [(key, grant) for key, grant in results if not isinstance(grant, Exception)]
    refusals = [exc for _key, exc in results if isinstance(exc, Exception)]
    assert len(winners) == 1 and len(refusals) == 19
    assert all(exc.status == 409 and "already owned" in str(exc) for exc in refusals)
    key, grant = winners[0]
    record = registered.state.registration
    leaf = pki.load_cert(grant.client_certificate)
    pki.verify_chain(
        leaf,
        [pki.load_cert(record.issuer_certificate)],
        pki.load_cert(record.ca_certificate),
        role=pki.Role.VM_OWNER,
    )
    assert grant.issuer_certificate == record.issuer_certificate
    # A repeated claim with the owner's key gets the same certificate.
    assert _claim(registered.service, key)[1] == grant
    # Durable: a restarted agent (same state) still has this owner, and registers again.
    registered.close()
    again = Agent(registered.config.state_dir, sim_dir)
    try:
        assert again.state.owner is not None
        assert again.state.owner.certificate == grant.client_certificate
        again.register_with(ca)
        with pytest.raises(AlreadyOwned, match="already owned"):
            _claim(again.service)
        again.service.authenticate(leaf)  # the owner's certificate still verifies
    finally:
        again.close()


def test_an_owner_file_cut_short_is_set_aside(tmp_path, sim_dir):
    directory = tmp_path / "state"
    AgentState.open(directory).close()
    (directory / OWNER_FILE).write_text('{"spki_sha2')  # a crash under O_EXCL creation
    state = AgentState.open(directory)
    try:
        assert state.owner is None
        assert [p.name.startswith(f"{OWNER_FILE}.void-") for p in directory.iterdir()].count(True)
    finally:
        state.close()


def test_who_may_make_owner_calls(registered, ca, tmp_path, sim_dir):
    service = registered.service
    _key, grant = _claim(service)
    owner_cert = pki.load_cert(grant.client_certificate)
    service.authenticate(owner_cert)
    with pytest.raises(Unauthenticated, match=r"tdx_client\.pem"):
        service.authenticate(None)
    record = registered.state.registration
    # Issued by this VM's issuer but for another key: not the owner.
    stranger = pki.issue(
        pki.new_key().public_key(),
        issuer_key=registered.state.key,
        issuer_cert=pki.load_cert(record.issuer_certificate),
        role=pki.Role.VM_OWNER,
        common_name="stranger",
    )
    with pytest.raises(Forbidden, match="not the VM owner's"):
        service.authenticate(stranger)
    # This VM's own server certificate: chains to the root, wrong role and issuer.
    with pytest.raises(Forbidden, match="refused"):
        service.authenticate(pki.load_cert(record.server_certificate))
    # The owner certificate of another VM registered with the same CA.
    other = Agent(tmp_path / "other", sim_dir)
    try:
        other.register_with(ca)
        _other_key, other_grant = _claim(other.service)
        with pytest.raises(Forbidden, match=record.vm_id):
            service.authenticate(pki.load_cert(other_grant.client_certificate))
        service.authenticate(owner_cert)
    finally:
        other.close()


# --- containers --------------------------------------------------------------------------------


@pytest.fixture
def owned(registered) -> tuple[Agent, object]:
    _key, grant = _claim(registered.service)
    return registered, pki.load_cert(grant.client_certificate)


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (ContainerNotFoundError("no container named 'x'"), 404, "not-found"),
        (ContainerConflictError("exists already"), 409, "conflict"),
        (UploadTooLargeError("too big"), 413, "too-large"),
        (ContainerError("the Docker engine does not answer"), 500, "engine-error"),
    ],
)
def test_runtime_errors_become_their_status(owned, error, status, code):
    agent, peer = owned
    agent.runtime.error = error
    with pytest.raises(ServiceError) as raised:
        agent.service.start(peer, "x")
    assert (raised.value.status, raised.value.code) == (status, code)
    assert str(raised.value) == str(error)


def test_uploads_are_counted_and_limited_before_reading(owned):
    agent, peer = owned
    result = agent.service.load(peer, iter([b"abc", b"defg"]), declared=7)
    assert result.bytes_received == 7 and agent.runtime.received == b"abcdefg"
    assert agent.runtime.calls[-1] == ("load", (1000,))

    def never() -> Iterator[bytes]:
        raise AssertionError("read an upload that was refused by its length")
        yield b""

    with pytest.raises(TooLarge, match="--max-image-bytes"):
        agent.service.load(peer, never(), declared=1001)


def test_streams_fail_with_a_status_before_their_first_byte(owned):
    agent, peer = owned
    assert b"".join(agent.service.get_archive(peer, "c", "/out")) == b"tar-1tar-2"
    agent.runtime.archive_error = ContainerNotFoundError("there is no /nope in container c")
    with pytest.raises(NotFound, match="no /nope"):
        agent.service.get_archive(peer, "c", "/nope")
    with pytest.raises(BadRequest, match="absolute path"):
        agent.service.get_archive(peer, "c", "relative")

    def cut_off() -> Iterator[bytes]:
        yield b"part"
        raise ContainerError("the Docker engine does not answer")

    agent.runtime.archive_error = None
    agent.runtime.archive = cut_off()
    stream = agent.service.get_archive(peer, "c", "/out")
    assert next(stream) == b"part"  # the status (200) is sent by now...
    with pytest.raises(ContainerError):  # ...so the response is aborted, never ended cleanly
        next(stream)
    assert b"".join(agent.service.logs(peer, "c", True)) == b"hello\n"
    assert ("inspect", ("c",)) in agent.runtime.calls
    agent.runtime.error = ContainerNotFoundError("no container named 'z'")
    with pytest.raises(NotFound):
        agent.service.logs(peer, "z", False)


def test_owner_calls_reach_the_runtime_only_for_the_owner(owned):
    agent, peer = owned
    assert agent.service.wait(peer, "c", 5.0).exit_code == 0
    assert agent.service.stop(peer, "c").name == "c"
    agent.service.delete(peer, "c")
    calls = [name for name, _args in agent.runtime.calls]
    assert calls == ["wait", "stop", "delete"]
    with pytest.raises(Unauthenticated):
        agent.service.delete(None, "c")
    assert len(agent.runtime.calls) == 3


def test_key_ids_allow_every_id_only_with_the_wildcard():
    assert "anything" in server.KeyIds(["*"])
    assert "default" in server.KeyIds(["default"]) and "other" not in server.KeyIds(["default"])
    assert list(server.KeyIds(["b", "a"])) == ["a", "b"]


def test_nothing_secret_is_in_the_state_files_but_the_key(registered):
    _claim(registered.service)
    for path in registered.state.directory.iterdir():
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
            if path.name != "agent.key":
                assert b"PRIVATE KEY" not in path.read_bytes(), path
    saved = json.loads((registered.state.directory / "registration.json").read_text())
    assert saved["vm_id"] == registered.state.registration.vm_id
