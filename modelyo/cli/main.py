"""Entry point of the `modelyo` command.

Exit codes (documented in the README):
  0  success
  1  an error: the message says what is wrong and what to do
  2  the command line itself is wrong (click's usage errors)
  3  attestation or verification refused the evidence
"""

from __future__ import annotations

import importlib
import sys

import click

from modelyo import __version__
from modelyo.errors import AttestationError, ModelyoError

EXIT_ERROR = 1
EXIT_REFUSED = 3


# Each command lives in its own module, named here in one place and imported only when it
# runs: importing them all costs ~0.4 s and ~50 MiB before `modelyo encrypt` reads a byte.
COMMANDS = {
    "attest": "modelyo.cli.attest:attest",
    "audit": "modelyo.cli.audit:audit",
    "ca": "modelyo.cli.ca:ca",
    "decrypt": "modelyo.cli.crypt:decrypt",
    "dev": "modelyo.cli.dev:dev",
    "docker": "modelyo.cli.docker:docker",
    "encrypt": "modelyo.cli.crypt:encrypt",
    "image": "modelyo.cli.image:image",
    "measure": "modelyo.cli.measure:measure",
    "quote": "modelyo.cli.quote:quote",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, attr = target.partition(":")
        command = getattr(importlib.import_module(module), attr)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="modelyo")
def cli() -> None:
    """Modelyo: confidential GPU computing on attested Intel TDX VMs with an SGX key service."""


def main(argv: list[str] | None = None) -> int:
    """Run the CLI, turning Modelyo errors into a one-line message and an exit code."""
    try:
        # Without standalone mode click returns ctx.exit()'s code instead of raising it.
        code = cli.main(args=argv, prog_name="modelyo", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo("aborted", err=True)
        return EXIT_ERROR
    except AttestationError as exc:
        click.secho(f"refused: {exc}", fg="red", err=True)
        return EXIT_REFUSED
    except ModelyoError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        return EXIT_ERROR
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
