"""Every CA endpoint rule, without HTTP: the service with a real store on the simulated
platform, and callers identified by the certificates the TLS layer would have verified."""

from __future__ import annotations

import base64
import hashlib
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509

from ca_enclave.keyring import derive_kek
from ca_enclave.sealing import SimulatedSealer
from ca_enclave.service import (
    SIMULATED_MRSIGNER,
    BadRequest,
    CaService,
    Conflict,
    Forbidden,
    NotFound,
    Platform,
    Refused,
    Unauthenticated,
    issue_tls_identity,
)
from ca_enclave.store import Store
from modelyo import audit, pki
from modelyo.api.ca import (
    CaPolicy,
    KeyRequest,
    OwnershipClaim,
    VmRegistration,
    VmRule,
)
from modelyo.attestation import binding, ratls
from modelyo.attestation.collateral import Collateral
from modelyo.attestation.policy import SgxPolicy, TdxPolicy
from modelyo.attestation.verify import TrustRoot, verify_quote
from modelyo.pki import Role
from modelyo.tee.sim import SimulatedPlatform

MRENCLAVE = hashlib.sha256(b"service test CA build").digest()
AGENT_MRTD = hashlib.sha384(b"agent build").digest()
OTHER_MRTD = hashlib.sha384(b"another agent").digest()
HOSTS = ("ca.example", "127.0.0.1")


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> SimulatedPlatform:
    return SimulatedPlatform(tmp_path_factory.mktemp("sim"))


@pytest.fixture(scope="module")
def sim_root(sim) -> TrustRoot:
    return TrustRoot("simulation", sim.root_certificate_der(), simulated=True)


def _platform(sim: SimulatedPlatform) -> Platform:
    return Platform(
        name="simulated",
        provider=sim.sgx_enclave(MRENCLAVE, SIMULATED_MRSIGNER),
        simulated=True,
        collateral=lambda: sim.collateral("sgx"),
        sim_platform=sim,
    )


def make_service(directory: Path, sim: SimulatedPlatform, policy: CaPolicy | None) -> CaService:
    platform = _platform(sim)
    store = Store.open(directory, SimulatedSealer(sim, MRENCLAVE), initial_policy=policy)
    return CaService(store, platform, issue_tls_identity(store, platform.provider, HOSTS))


def agent_rule(name: str = "agents", key_ids=("default",), mrtd: bytes = AGENT_MRTD) -> VmRule:
    return VmRule(name=name, tdx=TdxPolicy(allowed_mrtd=[mrtd.hex()]), key_ids=list(key_ids))


@pytest.fixture
def ca(tmp_path, sim) -> CaService:
    return make_service(tmp_path / "state", sim, CaPolicy(root="simulation", vms=[agent_rule()]))


def claim(ca: CaService, name: str = "alice"):
    key = pki.new_key()
    grant = ca.claim_ownership(OwnershipClaim(csr=pki.csr_pem(pki.make_csr(key, name))))
    return key, pki.load_cert(grant.client_certificate)


@pytest.fixture
def owner(ca) -> x509.Certificate:
    return claim(ca)[1]


def vm_registration(
    sim: SimulatedPlatform,
    *,
    name: str = "gpu-vm-1",
    mrtd: bytes = AGENT_MRTD,
    key=None,
    bind_key=None,
    debug: bool = False,
    collateral: bool = True,
    hosts=("vm.example", "10.0.0.7"),
):
    key = key or pki.new_key()
    bound = bind_key or key
    guest = sim.tdx_guest(mr_td=mrtd, debug=debug)
    quote = guest.get_quote(binding.report_data(binding.spki_der(bound.public_key())))
    request = VmRegistration(
        name=name,
        csr=pki.csr_pem(pki.make_csr(key, name)),
        quote=base64.b64encode(quote).decode(),
        collateral=sim.collateral("tdx").json_text if collateral else None,
        hosts=list(hosts),
    )
    return key, request


