"""`modelyo docker …`: containers in the attested TDX VM, as the product document shows them.

    modelyo docker load -f my_image.tar
    modelyo docker create -i my_image -n my_container
    modelyo docker run my_container
    modelyo docker stop my_container
    modelyo docker delete my_container

plus `images`, `ps`, `logs`, `wait` and `cp`. Every call goes over mutual TLS to the VM pinned
in `tdx_ca.pem`, with the owner's `tdx_client.pem`/`tdx_client.key` from `modelyo attest`.
"""

from __future__ import annotations

import sys
import tarfile
import tempfile
from pathlib import Path

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from modelyo.api.agent import ContainerInfo, ContainerSpec
from modelyo.cli.render import print_json
from modelyo.client.agent import AgentClient, file_chunks
from modelyo.errors import ConfigError, ModelyoError
from modelyo.workspace import Workspace

# Archives are staged in memory up to this size, then on disk (the user's own machine).
SPOOL_BYTES = 16 * 1024 * 1024


def _client(ctx: click.Context) -> AgentClient:
    return AgentClient.for_owner(Workspace(ctx.obj["directory"].resolve()))


@click.group()
@click.option(
    "-C",
    "--directory",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("."),
    help="The directory `modelyo attest` wrote its files to (default: here).",
)
@click.pass_context
def docker(ctx: click.Context, directory: Path) -> None:
    """Load images and run containers in the attested TDX VM."""
    ctx.obj = {"directory": directory}


@docker.command()
@click.option(
    "-f",
    "--file",
    "tarball",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="A `docker save` tarball.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def load(ctx: click.Context, tarball: Path, quiet: bool) -> None:
    """Upload an image (`docker save` tarball) into the VM's Docker engine."""
    size = tarball.stat().st_size
    with _client(ctx) as client:
        if quiet:
            result = client.load_image(file_chunks(tarball))
        else:
            with Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                transient=True,
            ) as progress:
                task = progress.add_task(f"uploading {tarball.name}", total=size)
                result = client.load_image(
                    file_chunks(tarball, lambda n: progress.advance(task, n))
                )
    for image in result.images:
        click.echo(f"Loaded image: {', '.join(image.tags) or image.id}")


@docker.command()
@click.option("-i", "--image", required=True, help="Image name (as loaded).")
@click.option("-n", "--name", required=True, help="Container name.")
@click.option("-e", "--env", "environment", multiple=True, help="KEY=VALUE; repeatable.")
@click.option("--gpu", is_flag=True, help="Give the container the VM's GPUs.")
@click.option(
    "--key-id",
    default="default",
    show_default=True,
    help="Key id for its /modelyo encrypt/decrypt folders.",
)
@click.argument("command", nargs=-1)
@click.pass_context
def create(
    ctx: click.Context,
    image: str,
    name: str,
    environment: tuple[str, ...],
    gpu: bool,
    key_id: str,
    command: tuple[str, ...],
) -> None:
    """Create a container from an image (COMMAND overrides the image's)."""
    env: dict[str, str] = {}
    for item in environment:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="-e")
        env[key] = value
    spec = ContainerSpec(
        image=image,
        name=name,
        command=list(command) or None,
        environment=env,
        gpu=gpu,
        key_id=key_id,
    )
    with _client(ctx) as client:
        info = client.create(spec)
    click.echo(f"Created {info.name} ({info.id[:12]}) from {info.image}, key id {info.key_id}")


@docker.command()
@click.argument("name")
@click.pass_context
def run(ctx: click.Context, name: str) -> None:
    """Start a created container."""
    with _client(ctx) as client:
        info = client.start(name)
    click.echo(f"{info.name}: {info.status}")


@docker.command()
@click.argument("name")
@click.pass_context
def stop(ctx: click.Context, name: str) -> None:
    """Stop a running container."""
    with _client(ctx) as client:
        info = client.stop(name)
    click.echo(f"{info.name}: {info.status}")


@docker.command()
@click.argument("name")
@click.pass_context
def delete(ctx: click.Context, name: str) -> None:
    """Remove a container (and its /modelyo folders)."""
    with _client(ctx) as client:
        client.delete(name)
    click.echo(f"{name}: deleted")


