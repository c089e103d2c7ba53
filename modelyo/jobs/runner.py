"""The in-container side of a job: `python -m modelyo.jobs.runner JOB_ENC RESULT_ENC`.

1. Have the agent decrypt JOB_ENC (this container's key) into /modelyo/dec_out (tmpfs), check
   the bundle, load the inputs, and remove the plaintext bundle.
2. exec() the code with the inputs as its globals; its stdout and stderr are the container's,
   so the client streams them as they come.
3. Encode the outputs into a staging folder on tmpfs (a hidden folder of /modelyo/enc_in, which
   the agent never takes), tar it through a pipe into /modelyo/enc_in to be encrypted, and
   move the encrypted outcome to RESULT_ENC atomically.

Exit codes: 0 the code ran (outputs may still be missing: the outcome lists them), 1 the code
raised (the outcome holds its traceback, runner frames trimmed, cell lines as `<cell>`),
2 the runner itself failed (message on stderr, no outcome).
"""

from __future__ import annotations

import builtins
import contextlib
import linecache
import os
import secrets
import shutil
import signal
import sys
import traceback
from pathlib import Path
from types import TracebackType
from typing import Any

from modelyo import incontainer
from modelyo.errors import CodecError, ModelyoError
from modelyo.jobs.bundle import (
    OUTCOME,
    OUTPUTS,
    BundleReader,
    JobManifest,
    JobOutcome,
    RemoteErrorInfo,
    ValueEntry,
    pack_directory,
    value_file,
)
from modelyo.jobs.codec import read_value, write_value
from modelyo.jobs.pipe import through_pipe

CELL = "<cell>"
EXIT_OK = 0
EXIT_USER_ERROR = 1
EXIT_RUNNER_ERROR = 2
_CHUNK = 1 << 20


def load_job(job_enc: str) -> tuple[JobManifest, dict[str, object]]:
    """Decrypt and check the job bundle; return its manifest and decoded inputs. The
    plaintext bundle is removed from /modelyo/dec_out before returning."""
    plain = incontainer.decrypt(job_enc, name=f"job-{secrets.token_hex(6)}.tar")
    try:
        with BundleReader(plain, "job") as bundle:
            manifest = bundle.header
            assert isinstance(manifest, JobManifest)
            inputs = {}
            for entry in manifest.inputs:
                with bundle.open(entry) as stream:
                    inputs[entry.name] = read_value(
                        stream, entry.codec, allow_pickle=manifest.allow_pickle
                    )
    finally:
        with contextlib.suppress(FileNotFoundError):
            plain.unlink()
    return manifest, inputs


def run_code(code: str, namespace: dict[str, Any]) -> RemoteErrorInfo | None:
    """exec() `code` in `namespace`; return the user's exception, formatted, if it raised."""
    # Registered so tracebacks show the cell's lines, as IPython does.
    linecache.cache[CELL] = (len(code), None, code.splitlines(keepends=True), CELL)
    try:
        compiled = compile(code, CELL, "exec")
        exec(compiled, namespace)  # noqa: S102 - running the owner's code is the point
    except BaseException as exc:  # the user's code may raise anything, SystemExit included
        return describe(exc, _user_frames(exc.__traceback__))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return None


def _user_frames(tb: TracebackType | None) -> TracebackType | None:
    """The traceback from the first frame of the cell on: the runner's frames are noise."""
    while tb is not None and tb.tb_frame.f_code.co_filename != CELL:
        tb = tb.tb_next
    return tb


def describe(exc: BaseException, tb: TracebackType | None) -> RemoteErrorInfo:
    lines = traceback.format_exception(type(exc), exc, tb)
    return RemoteErrorInfo(
        ename=type(exc).__name__,
        evalue=str(exc),
        traceback=[line for chunk in lines for line in chunk.splitlines(keepends=True)],
    )


def collect(
    manifest: JobManifest, namespace: dict[str, Any], staging: Path
) -> tuple[list[ValueEntry], list[str], RemoteErrorInfo | None]:
    """Encode each output found in `namespace` into `staging/outputs/`."""
    (staging / OUTPUTS).mkdir(mode=0o700)
    found: list[ValueEntry] = []
    missing: list[str] = []
    for name in manifest.outputs:
        if name not in namespace:
            missing.append(name)
            continue
        partial = staging / OUTPUTS / f".{name}.part"
        try:
            with open(partial, "xb") as sink:
                codec = write_value(namespace[name], sink, allow_pickle=manifest.allow_pickle)
        except CodecError as exc:
            error = RemoteErrorInfo(
                ename="CodecError",
                evalue=f"output {name!r} cannot be sent back: {exc}",
                traceback=[],
            )
            return [], [], error
        file = value_file(OUTPUTS, name, codec)
        os.rename(partial, staging / file)
        found.append(ValueEntry(name=name, codec=codec, file=file))
    return found, missing, None


def seal_outcome(staging: Path, result_enc: str) -> None:
    """Tar `staging` into the agent's encryption folder and put the result at `result_enc`."""
    name = f"result-{secrets.token_hex(6)}.tar"
    _header, sealed = through_pipe(
        lambda pipe: pack_directory(staging, pipe, "result"),
        lambda pipe: incontainer.encrypt(pipe, name=name),  # type: ignore[arg-type]
    )
    target = Path(result_enc)
    partial = target.with_name(f".{target.name}.{secrets.token_hex(6)}.part")
    try:
        with sealed.open("rb") as src, open(partial, "xb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
        os.replace(partial, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        with contextlib.suppress(FileNotFoundError):
            sealed.unlink()


def run(job_enc: str, result_enc: str) -> int:
    """The whole job; returns the exit code (see the module docstring)."""
    manifest, inputs = load_job(job_enc)
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins, **inputs}
    del inputs
    error = run_code(manifest.code, namespace)
    # The staging folder is a hidden one in enc_in: on tmpfs, and never taken by the agent.
    staging = incontainer.root() / "enc_in" / f".job-{secrets.token_hex(6)}"
    staging.mkdir(mode=0o700)
    try:
        outputs: list[ValueEntry] = []
        missing: list[str] = []
        if error is None:
            outputs, missing, error = collect(manifest, namespace, staging)
        namespace.clear()
        outcome = JobOutcome(
            status="ok" if error is None else "error",
            outputs=outputs,
            missing=missing,
            error=error,
        )
        (staging / OUTCOME).write_text(outcome.model_dump_json())
        seal_outcome(staging, result_enc)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return EXIT_OK if error is None else EXIT_USER_ERROR


def _exit_on_sigterm() -> None:
    # The runner is PID 1 in its container, and PID 1 ignores SIGTERM unless it handles it:
    # without this, stopping a job (timeout, Ctrl-C) would wait for Docker's SIGKILL.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: os._exit(128 + signal.SIGTERM))


def main(argv: list[str] | None = None) -> int:
    _exit_on_sigterm()
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m modelyo.jobs.runner JOB_ENC RESULT_ENC", file=sys.stderr)
        return EXIT_RUNNER_ERROR
    try:
        return run(*args)
    except (ModelyoError, OSError) as exc:
        print(f"modelyo job runner: {exc}", file=sys.stderr, flush=True)
        return EXIT_RUNNER_ERROR
    except Exception:  # a bug of the runner: show everything, still with its own exit code
        print("modelyo job runner: internal error", file=sys.stderr)
        traceback.print_exc()
        return EXIT_RUNNER_ERROR


if __name__ == "__main__":
    sys.exit(main())
