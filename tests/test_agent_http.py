"""The real `modelyo-agent` registered with a real `modelyo-ca`, both on loopback, TLS 1.3.

One CA and one agent (one SIMULATED GPU) serve the module; a second CA whose policy does not
admit the agent, and a second agent for it, show the refusal. The container round trip uses the
machine's Docker engine (marked `docker`).
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import io
import json
import ssl
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import httpx
import pytest

from modelyo import dev, pki
from modelyo.api import agent as api
from modelyo.api import ca as ca_api
from modelyo.api.ca import CaPolicy, VmRule
from modelyo.attestation import binding
from modelyo.attestation.policy import TdxPolicy
from modelyo.attestation.quote import parse_quote
from modelyo.attestation.verify import TrustRoot
from modelyo.client import agent as agent_client
from modelyo.client.ca import CaClient
from modelyo.client.tls import pinned_context
from modelyo.errors import KeyUnavailableError, ModelyoError
from modelyo.gpu import simulated_platform, verify
from modelyo.measure import measure
from modelyo.tee.sim import SimulatedPlatform
from tdx_agent import server
from tdx_agent.config import measured_config, mr_config_id
from tests.helpers.agent_process import AgentProcess, start_agent
from tests.helpers.ca_process import (
    CaProcess,
    claim_csr,
    https_client,
    start_ca,
    tls_context,
    tls_version,
    write_identity,
)

CLAIMS = 20


def _policy_file(directory: Path, mrtd: str) -> Path:
    policy = CaPolicy(
        root="simulation",
        vms=[VmRule(name="agents", tdx=TdxPolicy(allowed_mrtd=[mrtd]), key_ids=["*"])],
    )
    path = directory / f"policy-{mrtd[:8]}.json"
    path.write_text(policy.model_dump_json())
    return path


# --- the module's stack ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sim")


@pytest.fixture(scope="module")
def ca(tmp_path_factory, sim_dir) -> Iterator[CaProcess]:
    directory = tmp_path_factory.mktemp("ca")
    policy = _policy_file(directory, measure("agent").hex)
    with start_ca(directory / "state", sim_dir, "--vm-policy", str(policy)) as process:
        yield process


@pytest.fixture(scope="module")
def agent(tmp_path_factory, sim_dir, ca) -> Iterator[AgentProcess]:
    directory = tmp_path_factory.mktemp("agent")
    with start_agent(directory / "state", sim_dir, ca.url, "--simulated-gpus", "1") as process:
        process.wait_registered()
        yield process


@pytest.fixture(scope="module")
def ca_owner(tmp_path_factory, ca) -> Iterator[CaClient]:
    """The CA's owner (step 1 of onboarding), to read the VM's certificate as the tool does."""
    directory = tmp_path_factory.mktemp("ca-owner")
    key, csr = claim_csr("ca owner")
    with https_client(ca.url) as client:
        response = client.post(ca_api.OWNERSHIP, json={"csr": csr})
    assert response.status_code == 200, response.text
    grant = ca_api.OwnershipGrant.model_validate_json(response.content)
    cert_file, key_file = write_identity(
        directory, "ca_client", key, pki.load_cert(grant.client_certificate)
    )
    with CaClient(ca.url, grant.ca_certificate, client_cert=cert_file, client_key=key_file) as c:
        yield c


@pytest.fixture(scope="module")
def vm(ca_owner) -> ca_api.VmInfo:
    vms = ca_owner.list_vms().vms
    assert [v.name for v in vms] == ["test-agent"]
    return vms[0]


@pytest.fixture(scope="module")
def race(agent) -> list[tuple[object, int, dict]]:
    """CLAIMS concurrent first claims over real TLS: (key, status, body) each."""
    claims = [claim_csr(f"claimant {i}") for i in range(CLAIMS)]

    def claim(index: int) -> tuple[object, int, dict]:
        key, csr = claims[index]
        with https_client(agent.url) as client:
            response = client.post(api.OWNERSHIP, json={"csr": csr})
        return key, response.status_code, response.json()

    with concurrent.futures.ThreadPoolExecutor(CLAIMS) as pool:
        return list(pool.map(claim, range(CLAIMS)))


@pytest.fixture(scope="module")
def owner(tmp_path_factory, race, ca) -> tuple[Path, Path, api.OwnershipGrant]:
    """The race winner's client certificate chain [leaf, VM issuer] and key, as files."""
    (key, _status, body), *_ = [entry for entry in race if entry[1] == 200]
    grant = api.OwnershipGrant.model_validate(body)
    cert_file, key_file = write_identity(
        tmp_path_factory.mktemp("owner"),
        "tdx_client",
        key,
        pki.load_cert(grant.client_certificate),
        pki.load_cert(grant.issuer_certificate),
    )
    return cert_file, key_file, grant