def registered_vm(ca, sim, **kwargs):
    key, request = vm_registration(sim, **kwargs)
    result = ca.register_vm(request)
    return key, result, pki.load_cert(result.client_certificate)


def events(ca: CaService) -> list[str]:
    return [entry.event for entry in ca.store.audit_entries()]


# --- attestation -----------------------------------------------------------------------------


@pytest.mark.parametrize("nonce", ["", "00" * 31, "00" * 33, "zz" * 32, "00" * 32 + "\n"])
def test_attestation_refuses_anything_but_32_bytes_of_hex(ca, nonce):
    with pytest.raises(BadRequest, match="64 hex digits"):
        ca.attestation(nonce)


def test_attestation_binds_the_tls_key_and_the_nonce(ca, sim, sim_root):
    nonce = bytes(range(32))
    response = ca.attestation(nonce.hex())
    assert response.simulated and response.tee == "sgx"
    tls_cert, root = (pki.load_cert(pem) for pem in response.certificate_chain)
    assert root == ca.store.root_certificate and tls_cert == ca.tls.certificate
    verdict = ratls.verify_challenge(
        base64.b64decode(response.quote),
        nonce,
        tls_cert,
        Collateral.from_json(response.collateral),
        root=sim_root,
        policy=SgxPolicy(
            allowed_mrenclave=[MRENCLAVE.hex()], allowed_mrsigner=[SIMULATED_MRSIGNER.hex()]
        ),
    )
    assert verdict.accepted, verdict.reason()
    # Another nonce does not verify against this quote.
    other = ratls.verify_challenge(
        base64.b64decode(response.quote),
        bytes(32),
        tls_cert,
        Collateral.from_json(response.collateral),
        root=sim_root,
        policy=None,
    )
    assert [c.name for c in other.failures] == ["report data"]


