"""`modelyo attest` (step 1) and the CA, as a user meets them: a real CA process on loopback,
real TLS 1.3, the real tool. Each test that depends on who owns the CA gets its own CA."""

from __future__ import annotations

import base64
import json
import os
import ssl
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from modelyo import dev, pki
from modelyo.api import ca as api
from modelyo.attest import attest_ca, expected_ca_policy
from modelyo.attestation import binding
from modelyo.attestation.policy import SgxPolicy
from modelyo.attestation.verify import TrustRoot
from modelyo.cli.main import EXIT_REFUSED, main
from modelyo.client import ca as ca_client
from modelyo.client.http import AlreadyOwnedError, ServiceError
from modelyo.errors import AttestationError, ModelyoError
from modelyo.measure import measure
from modelyo.workspace import CA_CERT, CA_CLIENT_CERT, CA_CLIENT_KEY, Endpoint, Workspace

pytestmark = pytest.mark.slow


def _sim_trust(info) -> TrustRoot:
    return TrustRoot.simulation(Path(info.sim_dir))


def _policy() -> SgxPolicy:
    return SgxPolicy(allowed_mrenclave=[measure("ca").hex])


def _workspace(tmp_path: Path, name: str) -> Workspace:
    path = tmp_path / name
    path.mkdir()
    return Workspace(path)


def _onboard(info, workspace: Workspace):
    return attest_ca(
        workspace,
        Endpoint(info.ca.url, "test"),
        trust=_sim_trust(info),
        policy=_policy(),
        expected_from="test",
    )


# --- step 1 as the document shows it --------------------------------------------------------


def test_attest_with_no_arguments_finds_the_local_stack(stack, tmp_path, monkeypatch, capsys):
    home = tmp_path / "project"
    home.mkdir()
    monkeypatch.chdir(home)
    assert main(["attest"]) == 0
    out = capsys.readouterr().out
    assert "SIMULATED" in out
    assert "CA attested" in out and "Ownership claimed" in out
    assert "the local stack" in out
    for name in (CA_CERT, CA_CLIENT_CERT, CA_CLIENT_KEY):
        assert (home / name).is_file()
    assert stat.S_IMODE((home / CA_CLIENT_KEY).stat().st_mode) == 0o600
    assert not list(home.glob(".*pending*"))
    config = (home / "modelyo.toml").read_text()
    assert stack.ca.url in config and "simulation = true" in config
    # The stored root is the CA's root and our certificate chains to it as the owner.
    root = pki.load_cert((home / CA_CERT).read_bytes())
    mine = pki.load_cert((home / CA_CLIENT_CERT).read_bytes())
    pki.verify_chain(mine, [], root, role=pki.Role.OWNER)


def test_rerunning_as_owner_is_harmless(stack, tmp_path, capsys):
    workspace = _workspace(tmp_path, "owner")
    first = _onboard(stack, workspace)
    assert first.ownership == "claimed"
    before = {n: workspace.path(n).read_bytes() for n in (CA_CERT, CA_CLIENT_CERT, CA_CLIENT_KEY)}
    again = _onboard(stack, workspace)
    assert again.ownership == "already owner"
    assert again.files == []
    after = {n: workspace.path(n).read_bytes() for n in before}
    assert after == before


def test_another_party_is_told_already_owned_and_nothing_changes(stack, tmp_path, capsys):
    _onboard(stack, _workspace(tmp_path, "owner"))
    other = _workspace(tmp_path, "other")
    code = main(
        [
            "attest",
            "-C",
            str(other.root),
            "--ca",
            stack.ca.url,
            "--simulation",
            "--sim-dir",
            stack.sim_dir,
        ]
    )
    assert code == 1
    assert "already owned" in capsys.readouterr().err
    assert list(other.root.iterdir()) == []


def test_fifty_concurrent_claims_give_one_owner(stack, tmp_path):
    workspaces = [_workspace(tmp_path, f"claimant{i}") for i in range(50)]
    barrier = threading.Barrier(50)

    def claim(workspace: Workspace) -> str:
        barrier.wait()
        try:
            return _onboard(stack, workspace).ownership
        except AlreadyOwnedError as exc:
            assert "already owned" in str(exc)
            return "refused"

    with ThreadPoolExecutor(50) as pool:
        outcomes = list(pool.map(claim, workspaces))
    assert outcomes.count("claimed") == 1
    assert outcomes.count("refused") == 49
    losers = [w for w, o in zip(workspaces, outcomes, strict=True) if o == "refused"]
    assert all(list(w.root.iterdir()) == [] for w in losers)