def _owner_client(agent, ca, vm, owner) -> agent_client.AgentClient:
    cert_file, key_file, grant = owner
    return agent_client.AgentClient(
        agent.url,
        grant.ca_certificate,
        pki.load_cert(vm.server_certificate),
        client_cert=cert_file,
        client_key=key_file,
    )


# --- registration and attestation ------------------------------------------------------------


def test_the_agent_registers_and_its_attestation_verifies(agent, ca, vm, sim_dir):
    assert "SIMULATED platform" in agent.ready_line
    assert agent.mrtd == measure("agent").hex
    expected_config = mr_config_id(
        measured_config(ca.url, [ca.mrenclave], "simulation", "simulated")
    )
    assert agent.mrconfigid == expected_config.hex()
    assert vm.measurements["mrtd"] == agent.mrtd
    log = agent.log()
    assert f"registered with the CA as VM {vm.vm_id}" in log
    assert "BEGIN" not in log and "PRIVATE" not in log  # no keys or certificates in the log

    nonce = binding.new_nonce()
    body, presented = agent_client.fetch_attestation(agent.url, nonce)
    root = pki.load_cert(body.certificate_chain[-1])
    assert pki.fingerprint(root) == ca.root_fingerprint
    attested = agent_client.check_attestation(
        agent.url,
        body,
        presented,
        nonce,
        ca_root=root,
        vm_certificate=pki.load_cert(vm.server_certificate),
        trust=TrustRoot.simulation(sim_dir),
        policy=TdxPolicy(allowed_mrtd=[agent.mrtd], allowed_mrconfigid=[agent.mrconfigid]),
    )
    assert attested.simulated and attested.vm_id == vm.vm_id
    # GPU evidence: over REPORTDATA[0:32] of this very quote, verified by the agent and by us.
    report_data = parse_quote(base64.b64decode(body.quote)).report_data
    assert report_data == binding.report_data(binding.spki_der(presented.public_key()), nonce)
    assert len(body.gpus.gpus) == 1
    gpu = body.gpus.gpus[0]
    assert gpu.nonce == report_data[:32].hex() and gpu.simulated and gpu.verified, gpu.problems
    gpus = simulated_platform(sim_dir / "gpu")
    ours = verify(
        body.gpus,
        report_data[:32],
        roots=[gpus.device_root()],
        references=gpus.reference_measurements(),
    )
    assert ours.gpus[0].verified, ours.gpus[0].problems
    # Evidence bound to another nonce is refused.
    assert (
        not verify(
            body.gpus,
            bytes(32),
            roots=[gpus.device_root()],
            references=gpus.reference_measurements(),
        )
        .gpus[0]
        .verified
    )