def test_tls_certificate_is_root_issued_ca_server_with_an_embedded_quote(ca, sim, sim_root):
    cert = ca.tls.certificate
    pki.verify_chain(cert, [], ca.store.root_certificate, role=Role.CA_SERVER)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["ca.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    extension = cert.extensions.get_extension_for_oid(ratls.QUOTE_OID)
    assert not extension.critical
    verdict = ratls.verify_certificate(
        cert,
        sim.collateral("sgx"),
        root=sim_root,
        policy=SgxPolicy(allowed_mrenclave=[MRENCLAVE.hex()]),
    )
    assert verdict.accepted, verdict.reason()


# --- ownership -------------------------------------------------------------------------------


def test_first_claim_gets_an_owner_certificate_for_its_own_key(ca):
    key, cert = claim(ca, "alice laptop")
    pki.verify_chain(cert, [], ca.store.root_certificate, role=Role.OWNER)
    assert cert.public_key() == key.public_key()
    assert pki.common_name(cert) == "alice laptop"
    assert events(ca) == [audit.CA_CREATED, audit.OWNERSHIP]


def test_later_claims_are_refused_and_a_retry_by_the_owner_gets_the_same(ca):
    key, cert = claim(ca)
    with pytest.raises(Conflict, match="already owned"):
        claim(ca, "mallory")
    again = ca.claim_ownership(OwnershipClaim(csr=pki.csr_pem(pki.make_csr(key, "alice"))))
    assert pki.load_cert(again.client_certificate) == cert
    assert events(ca).count(audit.OWNERSHIP) == 1


@pytest.mark.parametrize("csr", ["", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"])
def test_a_bad_csr_is_a_bad_request(ca, csr):
    with pytest.raises(BadRequest, match="CSR"):
        ca.claim_ownership(OwnershipClaim(csr=csr))


# --- who may call what -------------------------------------------------------------------------


OWNER_CALLS = {
    "list_vms": lambda ca, peer: ca.list_vms(peer),
    "vm_certificate": lambda ca, peer: ca.vm_certificate(peer, "0" * 16),
    "get_policy": lambda ca, peer: ca.get_policy(peer),
    "put_policy": lambda ca, peer: ca.put_policy(peer, CaPolicy()),
    "rotate": lambda ca, peer: ca.rotate(peer),
    "audit_log": lambda ca, peer: ca.audit_log(peer),
    "release_key": lambda ca, peer: ca.release_key(peer, KeyRequest()),
}


@pytest.mark.parametrize("call", OWNER_CALLS, ids=list(OWNER_CALLS))
def test_no_certificate_is_401(ca, call):
    with pytest.raises(Unauthenticated, match="no client certificate"):
        OWNER_CALLS[call](ca, None)


@pytest.mark.parametrize("call", [c for c in OWNER_CALLS if c != "release_key"])
def test_a_vm_certificate_on_an_owner_call_is_403(ca, sim, owner, call):
    _key, _result, vm_cert = registered_vm(ca, sim)
    with pytest.raises(Forbidden, match="has role vm; this call needs role owner"):
        OWNER_CALLS[call](ca, vm_cert)


def test_a_certificate_from_another_root_is_403(ca, owner):
    other_key, other_root = pki.create_root("elsewhere")
    key = pki.new_key()
    foreign = pki.issue(
        key.public_key(),
        issuer_key=other_key,
        issuer_cert=other_root,
        role=Role.OWNER,
        common_name="alice",
    )
    with pytest.raises(Forbidden, match="not validly issued"):
        ca.list_vms(foreign)


def test_an_owner_role_signed_by_a_vm_issuer_is_403(ca, sim, owner):
    """A VM's intermediate chains to the root, but may not mint CA owners."""
    vm_key, result, _ = registered_vm(ca, sim)
    issuer = pki.load_cert(result.issuer_certificate)
    forged = pki.issue(
        pki.new_key().public_key(),
        issuer_key=vm_key,
        issuer_cert=issuer,
        role=Role.OWNER,
        common_name="mallory",
    )
    pki.verify_chain(forged, [issuer], ca.store.root_certificate, role=Role.OWNER)  # chains...
    with pytest.raises(Forbidden, match="client certificate refused"):
        ca.list_vms(forged)  # ...but not directly under the root


def test_an_owner_certificate_for_another_key_is_403(ca, owner):
    stray = pki.issue(
        pki.new_key().public_key(),
        issuer_key=ca.store.root_key,
        issuer_cert=ca.store.root_certificate,
        role=Role.OWNER,
        common_name="stray",
    )
    with pytest.raises(Forbidden, match="not the CA's current owner's"):
        ca.get_policy(stray)
    assert ca.get_policy(owner) == ca.store.policy


# --- VM registration -------------------------------------------------------------------------


def test_a_vm_whose_quote_satisfies_the_policy_gets_its_three_certificates(ca, sim):
    key, request = vm_registration(sim)
    result = ca.register_vm(request)
    root = ca.store.root_certificate
    server = pki.load_cert(result.server_certificate)
    client = pki.load_cert(result.client_certificate)
    issuer = pki.load_cert(result.issuer_certificate)
    pki.verify_chain(server, [], root, role=Role.VM_SERVER)
    pki.verify_chain(client, [], root, role=Role.VM)
    pki.verify_chain(issuer, [], root, role=Role.VM_ISSUER)
    assert all(c.public_key() == key.public_key() for c in (server, client, issuer))
    constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["vm.example"]
    assert result.ca_certificate == pki.cert_pem(root)
    assert result.key_ids == ["default"]
    spki = binding.spki_der(key.public_key())
    assert result.vm_id == hashlib.sha256(spki).hexdigest()[:16]
    # The VM can now sign its own owner's certificate, which chains through its intermediate.
    vm_owner = pki.issue(
        pki.new_key().public_key(),
        issuer_key=key,
        issuer_cert=issuer,
        role=Role.VM_OWNER,
        common_name="alice",
    )
    pki.verify_chain(vm_owner, [issuer], root, role=Role.VM_OWNER)
    last = ca.store.audit_entries()[-1]
    assert last.event == audit.VM_REGISTERED
    assert last.details["measurements"]["mrtd"] == AGENT_MRTD.hex()


def test_a_wrong_measurement_is_refused_naming_the_policy_field(ca, sim):
    _key, request = vm_registration(sim, mrtd=OTHER_MRTD)
    with pytest.raises(Refused, match=r"vms\[0\]\.tdx\.allowed_mrtd"):
        ca.register_vm(request)
    last = ca.store.audit_entries()[-1]
    assert last.event == audit.VM_REFUSED
    assert last.details["measurements"]["mrtd"] == OTHER_MRTD.hex()
    assert ca.store.vms == {}


def test_a_quote_bound_to_another_key_is_refused_and_not_logged(ca, sim):
    _key, request = vm_registration(sim, bind_key=pki.new_key())
    with pytest.raises(Refused, match="report data"):
        ca.register_vm(request)
    assert audit.VM_REFUSED not in events(ca)


def test_a_debug_td_is_refused(ca, sim):
    _key, request = vm_registration(sim, debug=True)
    with pytest.raises(Refused, match="debug"):
        ca.register_vm(request)


def test_a_simulated_quote_under_an_intel_policy_is_refused(tmp_path, sim):
    ca = make_service(tmp_path / "s", sim, CaPolicy(root="intel", vms=[agent_rule()]))
    _key, request = vm_registration(sim)
    with pytest.raises(Refused, match="does not lead to the trusted root"):
        ca.register_vm(request)


def test_without_rules_no_vm_registers(tmp_path, sim):
    ca = make_service(tmp_path / "s", sim, CaPolicy(root="simulation"))
    with pytest.raises(Refused, match="admits no VM yet"):
        ca.register_vm(vm_registration(sim)[1])


def test_the_first_accepting_rule_decides_the_key_ids(tmp_path, sim):
    policy = CaPolicy(
        root="simulation",
        vms=[
            agent_rule("others", ["a"], mrtd=OTHER_MRTD),
            agent_rule("agents", ["b", "c"]),
            agent_rule("later", ["d"]),
        ],
    )
    ca = make_service(tmp_path / "s", sim, policy)
    _key, result, _ = registered_vm(ca, sim)
    assert result.key_ids == ["b", "c"]
    assert ca.store.vms[result.vm_id].rule == "agents"


def test_re_registering_the_same_key_updates_the_record(ca, sim):
    key, first, _ = registered_vm(ca, sim, name="first-name")
    _key, second, _ = registered_vm(ca, sim, name="new-name", key=key)
    assert first.vm_id == second.vm_id
    assert [vm.name for vm in ca.store.vms.values()] == ["new-name"]


def test_without_collateral_the_simulated_platform_supplies_it(ca, sim):
    registered_vm(ca, sim, collateral=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"quote": "not base64!"}, "quote must be base64"),
        ({"collateral": "{}"}, "collateral lacks"),
        ({"hosts": ["bad host"]}, "neither an IP address nor a DNS name"),
        ({"hosts": [f"h{i}.example" for i in range(17)]}, "at most 16 hosts"),
        ({"csr": "nope"}, "CSR"),
    ],
)
def test_malformed_registrations_are_bad_requests(ca, sim, change, message):
    _key, request = vm_registration(sim)
    with pytest.raises(BadRequest, match=message):
        ca.register_vm(request.model_copy(update=change))


