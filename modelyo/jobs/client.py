"""Run a job in the attested TDX VM: package, encrypt, run in a fresh container, bring back.

    from modelyo.jobs import JobSpec, open_session
    with open_session() as session:                      # the workspace `modelyo attest` made
        result = session.run(JobSpec("total = df.x.sum()", inputs={"df": df}, outputs=["total"]))
    result.outputs["total"]

The bundle is encrypted here under `spec.key_id` with the owner's key from the CA; the
container, created with the same key id, gets the same key from the CA through the agent, so
the plaintext exists only in this process's memory and in the container's tmpfs. See
docs/jobs.md for the format and the flow.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import secrets
import tarfile
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from modelyo.api import agent as api
from modelyo.client.agent import AgentClient
from modelyo.client.http import ServiceError
from modelyo.encryption import KeySource, decrypt_stream, encrypt_stream
from modelyo.errors import (
    EncryptionError,
    JobError,
    JobTimeoutError,
    ModelyoError,
    RemoteExecutionError,
)
from modelyo.jobs.bundle import (
    INPUTS,
    BundleReader,
    BundleWriter,
    JobManifest,
    JobOutcome,
    ValueEntry,
    check_name,
    value_file,
)
from modelyo.jobs.codec import Encoding, plan_value, read_value, write_planned
from modelyo.jobs.pipe import PipeSink, through_pipe
from modelyo.workspace import (
    Workspace,
)

# Equal to modelyo.images.base.DEFAULT_TAG (not imported: that module needs the docker SDK).
DEFAULT_IMAGE = "modelyo/python:3.11"
JOB_DIR = "/tmp"  # noqa: S108 - a folder inside the container; it holds only ciphertext
JOB_FILE = "modelyo-job.enc"
RESULT_FILE = "modelyo-result.enc"
RUNNER = ["python", "-u", "-m", "modelyo.jobs.runner"]
EXIT_USER_ERROR = 1
# Lines of output kept to explain a runner failure.
TAIL_LINES = 30
_CHUNK = 1 << 20
_POLL = 0.05
# Seconds between two `transfer` events of one step (besides its last).
TRANSFER_INTERVAL = 0.1


@dataclass
class JobSpec:
    """What to run: `code` with `inputs` as globals, bringing back the globals `outputs`."""

    code: str
    inputs: Mapping[str, object] = field(default_factory=dict)
    outputs: Sequence[str] = ()
    image: str = DEFAULT_IMAGE
    gpu: bool = False
    timeout: float | None = None
    key_id: str = "default"
    allow_pickle: bool = False
    name: str | None = None


class JobEvents(Protocol):
    """What a job reports while it runs (a progress widget, a terminal)."""

    def phase(self, phase: str, detail: str = "") -> None:
        """packaging, uploading, starting, running, collecting, then done, or failed,
        timed out, interrupted."""

    def output(self, stream: str, text: str) -> None:
        """Output of the code as it arrives, "stdout" or "stderr" (in the order the
        container's engine received it)."""

    # Optional (called only when defined; `NullEvents` has it):
    # def transfer(self, phase: str, done: int, total: int | None) -> None:
    #     """Bytes done of a long step: "packaging" (input bytes encoded so far, total
    #     unknown), "uploading" (bytes of the sealed bundle sent, of its size), "collecting"
    #     (bytes of the sealed result received, total unknown). At most about
    #     TRANSFER_INTERVAL apart, and once at the end of each step; possibly from a worker
    #     thread."""


class NullEvents:
    """Reports nothing; a base class for events that report only some things."""

    def phase(self, phase: str, detail: str = "") -> None:
        pass

    def output(self, stream: str, text: str) -> None:
        pass

    def transfer(self, phase: str, done: int, total: int | None) -> None:
        pass


class PrintEvents(NullEvents):
    """Writes the job's output to this process's stdout and stderr."""

    def output(self, stream: str, text: str) -> None:
        import sys

        target = sys.stderr if stream == "stderr" else sys.stdout
        target.write(text)
        target.flush()


@dataclass
class JobResult:
    outputs: dict[str, object]
    container: str
    exit_code: int
    seconds: float


class _Transfer:
    """Counts the bytes of one step and reports them to `events.transfer`, if it has one,
    at most every TRANSFER_INTERVAL seconds, and once more at the end (`finish`)."""

    def __init__(
        self,
        events: JobEvents,
        phase: str,
        total: int | None = None,
        *,
        clock: Any = time.monotonic,
    ) -> None:
        self._report = getattr(events, "transfer", None)
        self.phase, self.total, self.done = phase, total, 0
        self._clock = clock
        self._last = -TRANSFER_INTERVAL
        self._reported = -1

    def add(self, count: int) -> None:
        if not count:
            return
        self.done += count
        if self._report is not None and self._clock() - self._last >= TRANSFER_INTERVAL:
            self._emit()

    def finish(self) -> None:
        if self._report is not None and self._reported != self.done:
            self._emit()

    def _emit(self) -> None:
        self._last = self._clock()
        self._reported = self.done
        self._report(self.phase, self.done, self.total)  # type: ignore[misc]

    def counted(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """`chunks`, counted as they are taken."""
        for chunk in chunks:
            yield chunk
            self.add(len(chunk))
        self.finish()


# --- packaging -----------------------------------------------------------------------------------


def package(spec: JobSpec) -> tuple[JobManifest, dict[str, Encoding]]:
    """The manifest of `spec` and how each input file will be encoded (nothing is encoded
    yet: `seal_bundle` does it, one input at a time). Pure."""
    encodings: dict[str, Encoding] = {}
    entries: list[ValueEntry] = []
    for name, value in spec.inputs.items():
        check_name(name, "input")
        encoding = plan_value(value, allow_pickle=spec.allow_pickle)
        file = value_file(INPUTS, name, encoding.codec)
        encodings[file] = encoding
        entries.append(ValueEntry(name=name, codec=encoding.codec, file=file))
    for name in spec.outputs:
        check_name(name, "output")
    try:
        manifest = JobManifest(
            code=spec.code,
            inputs=entries,
            outputs=list(spec.outputs),
            allow_pickle=spec.allow_pickle,
        )
    except ValueError as exc:
        raise JobError(f"the job is invalid: {exc}") from None
    return manifest, encodings


def seal_bundle(
    manifest: JobManifest,
    encodings: Mapping[str, Encoding],
    keys: KeySource,
    key_id: str,
    progress: _Transfer | None = None,
) -> IO[bytes]:
    """Encode the inputs, tar and encrypt the bundle, through a pipe, into an anonymous temp
    file (ciphertext only); return it rewound.

    A tar member's size comes before its bytes, so each input is encoded into memory first,
    one at a time, and streamed into the tar from there (not copied again); only one encoded
    input exists at any time. `progress` counts the encoded input bytes as they are made
    (from the encoding thread).
    """
    sealed = tempfile.TemporaryFile(prefix="modelyo-job-")

    def produce(pipe: PipeSink) -> None:
        with BundleWriter(pipe, manifest) as bundle:  # type: ignore[arg-type]
            for entry in manifest.inputs:
                encoded = _Checked(pipe, progress)
                write_planned(encodings[entry.file], encoded)
                with encoded.getbuffer() as view:
                    bundle.add_bytes(entry.file, view)
                del encoded

    try:
        through_pipe(produce, lambda pipe: encrypt_stream(pipe, sealed, keys, key_id))
    except BaseException:
        sealed.close()
        raise
    if progress is not None:
        progress.finish()
    sealed.seek(0)
    return sealed


class _Checked(io.BytesIO):
    """An in-memory buffer whose writes stop when the pipe's consumer did (Ctrl-C, the
    encrypter failed), so encoding a large input does not run on for nothing."""

    def __init__(self, pipe: PipeSink, progress: _Transfer | None = None) -> None:
        super().__init__()
        self._pipe = pipe
        self._progress = progress

    def write(self, data: Any) -> int:
        self._pipe.check()
        written = super().write(data)
        if self._progress is not None:
            self._progress.add(written)
        return written


def tar_one_file(
    name: str, handle: IO[bytes], progress: _Transfer | None = None
) -> Iterator[bytes]:
    """A ustar archive holding `handle`'s bytes as `name`, in upload-sized chunks;
    `progress` counts `handle`'s bytes as they are taken (sent)."""
    handle.seek(0, io.SEEK_END)
    size = handle.tell()
    handle.seek(0)
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, int(time.time())
    yield info.tobuf(format=tarfile.USTAR_FORMAT)
    while chunk := handle.read(_CHUNK):
        yield chunk
        if progress is not None:
            progress.add(len(chunk))
    if progress is not None:
        progress.finish()
    yield b"\0" * (-size % tarfile.BLOCKSIZE) + b"\0" * (2 * tarfile.BLOCKSIZE)


def untar_one_file(chunks: Iterator[bytes], name: str, sink: IO[bytes]) -> None:
    """Write the one file `name` of a streamed tar (from the agent's archive) to `sink`."""
    with tempfile.TemporaryFile(prefix="modelyo-result-") as spool:
        for chunk in chunks:
            spool.write(chunk)
        spool.seek(0)
        try:
            with tarfile.open(fileobj=spool, mode="r:") as tar:
                member = tar.getmember(name)
                source = tar.extractfile(member) if member.isreg() else None
                if source is None:
                    raise JobError(f"the job's {name} is not a regular file")
                while chunk := source.read(_CHUNK):
                    sink.write(chunk)
        except (tarfile.TarError, KeyError) as exc:
            raise JobError(f"the agent sent an unreadable archive of {name}: {exc}") from None


def decode_outcome(
    plain: bytes | io.BytesIO, allow_pickle: bool
) -> tuple[JobOutcome, dict[str, object]]:
    """The outcome and its decoded outputs, from the decrypted result bundle (read in place:
    no value is copied out of `plain` before decoding)."""
    with BundleReader(plain, "result") as bundle:
        outcome = bundle.header
        assert isinstance(outcome, JobOutcome)
        outputs = {}
        for entry in outcome.outputs:
            view = bundle.view(entry)
            source = view if view is not None else bundle.open(entry)
            outputs[entry.name] = read_value(source, entry.codec, allow_pickle=allow_pickle)
    return outcome, outputs


def remote_error(outcome: JobOutcome) -> RemoteExecutionError:
    assert outcome.error is not None
    error = outcome.error
    text = "".join(error.traceback).rstrip()
    message = f"the job's code raised {error.ename}: {error.evalue}"
    if text:
        message += f"\n\nRemote traceback (in the attested VM):\n{text}"
    return RemoteExecutionError(
        message, ename=error.ename, evalue=error.evalue, remote_traceback=list(error.traceback)
    )


# --- running -------------------------------------------------------------------------------------


class _LogReader(threading.Thread):
    """Follows the container's stdout and stderr (apart, in order) and hands them to
    `events.output`, each decoded as UTF-8 on its own (a character may span two frames)."""

    def __init__(self, agent: AgentClient, name: str, events: JobEvents) -> None:
        super().__init__(name=f"modelyo-logs-{name}", daemon=True)
        self._agent, self._container, self._events = agent, name, events
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.error: BaseException | None = None
        self._decoders = {
            stream: codecs.getincrementaldecoder("utf-8")(errors="replace")
            for stream in ("stdout", "stderr")
        }
        self._pending = {"stdout": "", "stderr": ""}

    def run(self) -> None:
        try:
            for stream, data in self._agent.logs(self._container, follow=True, separate=True):
                self._emit(stream, self._decoders[stream].decode(data))
            for stream, decoder in self._decoders.items():
                self._emit(stream, decoder.decode(b"", final=True))
        except BaseException as exc:  # reported by the main thread, if it matters
            self.error = exc

    def _emit(self, stream: str, text: str) -> None:
        if not text:
            return
        self._events.output(stream, text)
        lines = (self._pending[stream] + text).split("\n")
        self._pending[stream] = lines.pop()
        self.tail.extend(lines)

    def last_lines(self) -> str:
        return "\n".join([*self.tail, *self._pending.values()]).strip()


def _remove(agent: AgentClient, name: str, *, exited: bool = False) -> None:
    """Stop and delete the container; cleanup must not hide the error that got us here.
    A container known to have `exited` is only deleted (one round trip less), unless the
    agent refuses to."""
    if exited:
        try:
            agent.delete(name)
            return
        except ModelyoError:
            pass
    with contextlib.suppress(ModelyoError):
        agent.stop(name)
    with contextlib.suppress(ModelyoError):
        agent.delete(name)


@dataclass
class _State:
    """What the cleanup needs to know of how far a job got."""

    exited: bool = False


def run_job(
    spec: JobSpec,
    *,
    agent: AgentClient,
    keys: KeySource,
    events: JobEvents | None = None,
) -> JobResult:
    """Run `spec` in a fresh container of the attested VM; return its outputs.

    Raises `RemoteExecutionError` when the code raised (with the remote traceback),
    `JobTimeoutError` after `spec.timeout` seconds, `JobError` for anything else (the container
    could not be created, the runner failed, outputs are missing). The container is always
    deleted; on KeyboardInterrupt it is stopped and deleted, and the interrupt re-raised.
    """
    events = events or NullEvents()
    started = time.monotonic()
    name = spec.name or f"modelyo-job-{secrets.token_hex(4)}"
    try:
        events.phase("packaging", f"{len(spec.inputs)} input(s)")
        manifest, encodings = package(spec)
        sealed = seal_bundle(manifest, encodings, keys, spec.key_id, _Transfer(events, "packaging"))
        del encodings
    except ModelyoError:
        events.phase("failed")
        raise

    with sealed:
        events.phase("uploading", name)
        container_spec = api.ContainerSpec(
            image=spec.image,
            name=name,
            command=[*RUNNER, f"{JOB_DIR}/{JOB_FILE}", f"{JOB_DIR}/{RESULT_FILE}"],
            environment={"PYTHONUNBUFFERED": "1"},
            gpu=spec.gpu,
            key_id=spec.key_id,
        )
        try:
            agent.create(container_spec)
        except ServiceError as exc:
            events.phase("failed")
            raise JobError(f"the agent did not create the job's container {name}: {exc}") from exc
        state = _State()
        try:
            return _run_created(spec, agent, keys, events, name, sealed, started, state)
        except KeyboardInterrupt:
            events.phase("interrupted", name)
            raise
        except JobTimeoutError:
            events.phase("timed out", name)
            raise
        except BaseException:
            events.phase("failed", name)
            raise
        finally:
            _remove(agent, name, exited=state.exited)


def _run_created(
    spec: JobSpec,
    agent: AgentClient,
    keys: KeySource,
    events: JobEvents,
    name: str,
    sealed: IO[bytes],
    started: float,
    state: _State,
) -> JobResult:
    try:
        size = sealed.seek(0, io.SEEK_END)
        upload = _Transfer(events, "uploading", size)
        agent.put_archive(name, JOB_DIR, tar_one_file(JOB_FILE, sealed, upload))
        events.phase("starting", name)
        agent.start(name)
    except ServiceError as exc:
        raise JobError(f"the job's container {name} could not be started: {exc}") from exc
    events.phase("running", name)
    reader = _LogReader(agent, name, events)
    reader.start()
    deadline = None if spec.timeout is None else time.monotonic() + spec.timeout
    # The main thread only watches the clock, so Ctrl-C and the timeout act at once.
    while reader.is_alive():
        if deadline is not None and time.monotonic() >= deadline:
            _remove(agent, name)
            raise JobTimeoutError(
                f"the job ran longer than its timeout of {spec.timeout:g} s; its container "
                f"{name} was stopped and removed (give a larger timeout)"
            )
        reader.join(_POLL)
    # A follow stream that ended by itself means the container exited, and the outcome
    # says how (the runner exits 0 or 1 as it is "ok" or "error"): no need to ask the agent
    # to wait, unless the stream broke or there is no outcome.
    exit_code: int | None = None
    if reader.error is None:
        state.exited = True
    else:
        exit_code = _exit_code(agent, name)

    events.phase("collecting", name)
    plain = io.BytesIO()
    with tempfile.TemporaryFile(prefix="modelyo-result-") as encrypted:
        try:
            download = _Transfer(events, "collecting")
            untar_one_file(
                download.counted(agent.get_archive(name, f"{JOB_DIR}/{RESULT_FILE}")),
                RESULT_FILE,
                encrypted,
            )
        except ServiceError:
            if exit_code is None:
                exit_code = _exit_code(agent, name)
            output = reader.last_lines()
            raise JobError(
                f"the job in container {name} ended (exit code {exit_code}) without a result"
                + (f"; its last output:\n{output}" if output else "")
            ) from None
        encrypted.seek(0)
        try:
            decrypt_stream(encrypted, plain, keys, label="the job's result")
        except EncryptionError as exc:
            raise JobError(f"the job's result did not decrypt: {exc}") from exc
    # The one plaintext copy of the result: outputs are decoded from it in place.
    outcome, outputs = decode_outcome(plain, spec.allow_pickle)
    del plain
    if exit_code is None:
        exit_code = 0 if outcome.status == "ok" else EXIT_USER_ERROR
    if outcome.status == "error":
        raise remote_error(outcome)
    if outcome.missing:
        raise JobError(
            f"the job's code did not define {', '.join(repr(n) for n in outcome.missing)}; "
            "assign each output name in the code, or drop it from the outputs"
        )
    events.phase("done", name)
    return JobResult(outputs, name, exit_code, time.monotonic() - started)


def _exit_code(agent: AgentClient, name: str) -> int:
    try:
        return agent.wait(name, timeout=60).exit_code
    except ServiceError as exc:
        raise JobError(f"could not learn how the job's container {name} ended: {exc}") from exc


# --- sessions ------------------------------------------------------------------------------------


class JobSession:
    """An owner's connection to the attested VM and the CA's keys, for several jobs."""

    def __init__(self, agent: AgentClient, keys: KeySource, closers: Sequence[object]) -> None:
        self.agent = agent
        self.keys = keys
        self._closers = closers

    def run(self, spec: JobSpec, events: JobEvents | None = None) -> JobResult:
        """`run_job` with this session's agent and keys."""
        return run_job(spec, agent=self.agent, keys=self.keys, events=events)

    def close(self) -> None:
        for closer in self._closers:
            with contextlib.suppress(Exception):
                closer.close()  # type: ignore[attr-defined]

    def __enter__(self) -> JobSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_session(workspace: Workspace | None = None) -> JobSession:
    """A session from the files `modelyo attest` wrote in `workspace` (default: the current
    directory). Raises `NotAttestedError` when they are missing."""
    from modelyo.client.ca import CaClient
    from modelyo.client.keys import CaKeySource

    ws = workspace or Workspace.here()
    ws.require(needed_for="a remote job")
    ca = CaClient.for_owner(ws)
    try:
        agent = AgentClient.for_owner(ws)
    except BaseException:
        ca.close()
        raise
    return JobSession(agent, CaKeySource(ca), [agent, ca])
