"""What the magics show in a notebook: cards (attestation, status) and a job's progress.

Every view has a plain-text form as well as its widget: nbconvert, papermill, CI logs, VS Code
and terminal IPython may not render widgets, so a widget's `text/plain` is the full card, never
the widget's repr. The card content is plain data (`Card`), rendered as text or HTML by pure
functions; ipywidgets is imported only when a widget is built.
"""

from __future__ import annotations

import html
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["", "ok", "warn", "bad"]
ProgressMode = Literal["widget", "text", "none"]

_COLOURS = {"ok": "#1a7f37", "warn": "#9a6700", "bad": "#cf222e", "": "inherit"}
_BANNER_STYLE = (
    "background:#fff3b0;color:#5c3c00;border:2px solid #d4a72c;border-radius:4px;"
    "padding:6px 10px;font-weight:bold;margin-bottom:6px"
)


@dataclass(frozen=True)
class Row:
    """One labelled value; `status` colours it (and marks it in text when not ok)."""

    label: str
    value: str
    status: Status = ""


@dataclass(frozen=True)
class Section:
    title: str
    rows: tuple[Row, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class Card:
    """A titled list of sections, with an optional banner shown above everything (SIMULATED)."""

    title: str
    sections: tuple[Section, ...] = ()
    banner: str = ""
    footer: str = ""


# --- pure rendering -----------------------------------------------------------------------------


def card_text(card: Card) -> str:
    """The card as plain text: what terminals, logs and saved notebooks show."""
    lines: list[str] = []
    if card.banner:
        rule = "!" * min(100, len(card.banner) + 8)
        lines += [rule, f"!!! {card.banner}", rule]
    lines.append(card.title)
    for section in card.sections:
        lines.append(f"{section.title}:")
        width = max((len(row.label) for row in section.rows), default=0)
        for row in section.rows:
            mark = {"warn": " [!]", "bad": " [FAILED]"}.get(row.status, "")
            lines.append(f"  {row.label.ljust(width)}  {row.value}{mark}")
        if section.note:
            lines.append(f"  {section.note}")
    if card.footer:
        lines.append(card.footer)
    return "\n".join(lines)


def banner_html(text: str) -> str:
    return f'<div style="{_BANNER_STYLE}">&#9888; {html.escape(text)}</div>'


def section_html(section: Section) -> str:
    cells = []
    for row in section.rows:
        colour = _COLOURS[row.status]
        cells.append(
            "<tr>"
            f'<td style="padding:1px 12px 1px 0;color:#57606a;white-space:nowrap">'
            f"{html.escape(row.label)}</td>"
            f'<td style="padding:1px 0;color:{colour};font-family:monospace;'
            f'word-break:break-all">{html.escape(row.value)}</td>'
            "</tr>"
        )
    note = (
        f'<div style="color:#57606a;margin-top:2px">{html.escape(section.note)}</div>'
        if section.note
        else ""
    )
    return (
        f'<div style="margin:4px 0"><b>{html.escape(section.title)}</b>'
        f'<table style="border-collapse:collapse;margin-left:8px">{"".join(cells)}</table>'
        f"{note}</div>"
    )


def card_html(card: Card) -> str:
    """The card as one HTML fragment (escaped), for frontends without a widget manager."""
    parts = [banner_html(card.banner)] if card.banner else []
    parts.append(f'<div style="font-size:1.1em;font-weight:bold">{html.escape(card.title)}</div>')
    parts += [section_html(s) for s in card.sections]
    if card.footer:
        parts.append(f"<div>{html.escape(card.footer)}</div>")
    return '<div class="modelyo-card">' + "".join(parts) + "</div>"


class CardView:
    """A card without ipywidgets: HTML where it renders, the text everywhere else."""

    def __init__(self, card: Card) -> None:
        self.card = card

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, str]:
        return {"text/plain": card_text(self.card), "text/html": card_html(self.card)}

    def __repr__(self) -> str:
        return card_text(self.card)