# --- owner reads ------------------------------------------------------------------------------


def test_owner_lists_vms_and_fetches_a_server_certificate(ca, sim, owner):
    _key, result, _ = registered_vm(ca, sim)
    listed = ca.list_vms(owner).vms
    assert [vm.vm_id for vm in listed] == [result.vm_id]
    assert listed[0].simulated and listed[0].tcb_status == "UpToDate"
    assert listed[0].measurements["mrtd"] == AGENT_MRTD.hex()
    fetched = ca.vm_certificate(owner, result.vm_id)
    assert fetched.server_certificate == result.server_certificate
    with pytest.raises(NotFound, match="no VM"):
        ca.vm_certificate(owner, "ffffffffffffffff")


# --- policy -------------------------------------------------------------------------------------


def test_policy_changes_recompute_vm_access_and_are_logged(ca, sim, owner):
    _key, result, vm_cert = registered_vm(ca, sim)
    assert ca.release_key(vm_cert, KeyRequest(key_id="default")).version == 1
    new = CaPolicy(root="simulation", vms=[agent_rule("agents", ["other"])])
    assert ca.put_policy(owner, new) == new
    assert ca.get_policy(owner) == new
    assert ca.store.vms[result.vm_id].key_ids == ["other"]
    with pytest.raises(Forbidden, match="may not receive key id 'default'"):
        ca.release_key(vm_cert, KeyRequest(key_id="default"))
    # A policy that no longer admits the VM's measurements takes its key access away.
    ca.put_policy(owner, CaPolicy(root="simulation", vms=[agent_rule(mrtd=OTHER_MRTD)]))
    assert ca.store.vms[result.vm_id].key_ids == []
    entry = [e for e in ca.store.audit_entries() if e.event == audit.POLICY_CHANGED][-1]
    assert entry.details["vm_key_ids"] == {result.vm_id: []}


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([agent_rule("same"), agent_rule("same")], "must be unique"),
        ([agent_rule(key_ids=["bad id!"])], "is not a key id"),
    ],
)
def test_invalid_policies_are_bad_requests(ca, owner, rules, message):
    with pytest.raises(BadRequest, match=message):
        ca.put_policy(owner, CaPolicy(root="simulation", vms=rules))