def test_attestation_is_tls13_with_the_ca_issued_chain_and_checks_the_nonce(agent, ca, vm):
    with https_client(agent.url) as client:
        bad = client.get(api.ATTESTATION, params={"nonce": "abc"})
        good = client.get(api.ATTESTATION, params={"nonce": binding.new_nonce().hex()})
        assert good.status_code == 200 and tls_version(good) == "TLSv1.3"
    assert bad.status_code == 400 and bad.json()["error"] == "bad-request"
    assert "64 hex digits" in bad.json()["detail"]
    with pytest.raises(httpx.ConnectError):
        with https_client(agent.url, tls_context(maximum_version=ssl.TLSVersion.TLSv1_2)) as c:
            c.get(api.ATTESTATION, params={"nonce": binding.new_nonce().hex()})
    # Pinned to the CA root, the agent's chain verifies (the tool's every later call).
    with httpx.Client(base_url=agent.url, verify=pinned_context(_root(ca))) as c:
        assert c.get(api.ATTESTATION, params={"nonce": "00" * 32}).status_code == 200


def _root(ca: CaProcess) -> str:
    with https_client(ca.url) as client:
        body = client.get(ca_api.ATTESTATION, params={"nonce": "00" * 32}).json()
    return body["certificate_chain"][-1]


def test_an_agent_the_policy_does_not_admit_is_refused_and_says_why(tmp_path, sim_dir):
    policy = _policy_file(tmp_path, "ab" * 48)
    with start_ca(tmp_path / "ca", sim_dir, "--vm-policy", str(policy)) as strict:
        with start_agent(tmp_path / "agent", sim_dir, strict.url, "--retry-max", "2") as refused:
            log = refused.wait_for_log("registration with the CA failed")
            assert "the CA refused the registration (HTTP 422 refused)" in log
            assert "vms[0].tdx.allowed_mrtd" in log
            response = refused.attestation_response()
            assert response.status_code == 503
            detail = response.json()["detail"]
            assert detail.startswith("not registered with the CA yet: the CA refused")
            assert "vms[0].tdx.allowed_mrtd" in detail
            _key, csr = claim_csr()
            with https_client(refused.url) as client:
                claim = client.post(api.OWNERSHIP, json={"csr": csr})
                gpus = client.get(api.GPUS)
            assert claim.status_code == 503 and gpus.status_code == 503
            assert refused.process.poll() is None  # it keeps trying
    assert refused.process.returncode == 0  # SIGTERM: clean exit


def test_an_unreachable_ca_is_named_as_the_reason(tmp_path, sim_dir):
    with start_agent(tmp_path / "agent", sim_dir, "https://127.0.0.1:9", "--retry-max", "1") as a:
        a.wait_for_log("CA unreachable")
        detail = a.attestation_response().json()["detail"]
        assert "not registered with the CA yet: CA unreachable" in detail


# --- ownership ---------------------------------------------------------------------------------


def test_the_first_of_concurrent_claims_wins_and_the_rest_are_told_already_owned(race, agent):
    statuses = sorted(status for _key, status, _body in race)
    assert statuses == [200] + [409] * (CLAIMS - 1)
    for _key, status, body in race:
        if status == 409:
            assert body["error"] == "already-owned" and "already owned" in body["detail"]
    (key, _status, body), *_ = [entry for entry in race if entry[1] == 200]
    grant = api.OwnershipGrant.model_validate(body)
    leaf, issuer = (
        pki.load_cert(grant.client_certificate),
        pki.load_cert(grant.issuer_certificate),
    )
    root = pki.load_cert(grant.ca_certificate)
    pki.verify_chain(leaf, [issuer], root, role=pki.Role.VM_OWNER)
    assert pki.role_of(issuer) is pki.Role.VM_ISSUER
    # The winner claiming again (its answer lost) gets the same certificate.
    csr = pki.csr_pem(pki.make_csr(key, "again"))
    with https_client(agent.url) as client:
        again = client.post(api.OWNERSHIP, json={"csr": csr})
    assert again.status_code == 200 and again.json() == body
    assert "ownership granted to 'claimant" in agent.log()


