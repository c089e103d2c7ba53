"""`modelyo ca …`: the owner's view of the CA (VMs, policy, keys), from an onboarded directory."""

from __future__ import annotations

import json
from pathlib import Path

import click
from pydantic import ValidationError
from rich.console import Console

from modelyo.api.ca import CaPolicy
from modelyo.cli.render import print_json
from modelyo.client.ca import CaClient
from modelyo.errors import ConfigError
from modelyo.workspace import Workspace

_directory = click.option(
    "-C",
    "--directory",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("."),
    help="The directory `modelyo attest` wrote its files to (default: here).",
)


@click.group()
def ca() -> None:
    """Owner operations on the attested CA (run where `modelyo attest` stored its files)."""


@ca.command()
@_directory
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def vms(directory: Path, as_json: bool) -> None:
    """List the TDX VMs registered with the CA."""
    with CaClient.for_owner(Workspace(directory.resolve())) as client:
        listing = client.list_vms()
    console = Console()
    if as_json:
        print_json(console, listing.model_dump())
        return
    if not listing.vms:
        console.print("no VM has registered yet")
    for vm in listing.vms:
        flag = " SIMULATED" if vm.simulated else ""
        console.print(
            f"{vm.vm_id}  {vm.name}  TCB {vm.tcb_status}{flag}  keys {', '.join(vm.key_ids)}",
            soft_wrap=True,
        )


@ca.command()
@_directory
@click.option(
    "--set",
    "new_policy",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Replace the VM policy with this JSON file (see docs/ca.md).",
)
def policy(directory: Path, new_policy: Path | None) -> None:
    """Show the CA's policy for TDX VMs, or replace it with --set FILE."""
    with CaClient.for_owner(Workspace(directory.resolve())) as client:
        if new_policy is None:
            current = client.policy()
        else:
            try:
                parsed = CaPolicy.model_validate_json(new_policy.read_bytes())
            except (OSError, ValidationError) as exc:
                raise ConfigError(f"{new_policy} is not a valid CA policy: {exc}") from None
            current = client.set_policy(parsed)
    print_json(Console(), json.loads(current.model_dump_json()))


@ca.command()
@_directory
def rotate(directory: Path) -> None:
    """Add a master key version; files under older versions still decrypt."""
    with CaClient.for_owner(Workspace(directory.resolve())) as client:
        result = client.rotate()
    Console().print(f"new key version: {result.version}")
