"""The agent's HTTP API (FastAPI) over `AgentService`: exactly `modelyo.api.agent`.

The caller's identity is the client certificate verified in the TLS handshake
(`modelyo.service.tls`), never a header. Errors are ``{"error": CODE, "detail": ...}`` with the
statuses of `modelyo.api.agent` (`modelyo.service.http`).

Docker calls block, so every route that reaches the engine runs in a worker thread
(`run_in_threadpool`) and the event loop keeps serving other requests. Uploads (images, archives)
are never held whole: the request body's chunks are handed one by one from the event loop to
the worker thread that feeds them to Docker, so memory stays constant whatever the size.
Downloads (logs, archives) stream the same way in the other direction.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Literal

import anyio.from_thread
from cryptography import x509
from fastapi import Depends, FastAPI, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from modelyo.api import agent as api
from modelyo.api import logframes
from modelyo.service.http import error_responses, install_error_handlers, peer_certificate
from tdx_agent.service import AgentService

log = logging.getLogger("modelyo.agent")

DESCRIPTION = """\
The Modelyo agent in a TDX VM (or on the SIMULATED platform). It:

* proves itself with a TD quote bound to its TLS key and your nonce, with each GPU's evidence
  over REPORTDATA[0:32] (`GET /v1/attestation`);
* grants ownership once, to the first claim (`POST /v1/ownership`), signing the owner's CSR with
  this VM's intermediate certificate;
* runs the owner's Docker images and containers (`/v1/images`, `/v1/containers`).

