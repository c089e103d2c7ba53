"""Fixtures shared by the test suite: the Docker engine, and a local stack on the simulated
platform (`modelyo dev up` in a temporary directory)."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import docker
import pytest
import requests
from rich.console import Console

from modelyo import dev


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """A client for the machine's Docker engine.

    Without an engine, CI (CI=true) fails hard, since `make test` starts one there; elsewhere the
    test is skipped with the reason printed.
    """
    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except (docker.errors.DockerException, requests.RequestException) as exc:
        reason = (
            f"no Docker engine answers ({exc}); `make test` starts one on Debian as root, "
            f"elsewhere install Docker Engine or Docker Desktop"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs a Docker engine: {reason}", pytrace=False)
        print(f"skipping a Docker test: {reason}")
        pytest.skip(reason)
    yield client
    client.close()


def _isolated_stack(root, patch: pytest.MonkeyPatch) -> Iterator[dev.StackInfo]:
    """A local stack under `root`, found by endpoint discovery alone: no endpoint variables,
    no user config."""
    directory = root / "dev"
    patch.setenv("MODELYO_DEV_DIR", str(directory))
    for var in ("MODELYO_CA_URL", "MODELYO_TDX_URL", "MODELYO_SIM_DIR"):
        patch.delenv(var, raising=False)
    patch.setenv("XDG_CONFIG_HOME", str(root / "xdg"))
    info = dev.up(directory, ca_port=0)
    try:
        yield info
    finally:
        dev.down(directory)


@pytest.fixture
def stack(tmp_path, monkeypatch):
    """A fresh local stack (its own CA and simulated platform), found by endpoint discovery."""
    yield from _isolated_stack(tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def module_stack(tmp_path_factory):
    """Like `stack`, one for a whole module: a stack costs seconds to start on two cores."""
    with pytest.MonkeyPatch.context() as patch:
        yield from _isolated_stack(tmp_path_factory.mktemp("stack"), patch)


@pytest.fixture(scope="session")
def base_image(docker_client) -> str:
    """The job base image, current with this tree: it holds the job runner, so it is rebuilt
    when modelyo/ changed (`make test` did so already: then this is a quick check)."""
    from modelyo.images import base

    base.build_base(console=Console(file=io.StringIO()))
    return base.DEFAULT_TAG