# --- refusals: what a machine in the middle or a wrong CA would cause -----------------------


def _fetch(info):
    nonce = binding.new_nonce()
    body, presented = ca_client.fetch_attestation(info.ca.url, nonce)
    return body, presented, nonce


def _check(info, body, presented, nonce, policy=None):
    return ca_client.check_attestation(
        info.ca.url, body, presented, nonce, trust=_sim_trust(info), policy=policy or _policy()
    )


def test_genuine_attestation_is_accepted(stack):
    attested = _check(stack, *_fetch(stack))
    assert attested.verdict.accepted and attested.simulated
    assert attested.verdict.status == "UpToDate"


def test_tampered_quote_is_refused(stack):
    body, presented, nonce = _fetch(stack)
    quote = bytearray(base64.b64decode(body.quote))
    quote[120] ^= 0x01  # inside MRENCLAVE
    tampered = body.model_copy(update={"quote": base64.b64encode(bytes(quote)).decode()})
    with pytest.raises(AttestationError, match="signature does not verify"):
        _check(stack, tampered, presented, nonce)


def test_wrong_measurement_is_refused(stack):
    with pytest.raises(AttestationError, match=r"ca\.allowed_mrenclave"):
        _check(stack, *_fetch(stack), policy=SgxPolicy(allowed_mrenclave=["ab" * 32]))


def test_wrong_nonce_is_refused(stack):
    body, presented, _nonce = _fetch(stack)
    with pytest.raises(AttestationError, match="replayed or relayed"):
        _check(stack, body, presented, binding.new_nonce())


def test_swapped_certificate_is_refused(stack):
    """A middleman terminating TLS with its own certificate and relaying the attestation."""
    with _MitmProxy(stack.ca.url) as proxy_url:
        with pytest.raises(AttestationError, match="not the one this TLS connection presented"):
            ca_client.attest(proxy_url, trust=_sim_trust(stack), policy=_policy())


def test_simulated_ca_is_refused_under_the_intel_root(stack, tmp_path, capsys):
    workspace = _workspace(tmp_path, "hw")
    code = main(
        [
            "attest",
            "-C",
            str(workspace.root),
            "--ca",
            stack.ca.url,
            "--mrenclave",
            measure("ca").hex,
        ]
    )
    assert code == EXIT_REFUSED
    assert "does not lead to the trusted root" in capsys.readouterr().err
    assert list(workspace.root.iterdir()) == []


def test_hardware_attestation_requires_pinned_measurements(stack, tmp_path, capsys):
    code = main(["attest", "-C", str(_workspace(tmp_path, "w").root), "--ca", stack.ca.url])
    assert code == 1
    assert "no expected CA measurement" in capsys.readouterr().err


def test_expected_policy_from_flags_and_simulation_defaults():
    policy, source = expected_ca_policy(policy_file=None, simulation=True)
    assert policy.allowed_mrenclave == [measure("ca").hex] and "SIMULATED" in source
    pinned, source = expected_ca_policy(policy_file=None, mrenclave=("aa" * 32,), simulation=False)
    assert pinned.allowed_mrenclave == ["aa" * 32] and source == "--mrenclave"


# --- client certificates and roles ----------------------------------------------------------


