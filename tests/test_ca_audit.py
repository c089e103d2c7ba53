"""The audit log: hash chain, signatures, and `modelyo audit verify`."""

from __future__ import annotations

import hashlib
import itertools
import json

import pytest

from modelyo import audit, pki
from modelyo.api.ca import AuditEntry, AuditLog
from modelyo.cli.main import EXIT_REFUSED, main


@pytest.fixture(scope="module")
def ca():
    return pki.create_root("audit test root")


def _log(ca, count: int = 6) -> list[AuditEntry]:
    key, _cert = ca
    entries: list[AuditEntry] = []
    events = [audit.CA_CREATED, audit.OWNERSHIP, audit.POLICY_CHANGED, audit.VM_REGISTERED]
    for index in range(count):
        event = events[index] if index < len(events) else audit.KEY_RELEASED
        details = {"n": index, "who": "ünïcode", "nested": {"list": [1, 2]}}
        entries.append(
            audit.make_entry(
                entries[-1] if entries else None, event, details, time=1000 + index, key=key
            )
        )
    return entries


def _edit(entry: AuditEntry, **changes) -> AuditEntry:
    return entry.model_copy(update=changes)


def test_a_log_verifies_and_chains_from_64_zeros(ca):
    entries = _log(ca)
    assert entries[0].prev == "0" * 64
    assert [e.seq for e in entries] == list(range(6))
    assert all(e.prev == p.hash for p, e in itertools.pairwise(entries))
    assert audit.audit_problems(entries, ca[1]) == []
    audit.verify_log(entries, ca[1])


def test_hash_is_sha256_of_the_documented_canonical_json(ca):
    entry = _log(ca, 1)[0]
    body = {
        "seq": 0,
        "time": 1000,
        "event": "ca-created",
        "details": entry.details,
        "prev": "0" * 64,
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert entry.hash == hashlib.sha256(text.encode()).hexdigest()
    assert '"who":"ünïcode"' in text


def test_an_edited_entry_is_found_with_its_seq(ca):
    entries = _log(ca)
    entries[3] = _edit(entries[3], details={"n": 99})
    with pytest.raises(audit.AuditError) as caught:
        audit.verify_log(entries, ca[1])
    assert caught.value.seq == 3
    assert "edited" in str(caught.value)


def test_an_edit_with_a_recomputed_hash_fails_the_signature(ca):
    entries = _log(ca)
    e = entries[2]
    forged_hash = audit.entry_hash(e.seq, e.time, e.event, {"n": 42}, e.prev)
    entries[2] = _edit(e, details={"n": 42}, hash=forged_hash)
    problems = audit.audit_problems(entries, ca[1])
    assert (problems[0].seq, "signature") == (2, problems[0].message.split()[0])
    # ...and the next entry's prev no longer matches.
    assert any(p.seq == 3 and "prev" in p.message for p in problems)


def test_a_removed_entry_is_found_at_its_seq(ca):
    entries = _log(ca)
    del entries[2]
    with pytest.raises(audit.AuditError) as caught:
        audit.verify_log(entries, ca[1])
    assert caught.value.seq == 2
    assert "removed" in str(caught.value)


def test_reordered_entries_are_found(ca):
    entries = _log(ca)
    entries[3], entries[4] = entries[4], entries[3]
    with pytest.raises(audit.AuditError) as caught:
        audit.verify_log(entries, ca[1])
    assert caught.value.seq == 3


def test_another_ca_s_certificate_does_not_verify(ca):
    _other_key, other_cert = pki.create_root("someone else")
    problems = audit.audit_problems(_log(ca), other_cert)
    assert problems and problems[0].seq == 0 and "signature" in problems[0].message


def test_unknown_events_are_refused(ca):
    with pytest.raises(ValueError, match="unknown audit event"):
        audit.make_entry(None, "coffee", {}, time=0, key=ca[0])


def test_lines_round_trip(ca):
    entry = _log(ca, 2)[1]
    line = audit.to_line(entry)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert audit.parse_line(line) == entry


# --- the command ---------------------------------------------------------------------------------


def _write(tmp_path, ca, entries, name="audit.json"):
    path = tmp_path / name
    log = AuditLog(entries=entries, ca_certificate=pki.cert_pem(ca[1]))
    path.write_text(log.model_dump_json())
    pki.write_cert(tmp_path / "ca.pem", ca[1])
    return path


def test_cli_accepts_a_good_log_pinned_to_ca_pem(tmp_path, ca, capsys):
    path = _write(tmp_path, ca, _log(ca))
    assert main(["audit", "verify", str(path), "--ca", str(tmp_path / "ca.pem")]) == 0
    out = capsys.readouterr().out
    assert "audit log verifies: 6 entries" in out


def test_cli_uses_ca_pem_in_the_current_directory(tmp_path, ca, capsys, monkeypatch):
    path = _write(tmp_path, ca, _log(ca))
    monkeypatch.chdir(tmp_path)
    assert main(["audit", "verify", str(path)]) == 0
    assert "no ca.pem pinned" not in capsys.readouterr().out


def test_cli_refuses_a_tampered_log_naming_the_seq(tmp_path, ca, capsys):
    entries = _log(ca)
    entries[4] = _edit(entries[4], time=5)
    path = _write(tmp_path, ca, entries)
    assert main(["audit", "verify", str(path), "--ca", str(tmp_path / "ca.pem")]) == EXIT_REFUSED
    captured = capsys.readouterr()
    assert "seq 4" in captured.out and "first at seq 4" in captured.err


def test_cli_refuses_a_log_of_another_ca(tmp_path, ca, capsys):
    path = _write(tmp_path, ca, _log(ca))
    other = tmp_path / "other.pem"
    pki.write_cert(other, pki.create_root("other")[1])
    assert main(["audit", "verify", str(path), "--ca", str(other)]) == EXIT_REFUSED
    assert "signed for another CA" in capsys.readouterr().err


def test_cli_without_a_pin_says_it_checks_consistency_only(tmp_path, ca, capsys, monkeypatch):
    path = _write(tmp_path, ca, _log(ca))
    (tmp_path / "ca.pem").unlink()
    monkeypatch.chdir(tmp_path)
    assert main(["audit", "verify", str(path)]) == 0
    assert "proves consistency, not origin" in capsys.readouterr().out


def test_cli_explains_a_file_that_is_not_a_log(tmp_path, capsys):
    path = tmp_path / "x.json"
    path.write_text('{"entries": 3}')
    assert main(["audit", "verify", str(path)]) == 1
    assert "is not an audit log" in capsys.readouterr().err