# --- keys ---------------------------------------------------------------------------------------


def test_owner_gets_keys_derived_from_the_master_as_documented(ca, owner):
    released = ca.release_key(owner, KeyRequest(key_id="project-x"))
    master = bytes.fromhex(ca.store._state.master_keys[1])
    assert released.version == 1
    assert base64.b64decode(released.key) == derive_kek(master, key_id="project-x", version=1)
    last = ca.store.audit_entries()[-1]
    assert last.event == audit.KEY_RELEASED
    assert last.details == {
        "key_id": "project-x",
        "version": 1,
        "to": "owner",
        "certificate_sha256": pki.fingerprint(owner),
    }
    assert released.key not in str(last.details)


def test_rotation_adds_a_version_and_old_versions_still_release(ca, owner):
    v1 = ca.release_key(owner, KeyRequest()).key
    assert ca.rotate(owner).version == 2
    current = ca.release_key(owner, KeyRequest())
    assert current.version == 2 and current.key != v1
    assert ca.release_key(owner, KeyRequest(version=1)).key == v1
    with pytest.raises(NotFound, match="key version 3 does not exist"):
        ca.release_key(owner, KeyRequest(version=3))


def test_vm_key_release_follows_its_rule(tmp_path, sim):
    policy = CaPolicy(root="simulation", vms=[agent_rule("agents", ["*"])])
    ca = make_service(tmp_path / "s", sim, policy)
    _key, result, vm_cert = registered_vm(ca, sim)
    owner = claim(ca)[1]
    from_vm = ca.release_key(vm_cert, KeyRequest(key_id="anything"))
    assert from_vm == ca.release_key(owner, KeyRequest(key_id="anything"))
    assert ca.store.audit_entries()[-2].details["vm_id"] == result.vm_id


def test_a_vm_certificate_of_an_unregistered_key_gets_no_key(ca):
    stray = pki.issue(
        pki.new_key().public_key(),
        issuer_key=ca.store.root_key,
        issuer_cert=ca.store.root_certificate,
        role=Role.VM,
        common_name="stray",
    )
    with pytest.raises(Forbidden, match="belongs to no registered VM"):
        ca.release_key(stray, KeyRequest())