def test_owner_calls_need_the_owner_certificate(stack, tmp_path):
    workspace = _workspace(tmp_path, "owner")
    _onboard(stack, workspace)
    root_pem = workspace.path(CA_CERT).read_bytes()
    with ca_client.CaClient(stack.ca.url, root_pem) as anonymous:
        with pytest.raises(ServiceError) as info:
            anonymous.list_vms()
    assert info.value.status == 401

    foreign_dir = tmp_path / "foreign"
    foreign_dir.mkdir()
    other_root_key, other_root = pki.create_root("Some other CA")
    key = pki.new_key()
    cert = pki.issue(
        key.public_key(),
        issuer_key=other_root_key,
        issuer_cert=other_root,
        role=pki.Role.OWNER,
        common_name="intruder",
    )
    pki.write_cert(foreign_dir / "c.pem", cert)
    pki.write_private_key(foreign_dir / "c.key", key)
    with ca_client.CaClient(
        stack.ca.url, root_pem, client_cert=foreign_dir / "c.pem", client_key=foreign_dir / "c.key"
    ) as intruder:
        with pytest.raises(ModelyoError, match=r"rejected our client certificate"):
            intruder.list_vms()

    owner = ca_client.CaClient(
        stack.ca.url,
        root_pem,
        client_cert=workspace.path(CA_CLIENT_CERT),
        client_key=workspace.path(CA_CLIENT_KEY),
    )
    with owner:
        # The only VM is the stack's own agent (`modelyo dev up` starts and registers it).
        assert [vm.name for vm in owner.list_vms().vms] == ["dev-agent"]


