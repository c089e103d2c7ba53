"""`modelyo quote show|verify`: look inside a quote and verify it, for debugging attestation."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from modelyo.attestation.collateral import Collateral
from modelyo.attestation.policy import Policy, SgxPolicy, TdxPolicy, load_policy, parse_policy
from modelyo.attestation.quote import parse_quote, quote_from_file_bytes
from modelyo.attestation.verify import TrustRoot, verify_quote
from modelyo.cli.render import print_json, render_quote, render_verdict
from modelyo.errors import AttestationError, ModelyoError
from modelyo.tee.provider import Tee


def _read_quote(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelyoError(f"cannot read quote {path}: {exc.strerror}") from None
    return quote_from_file_bytes(data)


@click.group()
def quote() -> None:
    """Inspect and verify Intel DCAP quotes (raw bytes or hex text)."""


@quote.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print every field as JSON.")
def show(file: Path, as_json: bool) -> None:
    """Print the parsed fields of a quote FILE."""
    parsed = parse_quote(_read_quote(file))
    console = Console()
    if as_json:
        print_json(console, parsed.to_dict())
    else:
        render_quote(console, parsed)


@quote.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--collateral",
    "collateral_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Collateral JSON (dcap-qvl QuoteCollateralV3 format, as a PCCS gives it).",
)
@click.option("--at", "at", type=int, help="Verify at this Unix time (default: now).")
@click.option(
    "--root",
    default="intel",
    show_default=True,
    help="Trust root: intel, simulation (the local simulated platform), or a certificate PATH.",
)
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Policy file (TOML or JSON) with [ca] / [tdx] sections.",
)
@click.option("--mrenclave", multiple=True, help="Allowed MRENCLAVE (hex); repeatable.")
@click.option("--mrsigner", multiple=True, help="Allowed MRSIGNER (hex); repeatable.")
@click.option("--mrtd", multiple=True, help="Allowed MRTD (hex); repeatable.")
@click.option(
    "--accept-status",
    multiple=True,
    help="Accepted TCB status (repeatable); default UpToDate and SWHardeningNeeded.",
)
@click.option("--report-data", help="Expected REPORTDATA (128 hex digits).")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
def verify(
    file: Path,
    collateral_path: Path,
    at: int | None,
    root: str,
    policy_path: Path | None,
    mrenclave: tuple[str, ...],
    mrsigner: tuple[str, ...],
    mrtd: tuple[str, ...],
    accept_status: tuple[str, ...],
    report_data: str | None,
    as_json: bool,
) -> None:
    """Verify quote FILE with its collateral; exit 0 only when accepted (3 when refused)."""
    raw = _read_quote(file)
    collateral = Collateral.from_file(collateral_path)
    trust = TrustRoot.resolve(root)
    policy = load_policy(policy_path) if policy_path else Policy()
    overrides: dict[str, dict[str, object]] = {"ca": {}, "tdx": {}}
    if mrenclave:
        overrides["ca"]["allowed_mrenclave"] = list(mrenclave)
    if mrsigner:
        overrides["ca"]["allowed_mrsigner"] = list(mrsigner)
    if mrtd:
        overrides["tdx"]["allowed_mrtd"] = list(mrtd)
    if accept_status:
        for part in overrides.values():
            part["tcb"] = {"accepted_statuses": list(accept_status)}
    merged = policy.model_dump()
    for part, values in overrides.items():
        merged[part].update(values)
    policy = parse_policy(merged, source="command-line policy")

    expected = None
    if report_data is not None:
        try:
            expected = bytes.fromhex(report_data)
        except ValueError:
            raise click.BadParameter("not hex", param_hint="--report-data") from None
    try:
        tee = parse_quote(raw).tee
    except ModelyoError:
        tee = None  # verify_quote reports the format error in the verdict
    section: SgxPolicy | TdxPolicy = policy.tdx if tee == Tee.TDX else policy.ca
    verdict = verify_quote(
        raw,
        collateral,
        root=trust,
        now=at,
        policy=section,
        policy_name="tdx" if tee == Tee.TDX else "ca",
        expected_report_data=expected,
    )
    console = Console()
    if as_json:
        print_json(console, verdict.to_dict())
    else:
        render_verdict(console, verdict)
    if not verdict.accepted:
        raise AttestationError(verdict.reason(), verdict=verdict)