def test_owner_calls_need_this_vms_owner_certificate(agent, ca, vm, owner, tmp_path, sim_dir):
    grant = owner[2]
    # The owner: accepted (GET /v1/gpus needs no Docker).
    with _owner_client(agent, ca, vm, owner) as client:
        assert len(client.gpus().gpus) == 1
    # No certificate: 401.
    with httpx.Client(base_url=agent.url, verify=pinned_context(grant.ca_certificate)) as plain:
        response = plain.get(api.GPUS)
    assert response.status_code == 401 and response.json()["error"] == "unauthenticated"
    assert "tdx_client.pem" in response.json()["detail"]
    # A certificate from a foreign CA: the TLS handshake refuses it.
    foreign_key, foreign_root = pki.create_root("foreign")
    leaf_key = pki.new_key()
    foreign = pki.issue(
        leaf_key.public_key(),
        issuer_key=foreign_key,
        issuer_cert=foreign_root,
        role=pki.Role.VM_OWNER,
        common_name="intruder",
    )
    files = write_identity(tmp_path, "foreign", leaf_key, foreign, foreign_root)
    context = pinned_context(grant.ca_certificate, client_cert=files[0], client_key=files[1])
    with pytest.raises(httpx.HTTPError):
        with httpx.Client(base_url=agent.url, verify=context) as client:
            client.get(api.GPUS)
    # The CA root is trusted by the handshake, but another VM's issuer is not this VM's: 403.
    other_key, other_issuer = _register_another_vm(ca, sim_dir, grant.ca_certificate)
    leaf = pki.issue(
        leaf_key.public_key(),
        issuer_key=other_key,
        issuer_cert=other_issuer,
        role=pki.Role.VM_OWNER,
        common_name="other vm's owner",
    )
    files = write_identity(tmp_path, "other", leaf_key, leaf, other_issuer)
    context = pinned_context(grant.ca_certificate, client_cert=files[0], client_key=files[1])
    with httpx.Client(base_url=agent.url, verify=context) as client:
        response = client.get(api.GPUS)
    assert response.status_code == 403 and response.json()["error"] == "forbidden"
    assert vm.vm_id in response.json()["detail"]