def test_vm_registration_and_roles(stack, tmp_path):
    """A simulated TD registers; its VM certificate cannot make owner calls."""
    from modelyo.attestation.collateral import Collateral  # noqa: F401  (documents the wire type)
    from modelyo.tee.sim import SimulatedPlatform

    workspace = _workspace(tmp_path, "owner")
    _onboard(stack, workspace)
    root_pem = workspace.path(CA_CERT).read_bytes()
    platform = SimulatedPlatform(Path(stack.sim_dir))
    td = platform.tdx_guest(mr_td=measure("agent").value)
    vm_key = pki.new_key()
    quote = td.get_quote(binding.report_data(binding.spki_der(vm_key.public_key())))
    registration = api.VmRegistration(
        name="vm-1",
        csr=pki.csr_pem(pki.make_csr(vm_key, "vm-1")),
        quote=base64.b64encode(quote).decode(),
        collateral=platform.collateral("tdx").json_text,
        hosts=["127.0.0.1"],
    )
    import httpx

    from modelyo.client.tls import pinned_context

    with httpx.Client(base_url=stack.ca.url, verify=pinned_context(root_pem)) as client:
        response = client.post(
            api.VMS,
            content=registration.model_dump_json(),
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 200, response.text
    result = api.VmRegistrationResult.model_validate_json(response.content)
    root = pki.load_cert(root_pem)
    pki.verify_chain(pki.load_cert(result.server_certificate), [], root, role=pki.Role.VM_SERVER)
    vm_cert = pki.load_cert(result.client_certificate)
    pki.verify_chain(vm_cert, [], root, role=pki.Role.VM)

    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    pki.write_cert(vm_dir / "vm.pem", vm_cert)
    pki.write_private_key(vm_dir / "vm.key", vm_key)
    with ca_client.CaClient(
        stack.ca.url, root_pem, client_cert=vm_dir / "vm.pem", client_key=vm_dir / "vm.key"
    ) as vm:
        with pytest.raises(ServiceError) as info:
            vm.list_vms()
        assert info.value.status == 403
        released = vm.release_key("default")
        assert len(base64.b64decode(released.key)) == 32

    owner = ca_client.CaClient(
        stack.ca.url,
        root_pem,
        client_cert=workspace.path(CA_CLIENT_CERT),
        client_key=workspace.path(CA_CLIENT_KEY),
    )
    with owner:
        vms = {v.name: v for v in owner.list_vms().vms}
        assert sorted(vms) == ["dev-agent", "vm-1"]  # the stack's agent, and this one
        vm_id = vms["vm-1"].vm_id
        assert owner.vm_certificate(vm_id).server_certificate == result.server_certificate
        # The same key id for the owner and the VM: one key.
        assert owner.release_key("default").key == released.key


def test_a_vm_outside_the_policy_is_refused_with_the_field(stack, tmp_path):
    import httpx

    from modelyo.client.tls import pinned_context
    from modelyo.tee.sim import SimulatedPlatform

    workspace = _workspace(tmp_path, "owner")
    _onboard(stack, workspace)
    platform = SimulatedPlatform(Path(stack.sim_dir))
    td = platform.tdx_guest(mr_td=bytes(48))  # not this installation's agent
    key = pki.new_key()
    registration = api.VmRegistration(
        name="rogue",
        csr=pki.csr_pem(pki.make_csr(key, "rogue")),
        quote=base64.b64encode(
            td.get_quote(binding.report_data(binding.spki_der(key.public_key())))
        ).decode(),
        collateral=platform.collateral("tdx").json_text,
    )
    root_pem = workspace.path(CA_CERT).read_bytes()
    with httpx.Client(base_url=stack.ca.url, verify=pinned_context(root_pem)) as client:
        response = client.post(
            api.VMS,
            content=registration.model_dump_json(),
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 422
    assert "allowed_mrtd" in response.json()["detail"]


# --- keys ------------------------------------------------------------------------------------


def test_released_keys_survive_a_restart_and_rotation_keeps_old_versions(stack, tmp_path):
    workspace = _workspace(tmp_path, "owner")
    _onboard(stack, workspace)

    def owner() -> ca_client.CaClient:
        url = dev.read_stack(Path(stack.dev_dir)).ca.url
        return ca_client.CaClient(
            url,
            workspace.path(CA_CERT).read_bytes(),
            client_cert=workspace.path(CA_CLIENT_CERT),
            client_key=workspace.path(CA_CLIENT_KEY),
        )

    with owner() as client:
        v1 = client.release_key("default")
        other = client.release_key("project-x")
    assert v1.version == 1 and v1.key != other.key

    dev.down(Path(stack.dev_dir))
    dev.up(Path(stack.dev_dir), ca_port=0)
    with owner() as client:
        assert client.release_key("default").key == v1.key
        assert client.rotate().version == 2
        v2 = client.release_key("default")
        assert v2.version == 2 and v2.key != v1.key
        assert client.release_key("default", version=1).key == v1.key


# --- a middleman for the swapped-certificate test ---------------------------------------------


class _MitmProxy:
    """Terminates TLS with its own certificate and relays each request to the real CA, the
    way a machine in the middle would (an HTTP relay: one TLS object per thread, no sharing)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream

    def __enter__(self) -> str:
        import http.server
        import tempfile

        import httpx

        from modelyo.client.tls import first_contact_context

        key = pki.new_key()
        root_key, root = pki.create_root("mitm")
        cert = pki.issue(
            key.public_key(),
            issuer_key=root_key,
            issuer_cert=root,
            role=pki.Role.CA_SERVER,
            common_name="mitm",
            hosts=["127.0.0.1"],
        )
        self._dir = tempfile.TemporaryDirectory()
        d = Path(self._dir.name)
        pki.write_cert(d / "c.pem", cert)
        pki.write_private_key(d / "c.key", key)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(d / "c.pem", d / "c.key")
        upstream = self.upstream

        class Relay(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with httpx.Client(verify=first_contact_context(), timeout=30) as client:
                    answer = client.get(upstream + self.path)
                self.send_response(answer.status_code)
                self.send_header("content-type", answer.headers.get("content-type", ""))
                self.send_header("content-length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Relay)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"https://127.0.0.1:{self._server.server_address[1]}"

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._dir.cleanup()


def test_state_and_logs_stay_in_the_dev_dir(stack):
    status = dev.status(Path(stack.dev_dir))
    assert status["services"]["ca"]["running"] is True
    assert Path(stack.ca.log).is_file()
    mode = stat.S_IMODE(os.stat(stack.dev_dir).st_mode)
    assert mode == 0o700
    assert json.loads(Path(stack.dev_dir, "stack.json").read_text())["ca"]["url"] == stack.ca.url


def test_a_failed_dev_up_leaves_no_ca_running(tmp_path, monkeypatch):
    """`dev up` stops the CA it started when the agent cannot start: a fixture or the demo
    that sees the error never gets to call `dev down`."""
    started: list[int] = []
    start_ca = dev._start_ca

    def recording_start_ca(*args, **kwargs):
        info = start_ca(*args, **kwargs)
        started.append(info.pid)
        return info

    def failing_start_agent(*args, **kwargs):
        raise ModelyoError("the agent did not start (simulated failure)")

    monkeypatch.setattr(dev, "_start_ca", recording_start_ca)
    monkeypatch.setattr(dev, "_start_agent", failing_start_agent)
    with pytest.raises(ModelyoError, match="simulated failure"):
        dev.up(tmp_path / "dev", ca_port=0)
    assert len(started) == 1
    assert not dev._alive(started[0])
    assert dev.read_stack(tmp_path / "dev") is None
