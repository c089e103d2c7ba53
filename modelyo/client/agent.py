"""The tool's client for the TDX agent (see modelyo/api/agent.py for the API).

Every connection is TLS 1.3 pinned to the CA root, and the server must present a certificate
for the key of the VM we attested (`tdx_ca.pem`): a certificate the CA issued to another VM is
refused, though it chains to the same root.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar, overload

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel

from modelyo import pki
from modelyo.api import agent as api
from modelyo.api import logframes
from modelyo.attestation import binding
from modelyo.attestation.policy import TdxPolicy
from modelyo.attestation.verify import TrustRoot, Verdict
from modelyo.client import http
from modelyo.client.http import TIMEOUT, parse_response, raise_for_error
from modelyo.client.tls import (
    describe_tls_error,
    peer_certificate,
    pinned_context,
)
from modelyo.errors import AttestationError, ModelyoError, NotAttestedError
from modelyo.workspace import (
    ATTEST_HINT,
    CA_CERT,
    TDX_CERT,
    TDX_CLIENT_CERT,
    TDX_CLIENT_KEY,
    TDX_FILES,
    Workspace,
)

M = TypeVar("M", bound=BaseModel)
# Uploads go in chunks this size: large enough for throughput, small enough for steady memory.
UPLOAD_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class AttestedAgent:
    """What the TDX VM proved in step 2 of attestation."""

    url: str
    verdict: Verdict
    server_certificate: x509.Certificate
    vm_id: str
    gpus: api.GpuReport
    simulated: bool


def fetch_attestation(url: str, nonce: bytes) -> tuple[api.AgentAttestation, x509.Certificate]:
    """Ask for a quote answering `nonce`; return it with the certificate TLS presented."""
    return http.fetch_attestation(url, api.ATTESTATION, nonce, api.AgentAttestation)


def check_attestation(
    url: str,
    body: api.AgentAttestation,
    presented: x509.Certificate,
    nonce: bytes,
    *,
    ca_root: x509.Certificate,
    vm_certificate: x509.Certificate,
    trust: TrustRoot,
    policy: TdxPolicy,
    now: int | None = None,
) -> AttestedAgent:
    """Decide whether the agent at `url` is the attested TDX VM the CA certified.

    The certificate TLS presented must be the one the CA issued to this VM (`vm_certificate`,
    from the CA), chain to the CA root we pinned in step 1, and the fresh quote must verify
    and bind that certificate's key and our nonce. Raises `AttestationError`.
    """
    if presented != vm_certificate:
        raise AttestationError(
            f"{url} presented a certificate other than the one the CA issued to VM "
            f"{body.vm_id} (a machine in the middle, or another VM)"
        )
    try:
        pki.verify_chain(presented, [], ca_root, role=pki.Role.VM_SERVER)
    except pki.CertificateError as exc:
        raise AttestationError(f"{url}: {exc}") from None
    verdict = http.verify_attestation_answer(
        url,
        quote_b64=body.quote,
        collateral_json=body.collateral,
        simulated=body.simulated,
        presented=presented,
        nonce=nonce,
        trust=trust,
        policy=policy,
        policy_name="tdx",
        what="TDX VM",
        now=now,
    )
    return AttestedAgent(url, verdict, presented, body.vm_id, body.gpus, verdict.simulated)


class AgentClient:
    """Calls to an attested agent, pinned to its CA-issued certificate, with our client cert."""

    def __init__(
        self,
        url: str,
        ca_root_pem: str | bytes,
        server_certificate: x509.Certificate,
        *,
        client_cert: Path | None = None,
        client_key: Path | None = None,
        timeout: httpx.Timeout = TIMEOUT,
    ) -> None:
        self.url = url.rstrip("/")
        self._server = server_certificate
        self._presents_cert = client_cert is not None
        self._client = httpx.Client(
            base_url=self.url,
            verify=pinned_context(ca_root_pem, client_cert=client_cert, client_key=client_key),
            timeout=timeout,
            # Runs when the headers arrive, before the body: the connection is still open.
            event_hooks={"response": [self._check_server]},
        )

    @classmethod
    def for_owner(cls, workspace: Workspace, *, timeout: httpx.Timeout = TIMEOUT) -> AgentClient:
        """The owner's client, from the files `modelyo attest` stored in `workspace`."""
        workspace.require((CA_CERT, *TDX_FILES), needed_for="talking to the TDX VM")
        url = workspace.config().tdx_url
        if not url:
            raise NotAttestedError(f"no tdx_url in {workspace.config_path}: {ATTEST_HINT}")
        return cls(
            url,
            workspace.path(CA_CERT).read_bytes(),
            pki.load_cert(workspace.path(TDX_CERT).read_bytes()),
            client_cert=workspace.path(TDX_CLIENT_CERT),
            client_key=workspace.path(TDX_CLIENT_KEY),
            timeout=timeout,
        )

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def _check_server(self, response: httpx.Response) -> None:
        # The chain to the CA root is checked by the TLS context; the key pins this very VM.
        # (Its certificate is renewed when the agent restarts and registers again; its key is
        # not.)
        if peer_certificate(response).public_key() != self._server.public_key():
            raise AttestationError(
                f"{self.url} presented a key other than the VM's pinned in {TDX_CERT}: "
                "another VM, or a machine in the middle"
            )

    def _error(self, exc: httpx.HTTPError) -> ModelyoError:
        return ModelyoError(
            describe_tls_error(exc, self.url, presented_client_cert=self._presents_cert)
        )

    def _call(
        self,
        method: str,
        path: str,
        model: type[M],
        body: BaseModel | None = None,
        params: dict[str, str] | None = None,
    ) -> M:
        try:
            response = self._client.request(
                method,
                path,
                params=params,
                content=body.model_dump_json() if body else None,
                headers={"content-type": "application/json"} if body else None,
            )
        except httpx.HTTPError as exc:
            raise self._error(exc) from None
        return parse_response(model, response, self.url)

    def _stream(
        self, method: str, path: str, params: dict[str, str] | None = None
    ) -> Iterator[bytes]:
        try:
            with self._client.stream(method, path, params=params, timeout=None) as response:
                if not response.is_success:
                    response.read()
                    raise_for_error(response, self.url)
                yield from response.iter_bytes()
        except httpx.HTTPError as exc:
            raise self._error(exc) from None

    # --- ownership ------------------------------------------------------------------------

    def claim_ownership(self, key: ec.EllipticCurvePrivateKey, name: str) -> api.OwnershipGrant:
        """Ask to become the owner; raises `AlreadyOwnedError` when someone else is."""
        csr = pki.csr_pem(pki.make_csr(key, name))
        return self._call("POST", api.OWNERSHIP, api.OwnershipGrant, api.OwnershipClaim(csr=csr))

    # --- GPUs, images, containers ---------------------------------------------------------

    def gpus(self) -> api.GpuReport:
        return self._call("GET", api.GPUS, api.GpuReport)

    def load_image(self, chunks: Iterable[bytes]) -> api.LoadResult:
        """Stream a `docker save` tarball to the agent."""
        try:
            response = self._client.post(
                api.IMAGES,
                content=chunks,
                headers={"content-type": "application/x-tar"},
                timeout=httpx.Timeout(None, connect=10.0),
            )
        except httpx.HTTPError as exc:
            raise self._error(exc) from None
        return parse_response(api.LoadResult, response, self.url)

    def images(self) -> api.ImageList:
        return self._call("GET", api.IMAGES, api.ImageList)

    def create(self, spec: api.ContainerSpec) -> api.ContainerInfo:
        return self._call("POST", api.CONTAINERS, api.ContainerInfo, spec)

    def containers(self) -> api.ContainerList:
        return self._call("GET", api.CONTAINERS, api.ContainerList)

    def inspect(self, name: str) -> api.ContainerInfo:
        return self._call("GET", api.CONTAINER.format(name=name), api.ContainerInfo)

    def start(self, name: str) -> api.ContainerInfo:
        return self._call("POST", api.CONTAINER_START.format(name=name), api.ContainerInfo)

    def stop(self, name: str) -> api.ContainerInfo:
        return self._call("POST", api.CONTAINER_STOP.format(name=name), api.ContainerInfo)

    def delete(self, name: str) -> None:
        try:
            response = self._client.delete(api.CONTAINER.format(name=name))
        except httpx.HTTPError as exc:
            raise self._error(exc) from None
        raise_for_error(response, self.url)

    def wait(self, name: str, timeout: float | None = None) -> api.WaitResult:
        params = {"timeout": str(timeout)} if timeout is not None else None
        try:
            response = self._client.post(
                api.CONTAINER_WAIT.format(name=name),
                params=params,
                timeout=httpx.Timeout(None if timeout is None else timeout + 30, connect=10.0),
            )
        except httpx.HTTPError as exc:
            raise self._error(exc) from None
        return parse_response(api.WaitResult, response, self.url)

    @overload
    def logs(
        self, name: str, *, follow: bool = ..., separate: Literal[False] = ...
    ) -> Iterator[bytes]: ...
    @overload
    def logs(
        self, name: str, *, follow: bool = ..., separate: Literal[True]
    ) -> Iterator[tuple[str, bytes]]: ...
    def logs(
        self, name: str, *, follow: bool = False, separate: bool = False
    ) -> Iterator[bytes] | Iterator[tuple[str, bytes]]:
        """The container's output (with `follow`, until it exits): bytes as written, stdout
        and stderr mixed, or with `separate` ("stdout" | "stderr", bytes) pairs in the order
        the engine received them. A stream cut off mid-frame raises `FrameError`."""
        params = {"follow": "true" if follow else "false"}
        path = api.CONTAINER_LOGS.format(name=name)
        if not separate:
            return self._stream("GET", path, params)
        return logframes.decode_frames(self._stream("GET", path, {**params, "streams": "framed"}))

    def get_archive(self, name: str, path: str) -> Iterator[bytes]:
        return self._stream("GET", api.CONTAINER_ARCHIVE.format(name=name), {"path": path})

    def put_archive(self, name: str, path: str, chunks: Iterable[bytes]) -> None:
        try:
            response = self._client.put(
                api.CONTAINER_ARCHIVE.format(name=name),
                params={"path": path},
                content=chunks,
                headers={"content-type": "application/x-tar"},
                timeout=httpx.Timeout(None, connect=10.0),
            )
        except httpx.HTTPError as exc:
            raise self._error(exc) from None
        raise_for_error(response, self.url)


def file_chunks(path: Path, progress: object | None = None) -> Iterator[bytes]:
    """Read a file in upload-sized chunks (constant memory), reporting bytes to `progress`."""
    with path.open("rb") as handle:
        while chunk := handle.read(UPLOAD_CHUNK):
            if progress is not None:
                progress(len(chunk))  # type: ignore[operator]
            yield chunk


def report_data_nonce(nonce: bytes, key_spki: bytes) -> bytes:
    """The GPU nonce the agent must have used: REPORTDATA[0:32] for our challenge."""
    return binding.report_data(key_spki, nonce)[:32]