def have_widgets() -> bool:
    """Whether ipywidgets can be imported (the `jupyter` extra installs it)."""
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def card_widget(card: Card) -> Any:
    """The card as an ipywidgets VBox of HTML parts whose text/plain and text/html are the
    card's own (so a saved notebook keeps the content even without widget state)."""
    import ipywidgets as w

    class CardWidget(w.VBox):
        def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any] | None:
            bundle = super()._repr_mimebundle_(**kwargs) or {}
            bundle["text/plain"] = card_text(card)
            bundle["text/html"] = card_html(card)
            return bundle

    children = [w.HTML(banner_html(card.banner))] if card.banner else []
    children.append(w.HTML(f"<b style='font-size:1.1em'>{html.escape(card.title)}</b>"))
    children += [w.HTML(section_html(s)) for s in card.sections]
    if card.footer:
        children.append(w.HTML(html.escape(card.footer)))
    widget = CardWidget(children=children)
    widget.add_class("modelyo-card")
    return widget


def card_display(card: Card) -> Any:
    """The object to `display()`: a widget when ipywidgets is there, else a `CardView`."""
    return card_widget(card) if have_widgets() else CardView(card)


# --- job progress -------------------------------------------------------------------------------

LABEL_INTERVAL = 0.5  # seconds between elapsed-time updates of the status line
# Text mode: a transfer of known size prints at each quarter; of unknown size, this often.
TEXT_TRANSFER_INTERVAL = 10.0
PHASES = ("packaging", "uploading", "starting", "running", "collecting", "done")
FINAL_PHASES = {
    "done": "success",
    "failed": "danger",
    "timed out": "danger",
    "interrupted": "warning",
}


def format_transfer(done: int, total: int | None) -> str:
    """'120.5/480.0 MiB', or '120.5 MiB' when the total is unknown (one unit for both)."""
    largest = max(done, total or 0)
    unit, scale = next(
        ((u, f) for u, f in (("GiB", 1 << 30), ("MiB", 1 << 20)) if largest >= f), ("KiB", 1024)
    )
    text = f"{done / scale:.1f}"
    return (f"{text}/{total / scale:.1f}" if total is not None else text) + f" {unit}"


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes} min {rest:02d} s"


@dataclass
class ProgressState:
    """Where a job is, as the events told it (pure: tested without any display)."""

    started: float
    phase: str = "waiting"
    detail: str = ""
    changed: float = 0.0
    history: list[str] = field(default_factory=list)
    # Bytes (done, total or None) of the current phase's transfer, if it reported one.
    transfer: tuple[int, int | None] | None = None

    @property
    def final(self) -> bool:
        return self.phase in FINAL_PHASES

    def fraction(self) -> float:
        """Share of the phases done (a failed job keeps where it stopped)."""
        if self.phase == "done":
            return 1.0
        if self.phase in PHASES:
            step = 1 / (len(PHASES) - 1)
            share = 0.0
            if self.transfer is not None and self.transfer[1]:
                share = min(1.0, self.transfer[0] / self.transfer[1])
            return PHASES.index(self.phase) * step + share * step
        done = [p for p in self.history if p in PHASES]
        return PHASES.index(done[-1]) / (len(PHASES) - 1) if done else 0.0

    def line(self, now: float) -> str:
        """One status line: the phase, the elapsed time, the detail."""
        elapsed = format_seconds(now - self.started)
        phase = self.phase
        if self.transfer is not None and not self.final:
            phase += " " + format_transfer(*self.transfer)
        head = f"{phase} in {elapsed}" if self.final else f"{phase} ({elapsed})"
        return f"modelyo_run: {head}" + (f": {self.detail}" if self.detail else "")


