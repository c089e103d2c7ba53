"""What each agent endpoint does and who may call it, without HTTP.

The HTTP layer (`tdx_agent.app`) passes the client certificate the TLS handshake verified (or
None) and the parsed request; refusals are `modelyo.service.errors.ServiceError`s carrying the
HTTP status and error code of `modelyo.api.agent`.

Who may call what:
- Until this run of the agent is registered with the CA, every call answers 503, the
  attestation with "not registered with the CA yet: <the last reason>".
- Attestation and the first ownership claim: anyone.
- Everything else: the owner only. The TLS layer accepts client certificates that chain to the
  CA root; here the certificate must be of role vm-owner, issued by THIS VM's intermediate
  (vm-issuer) which the CA root issued, and be the owner's: none is 401, anything else 403.
"""

from __future__ import annotations

import base64
import hmac
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from modelyo import pki
from modelyo.api.agent import (
    AgentAttestation,
    ContainerInfo,
    ContainerList,
    ContainerSpec,
    GpuReport,
    ImageInfo,
    ImageList,
    LoadResult,
    OwnershipClaim,
    OwnershipGrant,
    WaitResult,
)
from modelyo.attestation import binding
from modelyo.errors import CollateralError, ModelyoError, PlatformError
from modelyo.pki import CertificateError, Role
from modelyo.service.errors import (
    AlreadyOwned,
    BadRequest,
    Forbidden,
    ServiceError,
    TooLarge,
    Unauthenticated,
    Unavailable,
    error_for_status,
)
from tdx_agent.boot import AgentPlatform, RegistrationStatus
from tdx_agent.gpus import Gpus
from tdx_agent.state import (
    AgentState,
    AlreadyOwnedError,
    OwnerRecord,
    RegistrationRecord,
    already_owned_message,
    spki_sha256,
)

log = logging.getLogger("modelyo.agent")

OWNER_DEFAULT_NAME = "Modelyo VM owner"
STOP_TIMEOUT = 10
_NONCE = re.compile(r"[0-9a-fA-F]{64}")


class Runtime(Protocol):
    """What the agent needs of `tdx_agent.containers.ContainerRuntime`."""

    def load(self, chunks: Iterable[bytes], *, max_bytes: int) -> list[ImageInfo]: ...
    def images(self) -> list[ImageInfo]: ...
    def create(self, spec: ContainerSpec) -> ContainerInfo: ...
    def start(self, name: str) -> Any: ...
    def stop(self, name: str, *, timeout: int) -> Any: ...
    def delete(self, name: str) -> Any: ...
    def list(self) -> list[ContainerInfo]: ...
    def inspect(self, name: str) -> ContainerInfo: ...
    def logs(self, name: str, *, follow: bool, framed: bool = ...) -> Iterator[bytes]: ...
    def wait(self, name: str, *, timeout: float | None) -> WaitResult: ...
    def get_archive(self, name: str, path: str) -> Iterator[bytes]: ...
    def put_archive(self, name: str, path: str, chunks: Iterable[bytes]) -> Any: ...


@dataclass(frozen=True)
class Identity:
    """This run's registration, parsed: what owner certificates are checked against."""

    record: RegistrationRecord
    server: x509.Certificate
    issuer: x509.Certificate
    root: x509.Certificate

    @classmethod
    def of(cls, record: RegistrationRecord) -> Identity:
        return cls(
            record,
            pki.load_cert(record.server_certificate),
            pki.load_cert(record.issuer_certificate),
            pki.load_cert(record.ca_certificate),
        )