Until it is registered with the Modelyo CA every call answers 503 with the reason. Owner calls
need the owner's client certificate in the TLS handshake: 401 without one, 403 with another.
"""

_ERRORS = error_responses(
    {
        400: "bad input",
        401: "no client certificate",
        403: "not the owner",
        404: "unknown image or container",
        409: "already owned, name taken or wrong state",
        413: "upload too large",
        422: "refused (e.g. a broken image)",
        503: "not registered with the CA yet, or Docker unavailable",
    }
)
TAR = "application/x-tar"

Peer = Annotated[x509.Certificate | None, Depends(peer_certificate)]
Name = Annotated[str, Path(pattern=api.CONTAINER_NAME_PATTERN, description="container name")]
ArchivePath = Annotated[str, Query(min_length=1, description="absolute path in the container")]


def _body_chunks(request: Request) -> Iterator[bytes]:
    """The request body as a blocking iterator, for a worker thread: each chunk is awaited on
    the event loop when the consumer asks for it (back-pressure, constant memory)."""
    stream: AsyncIterator[bytes] = request.stream().__aiter__()

    async def next_chunk() -> bytes | None:
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            return None

    while True:
        chunk = anyio.from_thread.run(next_chunk)
        if chunk is None:
            return
        if chunk:
            yield chunk


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


def create_app(service: AgentService) -> FastAPI:
    """The FastAPI application serving `service`."""
    app = FastAPI(
        title="Modelyo agent",
        description=DESCRIPTION,
        version="v1",
        openapi_url="/openapi.json",
        # The interactive pages load scripts from a CDN: not from inside a TD.
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app, service="the agent", log=log)

    @app.get(
        api.ATTESTATION,
        response_model=api.AgentAttestation,
        responses=_ERRORS,
        summary="A TD quote binding the agent's TLS key and your nonce, with GPU evidence",
    )
    async def attestation(
        nonce: Annotated[str, Query(description="32 fresh random bytes as 64 hex digits")],
    ) -> api.AgentAttestation:
        return await run_in_threadpool(service.attestation, nonce)

    @app.post(
        api.OWNERSHIP,
        response_model=api.OwnershipGrant,
        responses=_ERRORS,
        summary="Claim ownership: the first claim wins, later ones get 409",
    )
    async def ownership(claim: api.OwnershipClaim) -> api.OwnershipGrant:
        return await run_in_threadpool(service.claim_ownership, claim)

    @app.get(api.GPUS, response_model=api.GpuReport, responses=_ERRORS, summary="GPU evidence")
    async def gpus(peer: Peer) -> api.GpuReport:
        return await run_in_threadpool(service.gpus, peer)

    @app.post(
        api.IMAGES,
        response_model=api.LoadResult,
        responses=_ERRORS,
        summary="Load images from a `docker save` tarball (the request body, streamed)",
    )
    async def load_images(request: Request, peer: Peer) -> api.LoadResult:
        # Refuse before reading a byte: no upload for a caller who is not the owner.
        await run_in_threadpool(service.authenticate, peer)
        chunks = _body_chunks(request)
        return await run_in_threadpool(service.load, peer, chunks, _declared_length(request))

    @app.get(api.IMAGES, response_model=api.ImageList, responses=_ERRORS, summary="Images")
    async def images(peer: Peer) -> api.ImageList:
        return await run_in_threadpool(service.images, peer)

    @app.post(
        api.CONTAINERS,
        response_model=api.ContainerInfo,
        responses=_ERRORS,
        summary="Create a container",
    )
    async def create(spec: api.ContainerSpec, peer: Peer) -> api.ContainerInfo:
        return await run_in_threadpool(service.create, peer, spec)

    @app.get(
        api.CONTAINERS, response_model=api.ContainerList, responses=_ERRORS, summary="Containers"
    )
    async def containers(peer: Peer) -> api.ContainerList:
        return await run_in_threadpool(service.containers, peer)

    @app.get(api.CONTAINER, response_model=api.ContainerInfo, responses=_ERRORS, summary="One")
    async def inspect(name: Name, peer: Peer) -> api.ContainerInfo:
        return await run_in_threadpool(service.inspect, peer, name)

    @app.post(
        api.CONTAINER_START, response_model=api.ContainerInfo, responses=_ERRORS, summary="Run"
    )
    async def start(name: Name, peer: Peer) -> api.ContainerInfo:
        return await run_in_threadpool(service.start, peer, name)

    @app.post(
        api.CONTAINER_STOP, response_model=api.ContainerInfo, responses=_ERRORS, summary="Stop"
    )
    async def stop(name: Name, peer: Peer) -> api.ContainerInfo:
        return await run_in_threadpool(service.stop, peer, name)

    @app.post(
        api.CONTAINER_WAIT,
        response_model=api.WaitResult,
        responses=_ERRORS,
        summary="Wait until the container exits (or `timeout` seconds pass)",
    )
    async def wait(
        name: Name,
        peer: Peer,
        timeout: Annotated[float | None, Query(ge=0, description="seconds")] = None,
    ) -> api.WaitResult:
        return await run_in_threadpool(service.wait, peer, name, timeout)

    @app.get(
        api.CONTAINER_LOGS,
        response_class=StreamingResponse,
        responses=_ERRORS,
        summary="The container's output, streamed (follow: until it exits)",
    )
    async def logs(
        name: Name,
        peer: Peer,
        follow: bool = False,
        streams: Annotated[
            Literal["merged", "framed"],
            Query(
                description="merged: the output as written, stdout and stderr mixed; framed: "
                "log frames keeping them apart, in order (modelyo.api.logframes)"
            ),
        ] = "merged",
    ) -> StreamingResponse:
        framed = streams == "framed"
        stream = await run_in_threadpool(service.logs, peer, name, follow, framed)
        media_type = logframes.MEDIA_TYPE if framed else "application/octet-stream"
        return StreamingResponse(stream, media_type=media_type)

    @app.get(
        api.CONTAINER_ARCHIVE,
        response_class=StreamingResponse,
        responses=_ERRORS,
        summary="A tar stream of a path in the container",
    )
    async def get_archive(name: Name, path: ArchivePath, peer: Peer) -> StreamingResponse:
        stream = await run_in_threadpool(service.get_archive, peer, name, path)
        return StreamingResponse(stream, media_type=TAR)

    @app.put(
        api.CONTAINER_ARCHIVE,
        status_code=204,
        response_class=Response,
        responses=_ERRORS,
        summary="Extract a tar stream (the request body) at a path in the container",
    )
    async def put_archive(name: Name, path: ArchivePath, request: Request, peer: Peer) -> Response:
        await run_in_threadpool(service.authenticate, peer)
        chunks = _body_chunks(request)
        await run_in_threadpool(service.put_archive, peer, name, path, chunks)
        return Response(status_code=204)

    @app.delete(
        api.CONTAINER,
        status_code=204,
        response_class=Response,
        responses=_ERRORS,
        summary="Delete a container (stopped first)",
    )
    async def delete(name: Name, peer: Peer) -> Response:
        await run_in_threadpool(service.delete, peer, name)
        return Response(status_code=204)

    return app