@docker.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
def images(ctx: click.Context, as_json: bool) -> None:
    """List the images loaded into the VM."""
    with _client(ctx) as client:
        listing = client.images()
    if as_json:
        print_json(Console(), listing.model_dump())
        return
    for image in listing.images:
        click.echo(f"{image.id[:19]}  {', '.join(image.tags) or '<untagged>'}  {image.size} B")


def _row(info: ContainerInfo) -> str:
    code = "" if info.exit_code is None else f" (exit {info.exit_code})"
    gpu = " gpu" if info.gpu else ""
    return f"{info.name:20} {info.status}{code}{gpu}  {info.image}  key {info.key_id}"


@docker.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
def ps(ctx: click.Context, as_json: bool) -> None:
    """List your containers in the VM."""
    with _client(ctx) as client:
        listing = client.containers()
    if as_json:
        print_json(Console(), listing.model_dump())
        return
    for info in listing.containers:
        click.echo(_row(info))


@docker.command()
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="Keep streaming until the container exits.")
@click.pass_context
def logs(ctx: click.Context, name: str, follow: bool) -> None:
    """Print a container's output: its stdout to stdout, its stderr to stderr."""
    with _client(ctx) as client:
        for stream, data in client.logs(name, follow=follow, separate=True):
            target = sys.stderr.buffer if stream == "stderr" else sys.stdout.buffer
            target.write(data)
            target.flush()


@docker.command()
@click.argument("name")
@click.option("--timeout", type=float, help="Give up waiting after S seconds (exit 124).")
@click.pass_context
def wait(ctx: click.Context, name: str, timeout: float | None) -> None:
    """Wait for a container to exit; exit with its exit code."""
    with _client(ctx) as client:
        result = client.wait(name, timeout=timeout)
    if result.timed_out:
        click.echo(f"{name}: still running after {timeout} s", err=True)
        ctx.exit(124)
    click.echo(f"{name}: exited with {result.exit_code}")
    ctx.exit(result.exit_code)


def _split(target: str) -> tuple[str, str] | None:
    name, sep, path = target.partition(":")
    if sep and name and path.startswith("/"):
        return name, path
    return None


@docker.command()
@click.argument("source")
@click.argument("destination")
@click.pass_context
def cp(ctx: click.Context, source: str, destination: str) -> None:
    """Copy files between the container and here: NAME:/path LOCAL or LOCAL NAME:/path."""
    src, dst = _split(source), _split(destination)
    if bool(src) == bool(dst):
        raise click.UsageError("one side must be NAME:/absolute/path and the other a local path")
    with _client(ctx) as client:
        if src is not None:
            _copy_out(client, *src, Path(destination))
        else:
            assert dst is not None
            _copy_in(client, Path(source), *dst)


def _copy_out(client: AgentClient, name: str, path: str, local: Path) -> None:
    """Like `docker cp`: into LOCAL when it is a directory, else as LOCAL."""
    into_dir = local.is_dir()
    target = local if into_dir else local.parent
    target.mkdir(parents=True, exist_ok=True)
    top = Path(path.rstrip("/")).name
    with tempfile.SpooledTemporaryFile(SPOOL_BYTES) as spool:
        for chunk in client.get_archive(name, path):
            spool.write(chunk)
        spool.seek(0)
        with tarfile.open(fileobj=spool, mode="r|") as archive:
            for member in archive:
                if not into_dir:
                    first, _, rest = member.name.partition("/")
                    if first == top:
                        member.name = "/".join(p for p in (local.name, rest) if p)
                try:
                    # The data filter refuses absolute paths, links leaving the target, devices.
                    archive.extract(member, target, filter="data")
                except tarfile.FilterError as exc:
                    raise ModelyoError(
                        f"refused {member.name!r} from the container: {exc}"
                    ) from None
    click.echo(f"copied {name}:{path} to {local}")


def _copy_in(client: AgentClient, local: Path, name: str, path: str) -> None:
    if not local.exists():
        raise ConfigError(f"{local} does not exist")
    with tempfile.TemporaryFile() as spool:
        with tarfile.open(fileobj=spool, mode="w") as archive:
            archive.add(local, arcname=local.name)
        spool.seek(0)
        client.put_archive(name, path, iter(lambda: spool.read(1024 * 1024), b""))
    click.echo(f"copied {local} to {name}:{path}")
