"""`modelyo dev up|down|status`: the local stack on the SIMULATED platform."""

from __future__ import annotations

import click
from rich.console import Console

from modelyo import dev as stack
from modelyo.cli.render import print_json


@click.group()
def dev() -> None:
    """Run the Modelyo stack on this machine (SIMULATED platform, real Docker engine)."""


@dev.command()
@click.option("--ca-port", type=int, help=f"CA port (default {stack.DEFAULT_CA_PORT} if free).")
@click.option(
    "--agent-port", type=int, help=f"Agent port (default {stack.DEFAULT_AGENT_PORT} if free)."
)
@click.option(
    "--gpus",
    type=click.IntRange(min=0),
    default=stack.DEFAULT_GPUS,
    show_default=True,
    help="SIMULATED GPUs of the agent's VM.",
)
def up(ca_port: int | None, agent_port: int | None, gpus: int) -> None:
    """Start the local stack: the CA and the agent (or show it if it already runs)."""
    info = stack.up(ca_port=ca_port, agent_port=agent_port, gpus=gpus)
    console = Console()
    console.print("[bold yellow]SIMULATED[/] local stack is up (no SGX/TDX hardware)")
    if info.ca:
        console.print(f"  CA     {info.ca.url}   log {info.ca.log}", soft_wrap=True)
    if info.agent:
        console.print(
            f"  agent  {info.agent.url}   log {info.agent.log} (registered with the CA)",
            soft_wrap=True,
        )
    console.print(f"  state {info.dev_dir}")
    console.print("Next: `modelyo attest` (finds this stack without flags)")


@dev.command()
def down() -> None:
    """Stop the local stack; its state is kept for the next `up`."""
    stopped = stack.down()
    Console().print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@dev.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def status(as_json: bool) -> None:
    """Show what runs where."""
    info = stack.status()
    console = Console()
    if as_json:
        print_json(console, info)
        return
    console.print(f"dev dir: {info['dev_dir']}")
    services = info["services"]
    assert isinstance(services, dict)
    if not services:
        console.print("nothing recorded: run `modelyo dev up`")
    for name, service in services.items():
        state = "[green]running[/]" if service["running"] else "[red]stopped[/]"
        line = f"  {name}: {state} {service['url']} (pid {service['pid']})"
        if service["running"] and "registered" in service:
            line += (
                ", registered with the CA"
                if service["registered"]
                else f", [yellow]not registered[/]: {service['detail']}"
            )
        console.print(line, soft_wrap=True, highlight=False)