def test_other_roles_get_no_keys(ca, sim):
    _key, result, _ = registered_vm(ca, sim)
    server = pki.load_cert(result.server_certificate)
    with pytest.raises(Forbidden, match="has role vm-server; this call needs role owner or vm"):
        ca.release_key(server, KeyRequest())


# --- audit --------------------------------------------------------------------------------------


def test_the_owner_fetches_a_log_that_verifies_and_records_everything(ca, sim, owner):
    _key, _result, vm_cert = registered_vm(ca, sim)
    with pytest.raises(Refused):
        ca.register_vm(vm_registration(sim, mrtd=OTHER_MRTD)[1])
    ca.put_policy(owner, CaPolicy(root="simulation", vms=[agent_rule()]))
    ca.release_key(vm_cert, KeyRequest())
    ca.rotate(owner)
    log = ca.audit_log(owner)
    assert log.ca_certificate == pki.cert_pem(ca.store.root_certificate)
    audit.verify_log(log.entries, pki.load_cert(log.ca_certificate))
    assert [e.event for e in log.entries] == [
        audit.CA_CREATED,
        audit.OWNERSHIP,
        audit.VM_REGISTERED,
        audit.VM_REFUSED,
        audit.POLICY_CHANGED,
        audit.KEY_RELEASED,
        audit.KEY_ROTATED,
    ]


def test_verify_quote_agrees_with_what_the_ca_recorded(ca, sim, sim_root):
    """The recorded measurements are those of the quote, as an independent check sees them."""
    _key, request = vm_registration(sim)
    result = ca.register_vm(request)
    verdict = verify_quote(base64.b64decode(request.quote), sim.collateral("tdx"), root=sim_root)
    assert ca.store.vms[result.vm_id].measurements == verdict.measurements


def test_a_simulation_policy_on_hardware_without_a_simulated_platform_is_a_bad_request(
    tmp_path, sim
):
    ca = make_service(tmp_path / "s", sim, CaPolicy(root="intel"))
    hardware = CaService(ca.store, replace(ca.platform, sim_platform=None), ca.tls)
    owner = claim(hardware)[1]
    with pytest.raises(BadRequest, match=r"set policy\.root to intel"):
        hardware.put_policy(owner, CaPolicy(root="simulation", vms=[agent_rule()]))


def test_registrations_racing_policy_changes_end_consistent(tmp_path, sim):
    """Each VM's key ids are always those of the policy in force when it was last decided."""
    ca = make_service(tmp_path / "s", sim, CaPolicy(root="simulation", vms=[agent_rule()]))
    owner = claim(ca)[1]
    requests = [vm_registration(sim, name=f"vm-{i}")[1] for i in range(8)]
    policies = [CaPolicy(root="simulation", vms=[agent_rule(key_ids=[f"k{i}"])]) for i in range(8)]
    barrier = threading.Barrier(2)

    def register_all():
        barrier.wait()
        for request in requests:
            ca.register_vm(request)

    def change_all():
        barrier.wait()
        for policy in policies:
            ca.put_policy(owner, policy)

    threads = [threading.Thread(target=register_all), threading.Thread(target=change_all)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    final = ca.store.policy.vms[0].key_ids
    assert final == ["k7"]
    assert len(ca.store.vms) == 8
    # Whatever interleaving happened, no VM was lost and none keeps a stale policy's keys
    # unless it registered after the last change, under that same policy.
    assert {tuple(vm.key_ids) for vm in ca.store.vms.values()} == {("k7",)}


def test_names_lose_control_characters(ca, sim):
    key = pki.new_key()
    grant = ca.claim_ownership(
        OwnershipClaim(csr=pki.csr_pem(pki.make_csr(key, "alice\nINFO fake log line")))
    )
    assert pki.common_name(pki.load_cert(grant.client_certificate)) == "aliceINFO fake log line"
    _key, request = vm_registration(sim, name="vm\r\x1b[31m")
    result = ca.register_vm(request)
    assert ca.store.vms[result.vm_id].name == "vm[31m"
