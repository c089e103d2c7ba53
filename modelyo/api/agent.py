"""The TDX agent's HTTPS API: paths and wire models, shared by the agent and the tool.

TLS 1.3 everywhere. The agent's server certificate (role vm-server) is issued by the CA after
the VM attested to it; the tool pins it as `tdx_ca.pem`. The owner's client certificate (role
vm-owner) is issued by this VM's intermediate (role vm-issuer, itself issued by the CA root);
the tool stores it with that intermediate as `tdx_client.pem` (leaf first).

| method and path                                  | caller           |
|--------------------------------------------------|------------------|
| GET    /v1/attestation?nonce=HEX                 | anyone           |
| POST   /v1/ownership                             | anyone, once     |
| GET    /v1/gpus                                  | owner            |
| POST   /v1/images (body: `docker save` tar)      | owner            |
| GET    /v1/images                                | owner            |
| POST   /v1/containers                            | owner            |
| GET    /v1/containers                            | owner            |
| GET    /v1/containers/{name}                     | owner            |
| POST   /v1/containers/{name}/start               | owner            |
| POST   /v1/containers/{name}/stop                | owner            |
| POST   /v1/containers/{name}/wait?timeout=S      | owner            |
| GET    /v1/containers/{name}/logs?follow=BOOL    | owner (streamed) |
|        &streams=merged (default) or framed       |                  |
| GET    /v1/containers/{name}/archive?path=P      | owner (tar out)  |
| PUT    /v1/containers/{name}/archive?path=P      | owner (tar in)   |
| DELETE /v1/containers/{name}                     | owner            |

Logs come as the container wrote them, stdout and stderr mixed (`streams=merged`, the
default), or as frames that keep them apart in their order (`streams=framed`, media type
`application/vnd.modelyo.log-frames`; the format is in `modelyo.api.logframes`).

Errors are JSON `{"error": CODE, "detail": "…"}` as for the CA (`modelyo.api.ca.ErrorBody`):
400 bad input, 401 no client certificate, 403 not the owner, 404 unknown image or container,
409 already owned / name taken / wrong state, 413 upload too large, 422 refused (e.g. a broken
image), 503 not registered with the CA yet.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from modelyo.api.ca import KEY_ID_PATTERN

ATTESTATION = "/v1/attestation"
OWNERSHIP = "/v1/ownership"
GPUS = "/v1/gpus"
IMAGES = "/v1/images"
CONTAINERS = "/v1/containers"
CONTAINER = "/v1/containers/{name}"
CONTAINER_START = "/v1/containers/{name}/start"
CONTAINER_STOP = "/v1/containers/{name}/stop"
CONTAINER_WAIT = "/v1/containers/{name}/wait"
CONTAINER_LOGS = "/v1/containers/{name}/logs"
CONTAINER_ARCHIVE = "/v1/containers/{name}/archive"

# Docker's own rule for container names.
CONTAINER_NAME_PATTERN = r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GpuEvidence(_Model):
    """One GPU's confidential-computing evidence and what its verification found."""

    index: int
    uuid: str
    name: str
    arch: str
    driver_version: str
    vbios_version: str
    cc_mode: str = Field(description='"on", "off" or "devtools"')
    simulated: bool
    nonce: str = Field(description="hex; must equal REPORTDATA[0:32] of the TD quote")
    report: str = Field(description="base64 attestation report (SPDM measurements, signed)")
    certificate_chain: list[str] = Field(description="PEM, device leaf first")
    verified: bool
    problems: list[str] = Field(default_factory=list)


class GpuReport(_Model):
    """All GPUs of the VM; `gpus` is empty when the VM has none (`detail` says so)."""

    gpus: list[GpuEvidence] = Field(default_factory=list)
    detail: str = ""


class AgentAttestation(_Model):
    """A TD quote binding the agent's TLS key and the caller's nonce, with GPU evidence whose
    nonce is REPORTDATA[0:32]."""

    tee: Literal["tdx"] = "tdx"
    quote: str = Field(description="base64 of the TDX quote")
    collateral: str = Field(description="collateral JSON (dcap-qvl QuoteCollateralV3)")
    certificate_chain: list[str] = Field(
        description="PEM: the agent's server certificate (issued by the CA), then the CA root"
    )
    simulated: bool
    vm_id: str
    gpus: GpuReport


class OwnershipClaim(_Model):
    csr: str


class OwnershipGrant(_Model):
    client_certificate: str = Field(description="PEM, role vm-owner, issued by the VM issuer")
    issuer_certificate: str = Field(description="PEM of this VM's intermediate (vm-issuer)")
    ca_certificate: str = Field(description="PEM of the CA root")


class ImageInfo(_Model):
    id: str
    tags: list[str]
    size: int


class ImageList(_Model):
    images: list[ImageInfo]


class LoadResult(_Model):
    images: list[ImageInfo]
    bytes_received: int


class ContainerSpec(_Model):
    image: str = Field(min_length=1)
    name: str = Field(pattern=CONTAINER_NAME_PATTERN)
    command: list[str] | None = None
    environment: dict[str, str] = Field(default_factory=dict)
    gpu: bool = False
    key_id: str = Field(default="default", pattern=KEY_ID_PATTERN)


class ContainerInfo(_Model):
    name: str
    id: str
    image: str
    status: str = Field(description="Docker's: created, running, exited, ...")
    exit_code: int | None = None
    key_id: str
    gpu: bool
    created_at: str


class ContainerList(_Model):
    containers: list[ContainerInfo]


class WaitResult(_Model):
    name: str
    exit_code: int
    timed_out: bool = False
