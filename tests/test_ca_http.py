"""The real `modelyo-ca` process on 127.0.0.1, over real TLS 1.3, with and without client
certificates: what a user, a VM and an attacker on the network each get."""

from __future__ import annotations

import base64
import hashlib
import random
import signal
import ssl
import threading
from pathlib import Path

import httpx
import pytest

from modelyo import audit, pki
from modelyo.api import ca as api
from modelyo.attestation import binding, ratls
from modelyo.attestation.collateral import Collateral
from modelyo.attestation.policy import SgxPolicy, TdxPolicy
from modelyo.attestation.verify import TrustRoot
from modelyo.cli.main import main as modelyo_main
from modelyo.measure import measure
from modelyo.tee.sim import SimulatedPlatform
from tests.helpers.ca_process import (
    CaProcess,
    claim_csr,
    https_client,
    peer_certificate,
    run_ca,
    start_ca,
    tls_context,
    tls_version,
    write_identity,
)

pytestmark = pytest.mark.slow

AGENT_MRTD = hashlib.sha384(b"http test agent").digest()


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sim")


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory) -> Path:
    policy = api.CaPolicy(
        root="simulation",
        vms=[
            api.VmRule(
                name="agents", tdx=TdxPolicy(allowed_mrtd=[AGENT_MRTD.hex()]), key_ids=["default"]
            )
        ],
    )
    path = tmp_path_factory.mktemp("policy") / "vm-policy.json"
    path.write_text(policy.model_dump_json())
    return path


@pytest.fixture(scope="module")
def ca(tmp_path_factory, sim_dir, policy_file):
    base = tmp_path_factory.mktemp("ca")
    with start_ca(base / "state", sim_dir, "--vm-policy", str(policy_file)) as process:
        yield process


@pytest.fixture(scope="module")
def root_pem(ca) -> str:
    with https_client(ca.url) as client:
        response = client.get(api.ATTESTATION, params={"nonce": "00" * 32})
    return response.json()["certificate_chain"][1]


@pytest.fixture(scope="module")
def owner_files(ca, root_pem, tmp_path_factory):
    """Ownership of the module's CA, claimed once: (cert file, key file)."""
    key, csr = claim_csr("http test owner")
    with https_client(ca.url, tls_context(root_pem)) as client:
        response = client.post(api.OWNERSHIP, json={"csr": csr})
    assert response.status_code == 200, response.text
    cert = pki.load_cert(response.json()["client_certificate"])
    return write_identity(tmp_path_factory.mktemp("owner"), "ca_client", key, cert)


def owner_client(ca: CaProcess, root_pem: str, owner_files) -> httpx.Client:
    cert_file, key_file = owner_files
    return https_client(ca.url, tls_context(root_pem, cert_file=cert_file, key_file=key_file))


def register_vm(ca: CaProcess, sim_dir: Path, key=None) -> tuple[object, dict]:
    key = key or pki.new_key()
    sim = SimulatedPlatform(sim_dir)
    quote = sim.tdx_guest(mr_td=AGENT_MRTD).get_quote(
        binding.report_data(binding.spki_der(key.public_key()))
    )
    body = api.VmRegistration(
        name="gpu-vm",
        csr=pki.csr_pem(pki.make_csr(key, "gpu-vm")),
        quote=base64.b64encode(quote).decode(),
        collateral=sim.collateral("tdx").json_text,
        hosts=["127.0.0.1"],
    )
    with https_client(ca.url) as client:
        response = client.post(api.VMS, json=body.model_dump(mode="json"))
    assert response.status_code == 200, response.text
    return key, response.json()


# --- attestation and TLS --------------------------------------------------------------------


def test_attestation_binds_the_key_of_this_very_connection_and_the_nonce(ca, sim_dir):
    nonce = binding.new_nonce()
    with https_client(ca.url) as client:
        response = client.get(api.ATTESTATION, params={"nonce": nonce.hex()})
        assert tls_version(response) == "TLSv1.3"
        presented = peer_certificate(response)
    assert response.status_code == 200
    body = api.AttestationResponse.model_validate(response.json())
    assert body.simulated
    chain = [pki.load_cert(pem) for pem in body.certificate_chain]
    assert chain[0] == presented
    assert pki.fingerprint(chain[1]) == ca.root_fingerprint
    pki.verify_chain(presented, [], chain[1], role=pki.Role.CA_SERVER)
    assert ca.mrenclave == measure("ca").hex  # the CA runs as the code in this checkout
    verdict = ratls.verify_challenge(
        base64.b64decode(body.quote),
        nonce,
        presented,
        Collateral.from_json(body.collateral),
        root=TrustRoot.simulation(sim_dir),
        policy=SgxPolicy(allowed_mrenclave=[measure("ca").hex]),
        policy_name="ca",
    )
    assert verdict.accepted, verdict.reason()
    assert verdict.simulated
    # The certificate's own embedded quote binds the same key.
    embedded = ratls.verify_certificate(
        presented, Collateral.from_json(body.collateral), root=verdict_root(sim_dir), policy=None
    )
    assert embedded.accepted, embedded.reason()


