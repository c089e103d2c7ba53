"""Keys released by the Modelyo CA, as a `modelyo.encryption.KeySource`.

The owner (with `ca_client.pem`) and registered TDX VMs (with their `vm` certificate) use the
same source; the CA decides which key ids each may receive. Released keys stay in memory only,
cached for the life of the source so a tree of many files costs one release per key id.
"""

from __future__ import annotations

import base64
import threading
import time

from modelyo.client.ca import CaClient
from modelyo.client.http import ServiceError
from modelyo.encryption.keys import ReleasedKey
from modelyo.errors import KeyUnavailableError


class CaKeySource:
    """Asks the CA for each (key id, version) once, over the client's mutual TLS.

    An exact version never changes, so it is kept; which version is *current* changes when the
    owner rotates, so that answer is asked again after `current_ttl` seconds.
    """

    def __init__(self, client: CaClient, *, current_ttl: float = 60.0) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, int], ReleasedKey] = {}
        self._current: dict[str, tuple[float, ReleasedKey]] = {}
        self._ttl = current_ttl

    def key(self, key_id: str, version: int | None) -> ReleasedKey:
        """See `modelyo.encryption.KeySource.key`."""
        with self._lock:
            if version is None:
                fresh = self._current.get(key_id)
                if fresh is not None and time.monotonic() - fresh[0] < self._ttl:
                    return fresh[1]
            else:
                cached = self._cache.get((key_id, version))
                if cached is not None:
                    return cached
            try:
                released = self._client.release_key(key_id, version)
            except ServiceError as exc:
                raise KeyUnavailableError(
                    f"the CA at {self._client.url} did not release key {key_id!r}"
                    f"{'' if version is None else f' version {version}'}: {exc}"
                ) from None
            key = ReleasedKey(base64.b64decode(released.key), released.version)
            self._cache[(key_id, released.version)] = key
            if version is None:
                self._current[key_id] = (time.monotonic(), key)
            return key
