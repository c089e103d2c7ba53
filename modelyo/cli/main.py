"""Entry point of the `modelyo` command.

Exit codes (documented in the README):
  0  success
  1  an error: the message says what is wrong and what to do
  2  the command line itself is wrong (click's usage errors)
  3  attestation or verification refused the evidence
"""

from __future__ import annotations

import sys

import click

from modelyo import __version__
from modelyo.errors import AttestationError, ModelyoError

EXIT_ERROR = 1
EXIT_REFUSED = 3


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="modelyo")
def cli() -> None:
    """Modelyo: confidential GPU computing on attested Intel TDX VMs with an SGX key service."""


def _register() -> None:
    # Each command group lives in its own module; they are attached here, in one place.
    from modelyo.cli.attest import attest
    from modelyo.cli.audit import audit
    from modelyo.cli.ca import ca
    from modelyo.cli.crypt import decrypt, encrypt
    from modelyo.cli.dev import dev
    from modelyo.cli.docker import docker
    from modelyo.cli.image import image
    from modelyo.cli.measure import measure
    from modelyo.cli.quote import quote

    cli.add_command(attest)
    cli.add_command(dev)
    cli.add_command(docker)
    cli.add_command(quote)
    cli.add_command(image)
    cli.add_command(measure)
    cli.add_command(audit)
    cli.add_command(ca)
    cli.add_command(encrypt)
    cli.add_command(decrypt)


_register()


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
