"""Modelyo jobs: run Python code with typed, encrypted inputs and outputs in the attested VM.

The client side (`run_job`, `open_session`) imports no IPython; the in-container side is
`python -m modelyo.jobs.runner`. Formats and flow: docs/jobs.md.

Names are imported on first use: the runner (in every job's container) imports this package
too, and must not pay for the client's HTTP, TLS and attestation modules at each start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelyo.jobs.client import (
        DEFAULT_IMAGE,
        JobEvents,
        JobResult,
        JobSession,
        JobSpec,
        NullEvents,
        PrintEvents,
        open_session,
        run_job,
    )
    from modelyo.jobs.codec import (
        CODECS,
        read_dataframe,
        read_value,
        write_dataframe,
        write_value,
    )

_WHERE = {
    **dict.fromkeys(
        (
            "DEFAULT_IMAGE",
            "JobEvents",
            "JobResult",
            "JobSession",
            "JobSpec",
            "NullEvents",
            "PrintEvents",
            "open_session",
            "run_job",
        ),
        "modelyo.jobs.client",
    ),
    **dict.fromkeys(
        ("CODECS", "read_dataframe", "read_value", "write_dataframe", "write_value"),
        "modelyo.jobs.codec",
    ),
}

__all__ = [
    "CODECS",
    "DEFAULT_IMAGE",
    "JobEvents",
    "JobResult",
    "JobSession",
    "JobSpec",
    "NullEvents",
    "PrintEvents",
    "open_session",
    "read_dataframe",
    "read_value",
    "run_job",
    "write_dataframe",
    "write_value",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'modelyo.jobs' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