def verdict_root(sim_dir: Path) -> TrustRoot:
    return TrustRoot.simulation(sim_dir)


def test_a_bad_nonce_is_400_with_the_error_format(ca):
    with https_client(ca.url) as client:
        response = client.get(api.ATTESTATION, params={"nonce": "abc"})
    assert response.status_code == 400
    assert response.json()["error"] == "bad-request"
    assert "64 hex digits" in response.json()["detail"]


def test_tls_1_2_is_refused(ca):
    with (
        https_client(ca.url, tls_context(maximum_version=ssl.TLSVersion.TLSv1_2)) as client,
        pytest.raises(httpx.ConnectError),
    ):
        client.get(api.ATTESTATION, params={"nonce": "00" * 32})


def test_the_openapi_schema_is_served(ca):
    with https_client(ca.url) as client:
        schema = client.get("/openapi.json").json()
    assert schema["info"]["title"] == "Modelyo CA"
    for path in (api.ATTESTATION, api.OWNERSHIP, api.VMS, api.VM_CERTIFICATE, api.POLICY,
                 api.KEY_RELEASE, api.KEY_ROTATE, api.AUDIT):  # fmt: skip
        assert path in schema["paths"], path


# --- client certificates --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", api.VMS), ("GET", api.POLICY), ("GET", api.AUDIT), ("POST", api.KEY_RELEASE),
     ("POST", api.KEY_ROTATE)],
)  # fmt: skip
def test_owner_calls_without_a_certificate_are_401(ca, root_pem, method, path):
    with https_client(ca.url, tls_context(root_pem)) as client:
        response = client.request(method, path, json={} if method == "POST" else None)
    assert response.status_code == 401
    assert response.json()["error"] == "unauthenticated"


def test_a_certificate_from_another_root_fails_the_handshake(ca, root_pem, tmp_path):
    other_key, other_root = pki.create_root("not the Modelyo CA")
    key = pki.new_key()
    cert = pki.issue(
        key.public_key(),
        issuer_key=other_key,
        issuer_cert=other_root,
        role=pki.Role.OWNER,
        common_name="mallory",
    )
    cert_file, key_file = write_identity(tmp_path, "foreign", key, cert)
    context = tls_context(root_pem, cert_file=cert_file, key_file=key_file)
    # In TLS 1.3 the client's side of the handshake ends before the server has checked the
    # client's certificate: the refusal shows as a connection closed with no HTTP answer.
    with https_client(ca.url, context) as client, pytest.raises(httpx.TransportError):
        client.get("/openapi.json")
    # The very same request without that certificate is answered: it was the certificate.
    with https_client(ca.url, tls_context(root_pem)) as client:
        assert client.get("/openapi.json").status_code == 200


def test_a_vm_registers_gets_its_keys_and_is_403_on_owner_calls(
    ca, sim_dir, root_pem, owner_files, tmp_path
):
    key, result = register_vm(ca, sim_dir)
    vm_cert = pki.load_cert(result["client_certificate"])
    cert_file, key_file = write_identity(tmp_path, "vm", key, vm_cert)
    with https_client(ca.url, tls_context(root_pem, cert_file=cert_file, key_file=key_file)) as vm:
        forbidden = vm.get(api.VMS)
        assert forbidden.status_code == 403
        assert "this call needs role owner" in forbidden.json()["detail"]
        released = vm.post(api.KEY_RELEASE, json={"key_id": "default"})
        assert released.status_code == 200
        refused = vm.post(api.KEY_RELEASE, json={"key_id": "payroll"})
        assert refused.status_code == 403 and "payroll" in refused.json()["detail"]
    with owner_client(ca, root_pem, owner_files) as owner:
        listed = owner.get(api.VMS).json()["vms"]
        assert result["vm_id"] in [vm["vm_id"] for vm in listed]
        fetched = owner.get(api.VM_CERTIFICATE.format(vm_id=result["vm_id"])).json()
        assert fetched["server_certificate"] == result["server_certificate"]
        assert owner.post(api.KEY_RELEASE, json={"key_id": "default"}).json() == released.json()


