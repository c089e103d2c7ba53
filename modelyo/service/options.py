"""Command-line options the CA and the agent share (pure: no server is imported)."""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path

from modelyo.errors import ConfigError


def add_server_arguments(parser: argparse.ArgumentParser, *, state_help: str) -> None:
    """`--listen HOST:PORT` and `--state-dir DIR`, both required."""
    parser.add_argument(
        "--listen", required=True, metavar="HOST:PORT", help="address to serve on (port 0: any)"
    )
    parser.add_argument("--state-dir", required=True, type=Path, metavar="DIR", help=state_help)


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:PORT`); port 0 picks a free port."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"--listen {value!r} is not HOST:PORT (e.g. 127.0.0.1:8443)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"--listen {value!r}: {host!r} is not an IPv6 address") from None
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"--listen {value!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"--listen {value!r}: port must be 0 to 65535")
    return host, port