class JobProgress:
    """`modelyo.jobs.JobEvents` for a notebook cell.

    Phases go to a status widget (an HBox of an HTML line and a progress bar) in a kernel, to
    printed lines otherwise (mode "text"), or nowhere (mode "none", `-q`). The remote
    stdout/stderr go to the cell's `sys.stdout`/`sys.stderr` as they arrive. Byte counts of
    packaging, uploading and collecting (`transfer`) show in the line ("uploading
    120.5/480.0 MiB") and move the bar; in text mode they print at most a few lines. Output
    and transfers may come from the job's worker threads while the cell runs.
    """

    def __init__(
        self,
        mode: ProgressMode,
        *,
        clock: Callable[[], float] = time.monotonic,
        display: Callable[..., Any] | None = None,
    ) -> None:
        self.mode = mode
        self._clock = clock
        self.state = ProgressState(started=clock())
        self._display = display
        self._handle: Any = None
        self.widget: Any = None
        self._label: Any = None
        self._bar: Any = None
        self._ticked = self.state.started
        self._printed: tuple[int, float] = (0, self.state.started)  # quarter, time

    # JobEvents --------------------------------------------------------------------------------

    def phase(self, phase: str, detail: str = "") -> None:
        now = self._clock()
        self.state.phase, self.state.detail, self.state.changed = phase, detail, now
        self.state.history.append(phase)
        self.state.transfer = None
        self._printed = (0, now)
        if self.mode == "text":
            print(f"[{self.state.line(now)}]", file=sys.stdout, flush=True)
        elif self.mode == "widget":
            self._show(now)

    def output(self, stream: str, text: str) -> None:
        target = sys.stderr if stream == "stderr" else sys.stdout
        target.write(text)
        target.flush()
        now = self._clock()
        # The elapsed time moves with the output, at most twice a second (one comm message each).
        if self.mode == "widget" and self._label is not None and not self.state.final:
            if now - self._ticked >= LABEL_INTERVAL:
                self._ticked = now
                self._label.value = html.escape(self.state.line(now))

    def transfer(self, phase: str, done: int, total: int | None) -> None:
        if phase != self.state.phase or self.state.final:
            return  # late news of a step already over
        self.state.transfer = (done, total)
        now = self._clock()
        if self.mode == "widget" and self._label is not None:
            self._ticked = now
            self._label.value = html.escape(self.state.line(now))
            self._bar.value = self.state.fraction()
        elif self.mode == "text" and self._text_due(done, total, now):
            print(f"[{self.state.line(now)}]", file=sys.stdout, flush=True)

    def _text_due(self, done: int, total: int | None, now: float) -> bool:
        """Whether a transfer deserves a printed line: each new quarter of a known size,
        every TEXT_TRANSFER_INTERVAL seconds of an unknown one."""
        quarter, printed = self._printed
        if total:
            reached = min(4, done * 4 // total)
            if reached > quarter:
                self._printed = (reached, now)
                return True
            return False
        if now - printed >= TEXT_TRANSFER_INTERVAL:
            self._printed = (quarter, now)
            return True
        return False

    # display ----------------------------------------------------------------------------------

    def text(self) -> str:
        return self.state.line(self._clock() if not self.state.final else self.state.changed)

    def _show(self, now: float) -> None:
        import ipywidgets as w

        progress = self

        class StatusWidget(w.HBox):
            def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any] | None:
                bundle = super()._repr_mimebundle_(**kwargs) or {}
                bundle["text/plain"] = progress.text()
                return bundle

        line = html.escape(self.state.line(now))
        style = FINAL_PHASES.get(self.state.phase, "info")
        if self.widget is None:
            self._label = w.HTML(line, layout=w.Layout(min_width="28em"))
            self._bar = w.FloatProgress(
                value=self.state.fraction(), min=0.0, max=1.0, bar_style=style
            )
            self.widget = StatusWidget([self._label, self._bar])
            self.widget.add_class("modelyo-job-progress")
            self._handle = self._show_display(self.widget)
            return
        self._label.value = line
        self._bar.value = self.state.fraction()
        self._bar.bar_style = style
        if self.state.final and self._handle is not None:
            # Re-publish once at the end, so a saved notebook's text/plain is the final line.
            self._handle.update(self.widget)

    def _show_display(self, obj: Any) -> Any:
        if self._display is not None:
            return self._display(obj, display_id=True)
        from IPython.display import display

        return display(obj, display_id=True)
