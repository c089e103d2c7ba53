"""The errors Modelyo raises.

Every message says what is wrong and what to do about it. Callers catch `ModelyoError` to
handle all of them; the subclasses let code react to one concern.
"""

from __future__ import annotations


class ModelyoError(Exception):
    """Base of every error Modelyo raises on purpose."""


class QuoteFormatError(ModelyoError, ValueError):
    """A DCAP quote (or a structure inside it) is malformed.

    `field` names the structure that failed to parse and `offset` the byte offset, from the
    start of the quote, where it was expected.
    """

    def __init__(self, message: str, *, field: str, offset: int) -> None:
        super().__init__(f"malformed quote: {field} at offset {offset}: {message}")
        self.field = field
        self.offset = offset


class CollateralError(ModelyoError, ValueError):
    """Verification collateral (TCB info, QE identity, CRLs, chains) is missing or unreadable."""


class AttestationError(ModelyoError):
    """A quote or an RA-TLS certificate was refused; `verdict` holds what was checked."""

    def __init__(self, message: str, verdict: object | None = None) -> None:
        super().__init__(message)
        self.verdict = verdict


class PlatformError(ModelyoError):
    """A trusted-execution platform (TDX, SGX, the simulator) could not produce evidence."""


class ConfigError(ModelyoError, ValueError):
    """A configuration or policy file is invalid."""


class EngineError(ModelyoError):
    """The Docker engine is unreachable, or an image could not be built or loaded."""


class EncryptionError(ModelyoError):
    """Encrypting or decrypting a file, stream or tree failed (see the message for the file).

    `path` names the file concerned when there is one (None for byte strings and streams).
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class KeyUnavailableError(EncryptionError):
    """The key source has no key for the key id (or key version) a file needs."""


class TamperError(EncryptionError):
    """Encrypted data failed authentication: it was altered, truncated, reordered or mixed.

    None of the plaintext of the file concerned is kept when this is raised for a file.
    """


class WrongKeyError(TamperError):
    """The key does not match the file's key commitment (wrong key, or an edited header).

    Raised from the header alone, before any segment is decrypted.
    """


class StateError(ModelyoError):
    """A service's persistent state cannot be used as it is: sealed by another build or
    platform, tampered with, locked by another process, or unreadable. It is never overwritten.
    """


class GpuEvidenceError(ModelyoError, ValueError):
    """GPU confidential-computing evidence is malformed, or was asked for with a bad nonce.

    For a malformed attestation report, `field` names the structure that failed to parse and
    `offset` the byte offset, from the start of the report, where it was expected; both are None
    for errors that are not about the report's bytes.
    """

    def __init__(
        self, message: str, *, field: str | None = None, offset: int | None = None
    ) -> None:
        where = f"{field} at offset {offset}: " if field is not None else ""
        prefix = "malformed GPU attestation report: " if field is not None else ""
        super().__init__(f"{prefix}{where}{message}")
        self.field = field
        self.offset = offset


class ContainerError(ModelyoError):
    """The TDX agent's container runtime could not do what was asked.

    `status` is the HTTP status the agent answers with and `code` the `error` field of its JSON
    body; the subclasses set both. This class itself means the Docker engine failed (500).
    """

    status: int = 500
    code: str = "engine_error"


class ContainerNotFoundError(ContainerError):
    """No such container, image or path (among those this agent created or loaded)."""

    status = 404
    code = "not_found"


class ContainerConflictError(ContainerError):
    """A name is taken, or the container is in the wrong state (running, not started, ...)."""

    status = 409
    code = "conflict"


class ContainerInvalidError(ContainerError, ValueError):
    """Refused: a broken or truncated image upload, a key id this VM may not use, a GPU the VM
    lacks, a malformed archive."""

    status = 422
    code = "invalid"


class UploadTooLargeError(ContainerError):
    """An upload (image tarball, archive) is larger than the agent accepts."""

    status = 413
    code = "too_large"


class CryptFolderError(EncryptionError):
    """A request through a container's /modelyo folders failed: the agent answered with
    NAME.error (its text is the message), or no answer came in time (`timed_out`)."""

    def __init__(self, message: str, *, path: str | None = None, timed_out: bool = False) -> None:
        super().__init__(message, path=path)
        self.timed_out = timed_out


class NotAttestedError(ModelyoError):
    """An operation needs an attested, owned CA and TDX VM, and this workspace has not attested
    them yet (or lacks some of the six files `modelyo attest` writes)."""


class CodecError(ModelyoError, ValueError):
    """A value cannot travel to or from a job in a safe, typed format (Parquet/Arrow for
    DataFrames, JSON for scalars, lists and dicts), or its bytes do not decode as the named
    codec. Pickle is used only when the caller opted in."""


class JobError(ModelyoError):
    """A remote job (`%%modelyo_run`, `modelyo.jobs`) failed outside the user's code: the
    container could not be created or run, the result is missing, or it did not decrypt."""


class RemoteExecutionError(JobError):
    """The user's code raised inside the attested VM. `ename`, `evalue` and `remote_traceback`
    (formatted lines) come from the remote side, decrypted from the job's result."""

    def __init__(
        self, message: str, *, ename: str, evalue: str, remote_traceback: list[str]
    ) -> None:
        super().__init__(message)
        self.ename = ename
        self.evalue = evalue
        self.remote_traceback = remote_traceback


class JobTimeoutError(JobError, TimeoutError):
    """A job ran longer than its timeout; its container was stopped and removed."""
