"""`modelyo measure ca|agent`: print the simulated measurement a policy should pin."""

from __future__ import annotations

import json
from pathlib import Path

import click

from modelyo.measure import COMPONENTS
from modelyo.measure import measure as compute

_HARDWARE_SOURCE = {
    "MRENCLAVE": "on SGX hardware MRENCLAVE measures the enclave as built; gramine-sgx-sign "
    "prints it",
    "MRTD": "on TDX hardware MRTD measures the TD's initial memory (its virtual firmware)",
}


@click.command("measure")
@click.argument("component", type=click.Choice(sorted(COMPONENTS)))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option(
    "--source-root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Measure the packages in this directory (e.g. a checkout) instead of the installed ones.",
)
def measure(component: str, as_json: bool, source_root: Path | None) -> None:
    """Print the expected simulated measurement (MRENCLAVE or MRTD) of COMPONENT.

    The value is a hash of the component's code, so pinning it in a policy detects any change.
    """
    result = compute(component, source_root=source_root)
    if result.missing:
        # Not an error (a laptop need not install the CA), but the value will not match a
        # deployment that runs the missing package, so the user must hear about it.
        click.secho(
            f"warning: {', '.join(result.missing)} not found, so only "
            f"{', '.join(result.packages)} was measured; this value will not match a "
            f"deployment that runs {', '.join(result.missing)}. Measure a checkout with "
            "--source-root DIR.",
            fg="yellow",
            err=True,
        )
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(f"{result.register} {result.hex}")
    click.echo(
        f"  {component} ({result.tee.name}): {result.file_count} files in "
        f"{', '.join(result.packages)}"
    )
    click.echo(
        f"  SIMULATED platform value (a hash of the code); {_HARDWARE_SOURCE[result.register]}"
    )
