"""The `modelyo-ca` command line and the configuration it produces."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from modelyo.api.ca import CaPolicy
from modelyo.errors import ConfigError
from modelyo.service.options import add_server_arguments, parse_listen

DEFAULT_HOSTS = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class CaConfig:
    """Everything `modelyo-ca` needs to start."""

    host: str
    port: int
    state_dir: Path
    platform: Literal["simulated", "gramine"] = "simulated"
    sim_dir: Path | None = None
    hosts: tuple[str, ...] = DEFAULT_HOSTS
    collateral: Path | None = None
    vm_collateral: Path | None = None
    vm_policy: Path | None = None
    gramine_dir: Path = Path("/dev/attestation")
    log_level: str = "info"


def load_vm_policy(path: Path) -> CaPolicy:
    """A `CaPolicy` from a JSON file (the body of PUT /v1/policy)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read --vm-policy {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--vm-policy {path} is not JSON: {exc}") from None
    try:
        return CaPolicy.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"--vm-policy {path} is invalid: {problems}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelyo-ca",
        description="The Modelyo CA and key service (HTTPS, TLS 1.3). See docs/ca.md.",
    )
    add_server_arguments(parser, state_help="sealed state directory")
    parser.add_argument(
        "--platform",
        choices=("simulated", "gramine"),
        default="simulated",
        help="simulated (software, SIMULATED quotes and sealing) or gramine (SGX hardware)",
    )
    parser.add_argument(
        "--sim-dir",
        type=Path,
        metavar="DIR",
        help="simulated platform directory (default: $MODELYO_SIM_DIR or "
        "~/.local/share/modelyo/sim)",
    )
    parser.add_argument(
        "--host",
        action="append",
        dest="hosts",
        metavar="NAME",
        help="DNS name or IP for the TLS certificate (repeatable; default localhost, 127.0.0.1)",
    )
    parser.add_argument(
        "--collateral",
        type=Path,
        metavar="FILE",
        help="collateral JSON for the CA's own SGX quotes (required with --platform gramine; "
        "re-read on each attestation, so the operator refreshes it in place)",
    )
    parser.add_argument(
        "--vm-collateral",
        type=Path,
        metavar="FILE",
        help="collateral JSON for TD quotes that VMs send without their own (hardware)",
    )
    parser.add_argument(
        "--vm-policy",
        type=Path,
        metavar="FILE",
        help="initial VM policy (JSON, as PUT /v1/policy takes); used on first start only",
    )
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )
    return parser


def parse_args(argv: list[str] | None = None) -> CaConfig:
    """Parse the command line; `ConfigError` for values argparse cannot check."""
    args = build_parser().parse_args(argv)
    host, port = parse_listen(args.listen)
    if args.platform == "gramine" and args.collateral is None:
        raise ConfigError(
            "--platform gramine needs --collateral FILE: the collateral JSON for this "
            "platform's SGX quotes (fetch it from your PCCS; see docs/ca.md)"
        )
    sim_dir = args.sim_dir.expanduser() if args.sim_dir else None
    return CaConfig(
        host=host,
        port=port,
        state_dir=Path(os.path.expanduser(args.state_dir)).absolute(),
        platform=args.platform,
        sim_dir=sim_dir,
        hosts=tuple(args.hosts) if args.hosts else DEFAULT_HOSTS,
        collateral=args.collateral,
        vm_collateral=args.vm_collateral,
        vm_policy=args.vm_policy,
        log_level=args.log_level,
    )
