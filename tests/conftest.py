"""Fixtures shared by the test suite: the Docker engine for tests marked `docker`."""

from __future__ import annotations

import os
from collections.abc import Iterator

import docker
import pytest
import requests


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