def test_a_vm_refused_by_policy_gets_422_naming_the_field(ca, sim_dir):
    sim = SimulatedPlatform(sim_dir)
    key = pki.new_key()
    quote = sim.tdx_guest(mr_td=bytes(48)).get_quote(
        binding.report_data(binding.spki_der(key.public_key()))
    )
    body = {
        "name": "intruder",
        "csr": pki.csr_pem(pki.make_csr(key, "intruder")),
        "quote": base64.b64encode(quote).decode(),
    }
    with https_client(ca.url) as client:
        response = client.post(api.VMS, json=body)
    assert response.status_code == 422
    assert response.json()["error"] == "refused"
    assert "vms[0].tdx.allowed_mrtd" in response.json()["detail"]


def test_invalid_json_is_400_not_422(ca):
    with https_client(ca.url) as client:
        response = client.post(api.VMS, json={"name": "x"})
    assert response.status_code == 400
    assert response.json()["error"] == "bad-request"


def test_owner_manages_policy_keys_and_audit_and_the_log_verifies(
    ca, root_pem, owner_files, tmp_path, capsys
):
    with owner_client(ca, root_pem, owner_files) as owner:
        policy = owner.get(api.POLICY).json()
        assert owner.put(api.POLICY, json=policy).status_code == 200
        first = owner.post(api.KEY_RELEASE, json={"key_id": "default"}).json()
        version = owner.post(api.KEY_ROTATE).json()["version"]
        assert version == first["version"] + 1
        again = owner.post(api.KEY_RELEASE, json={"key_id": "default", "version": 1}).json()
        assert again["key"] == owner.post(api.KEY_RELEASE, json={"version": 1}).json()["key"]
        missing = owner.post(api.KEY_RELEASE, json={"version": 99})
        assert missing.status_code == 404
        log = api.AuditLog.model_validate(owner.get(api.AUDIT).json())
    audit.verify_log(log.entries, pki.load_cert(root_pem))
    assert {audit.OWNERSHIP, audit.POLICY_CHANGED, audit.KEY_RELEASED, audit.KEY_ROTATED} <= {
        e.event for e in log.entries
    }
    path = tmp_path / "audit.json"
    path.write_text(log.model_dump_json())
    (tmp_path / "ca.pem").write_text(root_pem)
    assert modelyo_main(["audit", "verify", str(path), "--ca", str(tmp_path / "ca.pem")]) == 0
    assert "audit log verifies" in capsys.readouterr().out


# --- ownership races ------------------------------------------------------------------------


def _claim_all(url: str, root_pem: str, csrs: list[str], results: list, start: threading.Barrier):
    def one(index: int) -> None:
        try:
            with https_client(url, tls_context(root_pem)) as client:
                start.wait()
                response = client.post(api.OWNERSHIP, json={"csr": csrs[index]})
                results[index] = (response.status_code, response.json())
        except (httpx.HTTPError, threading.BrokenBarrierError) as exc:
            results[index] = ("error", str(exc))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(csrs))]
    for thread in threads:
        thread.start()
    return threads


def test_fifty_concurrent_claims_give_one_owner_and_49_refusals(tmp_path, sim_dir):
    with start_ca(tmp_path / "state", sim_dir) as fresh:
        with https_client(fresh.url) as client:
            root = client.get(api.ATTESTATION, params={"nonce": "00" * 32}).json()[
                "certificate_chain"
            ][1]
        keys, csrs = zip(*(claim_csr(f"claimant {i}") for i in range(50)), strict=True)
        results: list = [None] * 50
        for thread in _claim_all(fresh.url, root, list(csrs), results, threading.Barrier(50)):
            thread.join(60)
        statuses = [status for status, _ in results]
        assert statuses.count(200) == 1 and statuses.count(409) == 49, statuses
        for status, body in results:
            if status == 409:
                assert body["error"] == "already-owned" and "already owned" in body["detail"]
        winner = statuses.index(200)
        cert = pki.load_cert(results[winner][1]["client_certificate"])
        cert_file, key_file = write_identity(tmp_path, "winner", keys[winner], cert)
        context = tls_context(root, cert_file=cert_file, key_file=key_file)
        with https_client(fresh.url, context) as owner:
            assert owner.get(api.POLICY).status_code == 200


