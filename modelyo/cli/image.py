"""`modelyo image`: container images Modelyo builds for jobs, without a registry."""

from __future__ import annotations

import click

# base.py imports the docker SDK only when it builds, so this import is cheap.
from modelyo.images.base import DEFAULT_TAG
from modelyo.images.base import build_base as build


@click.group()
def image() -> None:
    """Build and inspect the container images jobs run in."""


@image.command("build-base")
@click.option(
    "--force",
    is_flag=True,
    help="Bootstrap Debian again, download the wheels again and build without the cache.",
)
@click.option("--tag", default=DEFAULT_TAG, show_default=True, help="Tag of the job image.")
def build_base(force: bool, tag: str) -> None:
    """Build the job base image (Debian bookworm, Python 3.11, pandas, pyarrow, modelyo).

    Nothing is pulled from a registry: Debian comes from mmdebstrap, the wheels are downloaded
    on this machine, and the build itself runs with the network off. An image whose inputs are
    unchanged is reused at once; a changed modelyo tree rebuilds only the top layer.
    """
    build(tag, force=force)
