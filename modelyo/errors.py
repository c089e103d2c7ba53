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
