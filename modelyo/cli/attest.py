"""`modelyo attest`: verify the CA (and later the TDX VM) and take ownership of it."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import click
from rich.console import Console

from modelyo.attest import AttestOptions, CaOnboarding, TdxOnboarding, attest_workspace
from modelyo.cli.render import SIMULATED_BANNER, print_json


@click.command()
@click.option("--ca", "ca_url", help="CA URL (default: flags, env, ./modelyo.toml, dev stack).")
@click.option("--tdx", "tdx_url", help="TDX VM (agent) URL (default: same discovery as --ca).")
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Policy file with the expected measurements ([ca] section).",
)
@click.option("--mrenclave", multiple=True, help="Expected CA MRENCLAVE (hex); repeatable.")
@click.option("--mrsigner", multiple=True, help="Expected CA MRSIGNER (hex); repeatable.")
@click.option("--mrtd", multiple=True, help="Expected TDX VM MRTD (hex); repeatable.")
@click.option(
    "--simulation",
    is_flag=True,
    help="Trust the SIMULATED platform's root (development only: proves no hardware isolation).",
)
@click.option(
    "--sim-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="The simulated platform's state directory (default: the dev stack's).",
)
@click.option("--at", type=int, help="Verify at this Unix time (default: now).")
@click.option(
    "-C",
    "--directory",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("."),
    help="Where the certificate files go (default: here).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def attest(
    ca_url: str | None,
    tdx_url: str | None,
    policy_file: Path | None,
    mrenclave: tuple[str, ...],
    mrsigner: tuple[str, ...],
    mrtd: tuple[str, ...],
    simulation: bool,
    sim_dir: Path | None,
    at: int | None,
    directory: Path,
    as_json: bool,
) -> None:
    """Attest the Modelyo CA, then the TDX VM, and take ownership of both.

    Stores ca.pem, ca_client.pem, ca_client.key (step 1) and tdx_ca.pem, tdx_client.pem,
    tdx_client.key (step 2) in the directory, keys with mode 0600.
    """
    console = Console()
    options = AttestOptions(
        ca_url=ca_url,
        tdx_url=tdx_url,
        policy_file=policy_file,
        mrenclave=mrenclave,
        mrsigner=mrsigner,
        mrtd=mrtd,
        simulation=simulation,
        sim_dir=sim_dir,
        at=at,
        directory=directory,
    )
    on_ca = None if as_json else partial(render_onboarding, console)
    outcome = attest_workspace(options, on_ca=on_ca)
    if as_json:
        tdx = outcome.tdx.to_dict() if outcome.tdx else None
        print_json(console, {"ca": outcome.ca.to_dict(), "tdx": tdx})
    elif outcome.tdx is not None:
        render_tdx(console, outcome.tdx)
    else:
        console.print(
            "[yellow]TDX VM: no endpoint configured[/] (pass --tdx URL, set MODELYO_TDX_URL, "
            "or run `modelyo dev up`); step 2 skipped"
        )


def render_tdx(console: Console, result: TdxOnboarding) -> None:
    """The readable summary of step 2."""
    verdict = result.verdict
    console.print(f"[bold green]TDX VM attested[/] {result.url}  [dim]({result.url_source})[/]")
    console.print(
        f"  VM id: {result.vm_id}; TCB status: {verdict.status}; advisories: "
        f"{', '.join(verdict.advisories) or 'none'}"
    )
    for name in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mrconfigid"):
        console.print(f"  {name}: {verdict.measurements.get(name)}", soft_wrap=True)
    console.print(f"  expected measurements from: {result.expected_from}", highlight=False)
    if not result.gpus.gpus:
        console.print(f"  GPUs: none ({result.gpus.detail or 'the VM reports no GPU'})")
    for g in result.gpus.gpus:
        flag = " [yellow]SIMULATED[/]" if g.simulated else ""
        console.print(
            f"  GPU {g.index}: {g.name} ({g.arch}), CC mode {g.cc_mode}, driver "
            f"{g.driver_version}, VBIOS {g.vbios_version}: evidence verified{flag}",
            highlight=False,
        )
    console.print(
        f"  server certificate (tdx_ca.pem) SHA-256: {result.server_fingerprint}", soft_wrap=True
    )
    if result.ownership == "claimed":
        console.print("[bold green]Ownership claimed[/]: this directory holds the VM owner's keys")
    else:
        console.print("[green]Already the owner of the VM[/]: nothing changed")
    console.print(f"  client certificate fingerprint: {result.client_fingerprint}", soft_wrap=True)
    if result.files:
        console.print(f"  wrote {', '.join(result.files)} (the key with mode 0600)")


def render_onboarding(console: Console, result: CaOnboarding) -> None:
    """The readable summary of step 1."""
    verdict = result.verdict
    if verdict.simulated:
        console.print(f"[bold yellow]{SIMULATED_BANNER}[/]")
    console.print(f"[bold green]CA attested[/] {result.url}  [dim]({result.url_source})[/]")
    console.print(
        f"  TCB status: {verdict.status}; advisories: {', '.join(verdict.advisories) or 'none'}"
    )
    for name in ("mrenclave", "mrsigner", "isv_prod_id", "isv_svn"):
        console.print(f"  {name}: {verdict.measurements.get(name)}", soft_wrap=True)
    console.print(f"  expected measurements from: {result.expected_from}", highlight=False)
    console.print(f"  CA root fingerprint (SHA-256): {result.root_fingerprint}", soft_wrap=True)
    if result.ownership == "claimed":
        console.print("[bold green]Ownership claimed[/]: this directory holds the owner's keys")
    else:
        console.print("[green]Already the owner[/]: nothing changed")
    console.print(f"  client certificate fingerprint: {result.client_fingerprint}", soft_wrap=True)
    if result.files:
        console.print(f"  wrote {', '.join(result.files)} (the key with mode 0600)")