def test_kill_9_during_claims_and_a_restart_leave_exactly_one_owner(tmp_path, sim_dir):
    state = tmp_path / "state"
    claimants = [claim_csr(f"claimant {i}") for i in range(20)]
    csrs = [csr for _key, csr in claimants]
    results: list = [None] * len(csrs)
    process = start_ca(state, sim_dir)
    with https_client(process.url) as client:
        root = client.get(api.ATTESTATION, params={"nonce": "00" * 32}).json()["certificate_chain"][
            1
        ]
    start = threading.Barrier(len(csrs) + 1)
    threads = _claim_all(process.url, root, csrs, results, start)
    start.wait()
    threading.Event().wait(random.Random(7).uniform(0.0, 0.05))
    assert process.stop(signal.SIGKILL) == -signal.SIGKILL
    for thread in threads:
        thread.join(60)
    before = [i for i, (status, _body) in enumerate(results) if status == 200]
    assert len(before) <= 1

    with start_ca(state, sim_dir) as restarted:
        # Every claimant that got no answer retries with its own key: the CA answers each
        # as it now stands, and exactly one key is the owner.
        again: list = [None] * len(csrs)
        pending = [i for i in range(len(csrs)) if i not in before]
        barrier = threading.Barrier(len(pending))
        retry = _claim_all(restarted.url, root, [csrs[i] for i in pending], again, barrier)
        for thread in retry:
            thread.join(60)
        won_now = [pending[j] for j, result in enumerate(again) if result[0] == 200]
        assert all(result[0] in (200, 409) for result in again), again
        owners = set(before) | set(won_now)
        assert len(owners) == 1, (before, won_now)
        (index,) = owners
        key = claimants[index][0]
        if before:
            cert_pem = results[index][1]["client_certificate"]
        else:
            cert_pem = again[pending.index(index)][1]["client_certificate"]
        cert_file, key_file = write_identity(tmp_path, "owner", key, pki.load_cert(cert_pem))
        context = tls_context(root, cert_file=cert_file, key_file=key_file)
        with https_client(restarted.url, context) as owner:
            log = api.AuditLog.model_validate(owner.get(api.AUDIT).json())
        audit.verify_log(log.entries, pki.load_cert(root))
        assert [e.event for e in log.entries].count(audit.OWNERSHIP) == 1


# --- lifecycle ---------------------------------------------------------------------------------


def test_restart_keeps_the_ca_and_refuses_a_second_process_or_another_platform(tmp_path, sim_dir):
    state = tmp_path / "state"
    first = start_ca(state, sim_dir)
    with https_client(first.url) as client:
        root = client.get(api.ATTESTATION, params={"nonce": "00" * 32}).json()["certificate_chain"][
            1
        ]
        key, csr = claim_csr()
        grant = client.post(api.OWNERSHIP, json={"csr": csr}).json()
    cert_file, key_file = write_identity(
        tmp_path, "owner", key, pki.load_cert(grant["client_certificate"])
    )
    context = tls_context(root, cert_file=cert_file, key_file=key_file)
    with https_client(first.url, context) as owner:
        kek = owner.post(api.KEY_RELEASE, json={"key_id": "default"}).json()

    second = run_ca(state, sim_dir)  # same directory while the first serves it
    assert second.returncode == 1
    assert "another modelyo-ca" in second.stderr and str(first.pid) in second.stderr

    assert first.stop(signal.SIGTERM) == 0
    assert "stopped" in first.log()
    before = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file() and p.name != ".lock"}

    elsewhere = run_ca(state, tmp_path / "another-sim")
    assert elsewhere.returncode == 1
    assert "sealed by another CA build or platform" in elsewhere.stderr
    assert "new --state-dir" in elsewhere.stderr
    after = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == before  # never overwritten

    with start_ca(state, sim_dir) as restarted:
        assert restarted.root_fingerprint == first.root_fingerprint
        with https_client(
            restarted.url, tls_context(root, cert_file=cert_file, key_file=key_file)
        ) as owner:
            assert owner.post(api.KEY_RELEASE, json={"key_id": "default"}).json() == kek
        with https_client(restarted.url, tls_context(root)) as client:
            late = client.post(api.OWNERSHIP, json={"csr": claim_csr()[1]})
        assert late.status_code == 409 and "already owned" in late.json()["detail"]