def _register_another_vm(ca, sim_dir, root_pem):
    """A second (simulated) TD registered with the CA: its key and vm-issuer certificate."""
    td = SimulatedPlatform(sim_dir).tdx_guest(mr_td=measure("agent").value)
    key = pki.new_key()
    request = ca_api.VmRegistration(
        name="other-vm",
        csr=pki.csr_pem(pki.make_csr(key, "other-vm")),
        quote=base64.b64encode(
            td.get_quote(binding.report_data(binding.spki_der(key.public_key())))
        ).decode(),
        collateral=SimulatedPlatform(sim_dir).collateral("tdx").json_text,
    )
    with httpx.Client(base_url=ca.url, verify=pinned_context(root_pem)) as client:
        response = client.post(
            ca_api.VMS,
            content=request.model_dump_json(),
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 200, response.text
    result = ca_api.VmRegistrationResult.model_validate_json(response.content)
    return key, pki.load_cert(result.issuer_certificate)


# --- keys for the containers ------------------------------------------------------------------


def test_container_keys_come_from_the_ca_and_a_refusal_carries_its_detail(agent, ca, ca_owner):
    record = json.loads((agent.state_dir / "registration.json").read_text())

    def key_source():
        return server.ca_key_source(
            ca.url,
            record["ca_certificate"],
            agent.state_dir / "vm_client.pem",
            agent.state_dir / "agent.key",
        )

    keys = key_source()
    released = keys.key("default", None)
    assert keys.key("default", None) is released  # released once, kept in memory
    assert base64.b64decode(ca_owner.release_key("default").key) == released.key
    policy = ca_owner.policy()
    rule = policy.vms[0].model_copy(update={"key_ids": ["default"]})
    ca_owner.set_policy(policy.model_copy(update={"vms": [rule]}))
    try:
        with pytest.raises(KeyUnavailableError, match="may not receive key id 'project-x'"):
            key_source().key("project-x", None)
    finally:
        ca_owner.set_policy(policy)


# --- containers --------------------------------------------------------------------------------


@pytest.fixture
def tiny_image(docker_client, tmp_path) -> Iterator[tuple[Path, str]]:
    """A `docker save` tarball of a one-file image (a static tini) that is not on the engine."""
    context = tmp_path / "context"
    context.mkdir()
    (context / "tini").write_bytes(Path("/usr/bin/docker-init").read_bytes())
    (context / "tini").chmod(0o755)
    (context / "Dockerfile").write_text(
        f"FROM scratch\nCOPY tini /tini\nLABEL test={uuid.uuid4().hex}\n"
    )
    tag = f"modelyo-test/agent-http:{uuid.uuid4().hex[:12]}"
    image, _ = docker_client.images.build(path=str(context), tag=tag, network_mode="none")
    tarball = tmp_path / "image.tar"
    with tarball.open("wb") as out:
        for chunk in image.save(named=True):
            out.write(chunk)
    docker_client.images.remove(image.id, force=True)
    yield tarball, tag
    with contextlib.suppress(docker.errors.ImageNotFound):
        docker_client.images.remove(image.id, force=True)


@pytest.mark.docker
def test_a_container_round_trip_through_the_agent(
    agent, ca, vm, owner, tiny_image, docker_client, tmp_path
):
    tarball, tag = tiny_image
    name = f"modelyo-test-{uuid.uuid4().hex[:10]}"
    try:
        with _owner_client(agent, ca, vm, owner) as client:
            loaded = client.load_image(agent_client.file_chunks(tarball))
            assert loaded.bytes_received == tarball.stat().st_size
            assert [image.tags for image in loaded.images] == [[tag]]
            assert tag in [t for image in client.images().images for t in image.tags]

            spec = api.ContainerSpec(image=tag, name=name, command=["/tini", "--version"])
            created = client.create(spec)
            assert created.status == "created" and created.key_id == "default"
            with pytest.raises(ModelyoError, match="exists already"):
                client.create(spec)
            assert client.start(name).name == name
            result = client.wait(name, timeout=30)
            assert result.exit_code == 0 and not result.timed_out
            assert b"tini version" in b"".join(client.logs(name, follow=True))
            assert client.inspect(name).status == "exited"
            assert name in [c.name for c in client.containers().containers]

            # Archive copy in, then out again.
            payload = tmp_path / "hello.txt"
            payload.write_bytes(b"hello from the owner\n")
            spool = tmp_path / "in.tar"
            with tarfile.open(spool, "w") as archive:
                archive.add(payload, arcname="hello.txt")
            client.put_archive(name, "/", agent_client.file_chunks(spool))
            out = b"".join(client.get_archive(name, "/hello.txt"))
            with tarfile.open(fileobj=io.BytesIO(out)) as archive:
                member = archive.extractfile("hello.txt")
                assert member is not None and member.read() == b"hello from the owner\n"
            with pytest.raises(ModelyoError, match="no /nope"):
                list(client.get_archive(name, "/nope"))

            client.delete(name)
            with pytest.raises(ModelyoError) as missing:
                client.inspect(name)
            assert getattr(missing.value, "status", None) == 404
    finally:
        for container in docker_client.containers.list(all=True, filters={"name": name}):
            container.remove(force=True)
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_client.images.remove(tag, force=True)


# --- the local stack ---------------------------------------------------------------------------


def test_dev_up_starts_the_ca_and_a_registered_agent_and_down_stops_both(stack):
    directory = Path(stack.dev_dir)
    assert dev.running_endpoints(directory) == {"ca": stack.ca.url, "tdx": stack.agent.url}
    services = dev.status(directory)["services"]
    assert services["ca"]["running"] and services["agent"]["running"]
    assert services["agent"]["registered"] is True
    log = Path(stack.agent.log).read_text()
    assert "SIMULATED platform" in log and "registered with the CA as VM" in log
    with https_client(stack.agent.url) as client:
        body = client.get(api.ATTESTATION, params={"nonce": binding.new_nonce().hex()}).json()
    assert [gpu.get("verified") for gpu in body["gpus"]["gpus"]] == [True]  # one SIMULATED GPU
    assert dev.down(directory) == ["agent", "ca"]
    assert dev.running_endpoints(directory) is None