class AgentService:
    """The agent: attestation, ownership, GPUs, and the owner's containers."""

    def __init__(
        self,
        state: AgentState,
        platform: AgentPlatform,
        status: RegistrationStatus,
        gpus: Gpus,
        runtime_factory: Callable[[RegistrationRecord], Runtime],
        *,
        max_image_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self.platform = platform
        self.status = status
        self.gpus_source = gpus
        self.max_image_bytes = max_image_bytes
        self._runtime_factory = runtime_factory
        self._runtime: Runtime | None = None
        self._runtime_lock = threading.Lock()
        self._clock = clock
        self._identity: Identity | None = None

    # --- registration --------------------------------------------------------------------

    def registered(self, record: RegistrationRecord) -> None:
        """Serve as the VM the CA just certified (called once registration succeeded)."""
        self._identity = Identity.of(record)

    @property
    def identity(self) -> Identity | None:
        return self._identity

    def _require_registered(self) -> Identity:
        identity = self._identity
        if identity is None:
            raise Unavailable(f"not registered with the CA yet: {self.status.reason}")
        return identity

    # --- open to anyone ------------------------------------------------------------------

    def attestation(self, nonce_hex: str) -> AgentAttestation:
        """A fresh TD quote binding the TLS key and the caller's nonce, with GPU evidence
        whose nonce is REPORTDATA[0:32]."""
        if not isinstance(nonce_hex, str) or not _NONCE.fullmatch(nonce_hex):
            raise BadRequest(
                "nonce must be 32 random bytes as 64 hex digits (?nonce=HEX); make a fresh one "
                "for each attestation"
            )
        identity = self._require_registered()
        report_data = binding.report_data(self.state.spki, bytes.fromhex(nonce_hex))
        try:
            quote = self.platform.provider.get_quote(report_data)
            collateral = self.platform.collateral()
        except (PlatformError, CollateralError) as exc:
            raise Unavailable(f"the agent cannot attest itself right now: {exc}") from exc
        if collateral is None:
            raise Unavailable(
                "the agent has no collateral for its TD quotes; start it with --collateral FILE "
                "(fetched from your PCCS)"
            )
        gpus = self.gpus_source.report(report_data[:32])
        return AgentAttestation(
            quote=base64.b64encode(quote).decode("ascii"),
            collateral=collateral.json_text,
            certificate_chain=[identity.record.server_certificate, identity.record.ca_certificate],
            simulated=self.platform.simulated,
            vm_id=identity.record.vm_id,
            gpus=gpus,
        )

    def claim_ownership(self, claim: OwnershipClaim) -> OwnershipGrant:
        """Grant ownership to the first claim; later ones get 409 "already owned"."""
        identity = self._require_registered()
        try:
            csr = pki.load_csr(claim.csr)
        except CertificateError as exc:
            raise BadRequest(str(exc)) from None
        public_key = csr.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)  # load_csr checked
        digest = spki_sha256(public_key)
        owner = self.state.owner
        if owner is not None:
            if not hmac.compare_digest(owner.spki_sha256, digest):
                # Cheap refusal before signing anything; the state decides again atomically.
                raise AlreadyOwned(already_owned_message(owner))
            return self._grant(owner, identity)
        name = _csr_common_name(csr) or OWNER_DEFAULT_NAME
        cert = pki.issue(
            public_key,
            issuer_key=self.state.key,
            issuer_cert=identity.issuer,
            role=Role.VM_OWNER,
            common_name=name,
        )
        record = OwnerRecord(
            spki_sha256=digest,
            certificate=pki.cert_pem(cert),
            common_name=name,
            claimed_at=int(self._clock()),
            vm_id=identity.record.vm_id,
            ca_fingerprint=identity.record.ca_fingerprint,
        )
        try:
            winner, new = self.state.claim_owner(record)
        except AlreadyOwnedError as exc:
            raise AlreadyOwned(str(exc)) from None
        if new:
            log.info(
                "ownership granted to %r (certificate sha256 %s)",
                name,
                pki.fingerprint(cert),
            )
        return self._grant(winner, identity)

    def _grant(self, owner: OwnerRecord, identity: Identity) -> OwnershipGrant:
        return OwnershipGrant(
            client_certificate=owner.certificate,
            issuer_certificate=identity.record.issuer_certificate,
            ca_certificate=identity.record.ca_certificate,
        )

    # --- the owner -----------------------------------------------------------------------

    def authenticate(self, peer: x509.Certificate | None) -> None:
        """Refuse unless `peer` is the owner's certificate from this VM's issuer."""
        identity = self._require_registered()
        if peer is None:
            raise Unauthenticated(
                "no client certificate was presented; this call needs the VM owner's "
                "certificate (tdx_client.pem with tdx_client.key, written by `modelyo attest`)"
            )
        try:
            pki.verify_chain(peer, [identity.issuer], identity.root, role=Role.VM_OWNER)
        except CertificateError as exc:
            raise Forbidden(
                f"client certificate refused: {exc}; this VM ({identity.record.vm_id}) accepts "
                "only the owner certificate it issued itself (run `modelyo attest` for this VM)"
            ) from None
        public_key = peer.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)  # our issuer signs only P-256
        owner = self.state.owner
        if owner is None or not hmac.compare_digest(owner.spki_sha256, spki_sha256(public_key)):
            raise Forbidden("this certificate is not the VM owner's current certificate")

    def gpus(self, peer: x509.Certificate | None) -> GpuReport:
        """Fresh evidence of every GPU (random nonce), verified."""
        self.authenticate(peer)
        return self.gpus_source.report(binding.new_nonce())

    def load(
        self, peer: x509.Certificate | None, chunks: Iterable[bytes], declared: int | None = None
    ) -> LoadResult:
        """Load a `docker save` tarball streamed in `chunks` (at most `max_image_bytes`)."""
        runtime = self.runtime(peer)
        if declared is not None and declared > self.max_image_bytes:
            raise TooLarge(_too_large(declared, self.max_image_bytes))
        counted = _Counter(chunks)
        images = self._docker(runtime.load, counted, max_bytes=self.max_image_bytes)
        log.info("loaded %d image(s) from %d bytes", len(images), counted.total)
        return LoadResult(images=images, bytes_received=counted.total)

    def images(self, peer: x509.Certificate | None) -> ImageList:
        runtime = self.runtime(peer)
        return ImageList(images=self._docker(runtime.images))

    def create(self, peer: x509.Certificate | None, spec: ContainerSpec) -> ContainerInfo:
        runtime = self.runtime(peer)
        return self._docker(runtime.create, spec)

    def containers(self, peer: x509.Certificate | None) -> ContainerList:
        runtime = self.runtime(peer)
        return ContainerList(containers=self._docker(runtime.list))

    def inspect(self, peer: x509.Certificate | None, name: str) -> ContainerInfo:
        runtime = self.runtime(peer)
        return self._docker(runtime.inspect, name)

    def start(self, peer: x509.Certificate | None, name: str) -> ContainerInfo:
        runtime = self.runtime(peer)
        return self._info(runtime, runtime.start, name)

    def stop(self, peer: x509.Certificate | None, name: str) -> ContainerInfo:
        runtime = self.runtime(peer)
        return self._info(runtime, runtime.stop, name, timeout=STOP_TIMEOUT)

    def wait(self, peer: x509.Certificate | None, name: str, timeout: float | None) -> WaitResult:
        runtime = self.runtime(peer)
        return self._docker(runtime.wait, name, timeout=timeout)

    def delete(self, peer: x509.Certificate | None, name: str) -> None:
        runtime = self.runtime(peer)
        self._docker(runtime.delete, name)

    def logs(
        self, peer: x509.Certificate | None, name: str, follow: bool, framed: bool = False
    ) -> Iterator[bytes]:
        """The container's output (with `framed`, as log frames that keep stdout and stderr
        apart: `modelyo.api.logframes`); an unknown container is refused before streaming
        starts."""
        runtime = self.runtime(peer)
        self._docker(runtime.inspect, name)
        if framed:
            stream = self._docker(runtime.logs, name, follow=follow, framed=True)
        else:
            stream = self._docker(runtime.logs, name, follow=follow)
        return self._first_then_rest(stream, prefetch=False)

    def get_archive(self, peer: x509.Certificate | None, name: str, path: str) -> Iterator[bytes]:
        """A tar stream of `path` in the container; errors (no such path) come before the
        first byte, so they get their status."""
        _check_path(path)
        runtime = self.runtime(peer)
        return self._first_then_rest(self._docker(runtime.get_archive, name, path), prefetch=True)

    def put_archive(
        self, peer: x509.Certificate | None, name: str, path: str, chunks: Iterable[bytes]
    ) -> None:
        _check_path(path)
        runtime = self.runtime(peer)
        self._docker(runtime.put_archive, name, path, chunks)

    # --- helpers ---------------------------------------------------------------------------

    def runtime(self, peer: x509.Certificate | None) -> Runtime:
        """The container runtime for the owner (made on first use, after registration)."""
        self.authenticate(peer)
        identity = self._require_registered()
        with self._runtime_lock:
            if self._runtime is None:
                try:
                    self._runtime = self._runtime_factory(identity.record)
                except ModelyoError as exc:
                    raise Unavailable(f"the container runtime cannot start: {exc}") from None
            return self._runtime

    def close(self) -> None:
        with self._runtime_lock:
            runtime, self._runtime = self._runtime, None
        close = getattr(runtime, "close", None)
        if callable(close):
            close()

    def _info(
        self, runtime: Runtime, call: Callable[..., Any], name: str, **kwargs: Any
    ) -> ContainerInfo:
        result = self._docker(call, name, **kwargs)
        if isinstance(result, ContainerInfo):
            return result
        return self._docker(runtime.inspect, name)

    def _docker(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except ServiceError:
            raise
        except ModelyoError as exc:
            raise _translate(exc) from None

    def _first_then_rest(self, stream: Iterator[bytes], *, prefetch: bool) -> Iterator[bytes]:
        iterator = iter(stream)
        first: list[bytes] = []
        if prefetch:
            try:
                first = [self._docker(next, iterator)]
            except StopIteration:
                return iter(())
        return _guarded(first, iterator)


# --- pure helpers ------------------------------------------------------------------------------


class _Counter:
    """Passes chunks through, counting their bytes."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = chunks
        self.total = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self.total += len(chunk)
            yield chunk


def _guarded(first: list[bytes], rest: Iterator[bytes]) -> Iterator[bytes]:
    """`first` then `rest`. An error mid-stream can no longer change the status (it was sent):
    it is logged and re-raised, so the server aborts the response instead of ending it
    properly, and the client sees a cut-off body rather than a complete-looking one."""
    yield from first
    try:
        yield from rest
    except ModelyoError as exc:
        log.warning("stream cut off: %s", exc)
        raise
    finally:
        close = getattr(rest, "close", None)
        if callable(close):
            close()


def _translate(exc: ModelyoError) -> ServiceError:
    """A runtime error (`ContainerError`: `status`, `code`) as the refusal it stands for, its
    code in the API's spelling ("not_found" -> "not-found"); without a status, 503."""
    status = getattr(exc, "status", None)
    if not isinstance(status, int):
        return Unavailable(f"the Docker engine failed: {exc}")
    error = error_for_status(status, str(exc))
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code:
        error.code = code.replace("_", "-")
    return error


def _check_path(path: str) -> None:
    if not path or not path.startswith("/") or "\x00" in path:
        raise BadRequest(
            f"path {path!r} must be an absolute path inside the container (e.g. /work/out)"
        )


def _too_large(size: int, limit: int) -> str:
    return (
        f"the upload is {size} bytes, more than this agent accepts ({limit} bytes, "
        "--max-image-bytes); save fewer or smaller images per tarball"
    )


def _printable(text: str, limit: int = 64) -> str:
    """`text` without control characters, at most `limit` long: it goes into names and logs."""
    return "".join(ch for ch in text if ch.isprintable())[:limit].strip()


def _csr_common_name(csr: x509.CertificateSigningRequest) -> str:
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return _printable(str(names[0].value)) if names else ""
