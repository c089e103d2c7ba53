"""`modelyo audit verify`: check the CA's hash-chained, signed audit log."""

from __future__ import annotations

from pathlib import Path

import click
from pydantic import ValidationError
from rich.console import Console

from modelyo import pki
from modelyo.api.ca import AuditLog
from modelyo.audit import audit_problems
from modelyo.client.ca import CaClient
from modelyo.errors import AttestationError, ModelyoError
from modelyo.files import atomic_write_text
from modelyo.workspace import Workspace

DEFAULT_CA = Path("ca.pem")


def _load_log(path: Path) -> AuditLog:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelyoError(f"cannot read audit log {path}: {exc.strerror}") from None
    try:
        return AuditLog.model_validate_json(text)
    except ValidationError as exc:
        raise ModelyoError(
            f"{path} is not an audit log as GET /v1/audit returns it ({exc.error_count()} "
            "problems, first: "
            f"{'.'.join(str(p) for p in exc.errors()[0]['loc'])}: {exc.errors()[0]['msg']})"
        ) from None


@click.group()
def audit() -> None:
    """Check the Modelyo CA's audit log."""


@audit.command()
@click.argument("file", required=False, type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--save",
    type=click.Path(path_type=Path, dir_okay=False),
    help="When fetching from the CA, also keep the log in this file.",
)
@click.option(
    "--ca",
    "ca_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The pinned CA root certificate (default: ./ca.pem when present).",
)
def verify(file: Path | None, save: Path | None, ca_path: Path | None) -> None:
    """Verify FILE, an audit log (JSON, as GET /v1/audit returns it).

    Without FILE, fetch the log from the CA as its owner (run where `modelyo attest` stored
    its files) and verify that.

    Every entry's hash, its link to the previous entry and its signature by the CA root are
    checked. Against the pinned ca.pem the log proves it came from your CA; without it, only
    that it is internally consistent.
    """
    if file is None:
        with CaClient.for_owner(Workspace.here()) as client:
            log = client.audit()
        if save is not None:
            atomic_write_text(save, log.model_dump_json(indent=2))
    else:
        log = _load_log(file)
    console = Console(stderr=False)
    embedded = pki.load_cert(log.ca_certificate)
    pinned_path = ca_path or (DEFAULT_CA if DEFAULT_CA.is_file() else None)
    if pinned_path is not None:
        try:
            pinned = pki.load_cert(pinned_path.read_bytes())
        except OSError as exc:
            raise ModelyoError(
                f"cannot read CA certificate {pinned_path}: {exc.strerror}"
            ) from None
        if pki.fingerprint(pinned) != pki.fingerprint(embedded):
            raise AttestationError(
                f"audit log is signed for another CA: its CA certificate "
                f"{pki.fingerprint(embedded)[:16]}… is not the pinned {pinned_path} "
                f"({pki.fingerprint(pinned)[:16]}…)"
            )
        anchor = pinned
    else:
        anchor = embedded
        console.print(
            "[yellow]no ca.pem pinned (--ca): checking against the certificate inside the log, "
            "which proves consistency, not origin[/yellow]"
        )
    problems = audit_problems(log.entries, anchor)
    if problems:
        for problem in problems:
            console.print(f"[red]✗[/red] {problem}")
        raise AttestationError(
            f"audit log refused: {len(problems)} problem(s), first at seq {problems[0].seq}"
        )
    last = log.entries[-1] if log.entries else None
    summary = f"seq 0 to {last.seq}, last hash {last.hash}" if last else "empty"
    console.print(
        f"[green]✓[/green] audit log verifies: {len(log.entries)} entries ({summary}), signed by "
        f"CA root {pki.fingerprint(anchor)}"
    )
