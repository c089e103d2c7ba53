"""`modelyo attest`: verify the CA (and later the TDX VM) and take ownership of it."""

from __future__ import annotations

import os
from pathlib import Path

import click
from rich.console import Console

from modelyo import dev
from modelyo.attest import (
    CaOnboarding,
    TdxOnboarding,
    attest_ca,
    attest_tdx,
    expected_ca_policy,
    expected_tdx_policy,
)
from modelyo.attestation.verify import TrustRoot
from modelyo.cli.render import SIMULATED_BANNER, print_json
from modelyo.errors import ConfigError
from modelyo.workspace import Workspace, resolve_endpoint


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
    workspace = Workspace(directory.resolve())
    stack = dev.read_stack()
    running = dev.running_endpoints()
    endpoint = resolve_endpoint("ca", ca_url, workspace, dev_stack=running)
    if endpoint is None:
        raise ConfigError(
            "no CA endpoint: pass --ca URL, set MODELYO_CA_URL, write ca_url in ./modelyo.toml, "
            "or start the local stack with `modelyo dev up`"
        )
    config = workspace.config()
    from_stack = endpoint.source.startswith("the local stack")
    # Trusting the simulation root is always the user's explicit choice: the flag, a config
    # that recorded it, or starting the simulated stack with `modelyo dev up`.
    simulated = simulation or config.simulation or from_stack
    trust = TrustRoot.intel()
    if simulated:
        chosen = sim_dir or (Path(config.sim_dir) if config.sim_dir else None)
        if chosen is None and stack is not None:
            chosen = Path(stack.sim_dir)
        if chosen is None and os.environ.get("MODELYO_SIM_DIR"):
            chosen = Path(os.environ["MODELYO_SIM_DIR"])
        sim_dir = chosen
        trust = TrustRoot.simulation(sim_dir)
    policy_path = policy_file or (Path(config.policy) if config.policy else None)
    policy, expected_from = expected_ca_policy(
        policy_file=policy_path, mrenclave=mrenclave, mrsigner=mrsigner, simulation=simulated
    )
    result = attest_ca(
        workspace,
        endpoint,
        trust=trust,
        policy=policy,
        expected_from=expected_from,
        sim_dir=sim_dir,
        now=at,
    )
    console = Console()
    if not as_json:
        render_onboarding(console, result)
    tdx_endpoint = resolve_endpoint("tdx", tdx_url, workspace, dev_stack=running)
    tdx_result = None
    if tdx_endpoint is not None:
        tdx_policy, tdx_expected = expected_tdx_policy(
            policy_file=policy_path, mrtd=mrtd, simulation=simulated
        )
        tdx_result = attest_tdx(
            workspace,
            tdx_endpoint,
            trust=trust,
            policy=tdx_policy,
            expected_from=tdx_expected,
            sim_dir=sim_dir,
            now=at,
        )
    if as_json:
        print_json(
            console, {"ca": result.to_dict(), "tdx": tdx_result.to_dict() if tdx_result else None}
        )
    elif tdx_result is not None:
        render_tdx(console, tdx_result)
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
