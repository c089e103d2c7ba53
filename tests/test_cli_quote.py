"""`modelyo quote show|verify` as a user runs them."""

from __future__ import annotations

import json

from modelyo.cli.main import EXIT_REFUSED, main
from tests.vectors import BY_NAME, VECTORS


def test_show_prints_fields(capsys):
    assert main(["quote", "show", str(VECTORS / "sgx_quote")]) == 0
    out = capsys.readouterr().out
    assert "SGX quote v3" in out
    assert "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb" in out


def test_show_json_reads_hex_files(capsys):
    assert main(["quote", "show", "--json", str(VECTORS / "tdx_quote_2.hex")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["version"] == 4 and data["tee"] == "tdx"
    assert len(data["signature_data"]["pck_chain_pem"]) == 3


def test_show_refuses_garbage(tmp_path, capsys):
    bad = tmp_path / "q.bin"
    bad.write_bytes(b"\x04\x00\x02\x00" + bytes(20))
    assert main(["quote", "show", str(bad)]) == 1
    assert "malformed quote" in capsys.readouterr().err


def test_verify_accepts_and_exits_zero(capsys):
    vector = BY_NAME["tdx_quote"]
    code = main(
        [
            "quote",
            "verify",
            str(VECTORS / "tdx_quote"),
            "--collateral",
            str(VECTORS / "tdx_quote_collateral.json"),
            "--at",
            str(vector.verify_at),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "ACCEPTED" in out and "UpToDate" in out
    assert "SIMULATED" not in out


def test_verify_refuses_today_and_exits_three(capsys):
    code = main(
        [
            "quote",
            "verify",
            str(VECTORS / "tdx_quote"),
            "--collateral",
            str(VECTORS / "tdx_quote_collateral.json"),
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert code == EXIT_REFUSED
    data = json.loads(captured.out)
    assert data["accepted"] is False
    assert data["failures"] == ["signature and collateral"]
    assert "collateral expired" in captured.err


def test_verify_status_and_measurement_flags(capsys):
    vector = BY_NAME["sgx_quote"]
    args = [
        "quote",
        "verify",
        str(VECTORS / "sgx_quote"),
        "--collateral",
        str(VECTORS / "sgx_quote_collateral.json"),
        "--at",
        str(vector.verify_at),
    ]
    assert main(args) == EXIT_REFUSED  # ConfigurationAndSWHardeningNeeded is not accepted
    capsys.readouterr()
    accepted = [*args, "--accept-status", "ConfigurationAndSWHardeningNeeded"]
    assert main(accepted) == 0
    assert main([*accepted, "--mrenclave", "00" * 32]) == EXIT_REFUSED
    assert "ca.allowed_mrenclave" in capsys.readouterr().err


def test_verify_with_policy_file(tmp_path, capsys):
    vector = BY_NAME["tdx_quote"]
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[tdx]\nallowed_mrtd = ["{"00" * 48}"]\n')
    code = main(
        [
            "quote",
            "verify",
            str(VECTORS / "tdx_quote"),
            "--collateral",
            str(VECTORS / "tdx_quote_collateral.json"),
            "--at",
            str(vector.verify_at),
            "--policy",
            str(policy),
        ]
    )
    assert code == EXIT_REFUSED
    assert "tdx.allowed_mrtd" in capsys.readouterr().err


def test_verify_bad_collateral_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "c.json"
    bad.write_text("{}")
    code = main(["quote", "verify", str(VECTORS / "tdx_quote"), "--collateral", str(bad)])
    assert code == 1
    assert "collateral lacks" in capsys.readouterr().err
