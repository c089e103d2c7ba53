"""Modelyo jobs: run Python code with typed, encrypted inputs and outputs in the attested VM.

The client side (`run_job`, `open_session`) imports no IPython; the in-container side is
`python -m modelyo.jobs.runner`. Formats and flow: docs/jobs.md.
"""

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
from modelyo.jobs.codec import CODECS, read_dataframe, read_value, write_dataframe, write_value

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
