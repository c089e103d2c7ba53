"""Serving a Modelyo service: uvicorn over a bound socket, a ready line, clean signals.

`serve_https` runs an ASGI application on an already bound socket (so "cannot listen" is
reported before anything else starts) with `TlsScopeProtocol` and the given TLS context,
prints one ready line on stdout once connections are accepted, and returns after SIGTERM or
SIGINT once in-flight requests finished (at most `GRACE_SECONDS`). Before serving, a service
installs `stop_on_signal` so that a signal during start-up stops it too.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
from collections.abc import Callable
from typing import Any

import uvicorn

from modelyo.errors import ConfigError
from modelyo.service.tls import TlsScopeProtocol

GRACE_SECONDS = 5


def bind(host: str, port: int, *, option: str = "--listen") -> socket.socket:
    """A listening TCP socket on `host:port` (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=256)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another {option} "
            "address"
        ) from None


def url_of(host: str, sock: socket.socket) -> str:
    """The https URL a client uses for a socket bound on `host`."""
    shown = f"[{host}]" if ":" in host else host
    return f"https://{shown}:{sock.getsockname()[1]}"


class ReadyServer(uvicorn.Server):
    """uvicorn's server, printing the ready line once it accepts connections, then calling
    `on_started(loop)` (from the event loop, e.g. to start background work)."""

    def __init__(
        self,
        config: uvicorn.Config,
        ready_line: str,
        on_started: Callable[[asyncio.AbstractEventLoop], None] | None = None,
    ) -> None:
        super().__init__(config)
        self._ready_line = ready_line
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            print(self._ready_line, flush=True)
            if self._on_started is not None:
                self._on_started(asyncio.get_running_loop())


def serve_https(
    app: Any,
    sock: socket.socket,
    context: ssl.SSLContext,
    ready_line: str,
    *,
    on_started: Callable[[asyncio.AbstractEventLoop], None] | None = None,
) -> None:
    """Serve `app` on `sock` over `context` until SIGTERM or SIGINT, then return."""
    config = uvicorn.Config(
        app,
        http=TlsScopeProtocol,
        ws="none",
        lifespan="off",
        loop="asyncio",
        ssl_context_factory=lambda _config, _default: context,
        log_config=None,
        access_log=True,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=GRACE_SECONDS,
    )
    server = ReadyServer(config, ready_line, on_started)
    # uvicorn restores these handlers and re-raises the signal after its graceful shutdown;
    # doing nothing then lets the caller return normally.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])


def stop_on_signal(sig: int, _frame: object) -> None:
    """A signal handler for start-up: stop by raising KeyboardInterrupt (writes are atomic)."""
    raise KeyboardInterrupt(f"signal {sig}")
