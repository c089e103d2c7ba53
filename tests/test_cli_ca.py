"""The owner's commands after onboarding: `modelyo ca vms|policy|rotate` and `modelyo audit`."""

from __future__ import annotations

import json

import pytest

from modelyo.cli.main import main

pytestmark = pytest.mark.slow


@pytest.fixture
def onboarded(stack, tmp_path, monkeypatch):
    home = tmp_path / "project"
    home.mkdir()
    monkeypatch.chdir(home)
    assert main(["attest"]) == 0
    return home


def test_owner_commands(onboarded, capsys):
    capsys.readouterr()
    assert main(["ca", "vms"]) == 0
    # The stack's own agent (`modelyo dev up` starts and registers it) is the only VM.
    vms = capsys.readouterr().out.splitlines()
    assert len(vms) == 1 and "dev-agent" in vms[0] and "SIMULATED" in vms[0]

    assert main(["ca", "policy"]) == 0
    policy = json.loads(capsys.readouterr().out)
    assert policy["root"] == "simulation"
    assert policy["vms"][0]["key_ids"] == ["*"]

    policy["vms"][0]["key_ids"] = ["project-x"]
    (onboarded / "p.json").write_text(json.dumps(policy))
    assert main(["ca", "policy", "--set", "p.json"]) == 0
    assert json.loads(capsys.readouterr().out)["vms"][0]["key_ids"] == ["project-x"]

    assert main(["ca", "rotate"]) == 0
    assert "new key version: 2" in capsys.readouterr().out


def test_owner_commands_need_an_onboarded_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["ca", "vms"]) == 1
    assert "`modelyo attest` in a shell, there first" in capsys.readouterr().err


def test_audit_log_fetched_from_the_ca_verifies_and_an_edit_is_detected(onboarded, capsys):
    assert main(["ca", "rotate"]) == 0
    capsys.readouterr()
    assert main(["audit", "verify", "--save", "audit.json"]) == 0
    out = capsys.readouterr().out
    assert "audit log verifies" in out
    log = json.loads((onboarded / "audit.json").read_text())
    events = [e["event"] for e in log["entries"]]
    assert "ownership" in events and "key-rotated" in events

    log["entries"][0]["details"]["edited"] = True
    (onboarded / "edited.json").write_text(json.dumps(log))
    assert main(["audit", "verify", "edited.json"]) == 3
    captured = capsys.readouterr()
    assert "seq 0" in captured.out + captured.err
