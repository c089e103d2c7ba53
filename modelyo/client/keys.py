"""Keys released by the Modelyo CA, as a `modelyo.encryption.KeySource`.

The owner (with `ca_client.pem`) and registered TDX VMs (with their `vm` certificate) use the
same source; the CA decides which key ids each may receive. Released keys stay in memory only,
cached for the life of the source so a tree of many files costs one release per key id.
"""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path

from modelyo.client.ca import CaClient
from modelyo.client.http import ServiceError
from modelyo.encryption.keys import ReleasedKey
from modelyo.errors import KeyUnavailableError
from modelyo.workspace import CA_FILES, Workspace


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


_sources_lock = threading.Lock()
_sources: dict[Path, tuple[tuple[object, ...], CaKeySource]] = {}


def workspace_keys(workspace: Workspace | None = None, *, needed_for: str = "this") -> CaKeySource:
    """The CA key source of an owner's workspace (default: the current directory).

    One per workspace for the life of the process, so each key is released once; made anew
    when `modelyo attest` rewrites the workspace's files. NotAttestedError when there are none.
    """
    ws = Workspace((workspace or Workspace.here()).root.resolve())
    ws.require(CA_FILES, needed_for=needed_for)
    stamp = (ws.config().ca_url, *(_file_stamp(ws.path(n)) for n in CA_FILES))
    with _sources_lock:
        cached = _sources.get(ws.root)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        # A replaced source's client is left to the garbage collector: another thread may
        # still be using it.
        source = CaKeySource(CaClient.for_owner(ws))
        _sources[ws.root] = (stamp, source)
        return source


def _file_stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size
