"""How attestation results look in a terminal: one place, used by every command."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.markup import escape

from modelyo.attestation.quote import Quote
from modelyo.attestation.verify import Verdict

SIMULATED_BANNER = (
    "SIMULATED: trusted under the simulation root, not real Intel hardware. "
    "Nothing here proves hardware isolation."
)
_MARK = {True: "[green]ok[/]", False: "[red]FAILED[/]", None: "[yellow]--[/]"}


def print_json(console: Console, data: Any) -> None:
    """Machine-readable output: plain JSON, no colour, no wrapping."""
    console.file.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def render_quote(console: Console, quote: Quote) -> None:
    """The parsed fields a user debugging attestation looks at first, one per line."""
    h = quote.header
    sig = quote.signature_data
    rows: list[tuple[str, str]] = [
        ("size", f"{len(quote.raw)} bytes (signed region {quote.signed_size})"),
        ("qe vendor id", h.qe_vendor_id.hex()),
        ("qe svn / pce svn", f"{h.qe_svn} / {h.pce_svn}"),
    ]
    if quote.body_type is not None:
        rows.append(("body type", str(quote.body_type)))
    rows += list(quote.measurements().items())
    rows += [
        ("debug", "YES (never trusted)" if quote.debug else "no"),
        ("report data", quote.report_data.hex()),
        ("attestation key", sig.attestation_key.hex()),
        ("qe mrsigner", sig.qe_report.mr_signer.hex()),
        ("qe isvprodid / isvsvn", f"{sig.qe_report.isv_prod_id} / {sig.qe_report.isv_svn}"),
        ("pck chain", f"{len(sig.pck_chain_pem())} certificates (cert type {sig.cert_type})"),
    ]
    console.print(f"[bold]{quote.tee.upper()} quote v{quote.version}[/]")
    # soft_wrap: long hex values stay on one line, so they can be copied into a policy.
    for name, value in rows:
        console.print(f"  {name}: {value}", soft_wrap=True, highlight=False)


def render_verdict(console: Console, verdict: Verdict) -> None:
    """ACCEPTED or REFUSED, why, and what was checked."""
    if verdict.simulated:
        console.print(f"[bold yellow]{SIMULATED_BANNER}[/]")
    head = "[bold green]ACCEPTED[/]" if verdict.accepted else "[bold red]REFUSED[/]"
    what = f"{verdict.tee.upper()} quote" if verdict.tee else "quote"
    console.print(f"{head} {what} under the {verdict.root} root")
    if verdict.status:
        console.print(f"  TCB status: {verdict.status}")
        console.print(f"  advisories: {', '.join(verdict.advisories) or 'none'}")
    for name, value in verdict.measurements.items():
        console.print(f"  {name}: {value}", soft_wrap=True, highlight=False)
    console.print("checks:")
    for check in verdict.checks:
        console.print(f"  {_MARK[check.ok]} {check.name}: {escape(check.detail)}", highlight=False)
