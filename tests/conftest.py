"""Fixtures shared by the test suite: the Docker engine, and a local stack on the simulated
platform (`modelyo dev up` in a temporary directory)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import docker
import pytest
import requests

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


@pytest.fixture
def stack(tmp_path, monkeypatch):
    """A fresh local stack (its own CA and simulated platform), found by endpoint discovery."""
    directory = tmp_path / "dev"
    monkeypatch.setenv("MODELYO_DEV_DIR", str(directory))
    for var in ("MODELYO_CA_URL", "MODELYO_TDX_URL", "MODELYO_SIM_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    info = dev.up(directory, ca_port=0)
    yield info
    dev.down(directory)
