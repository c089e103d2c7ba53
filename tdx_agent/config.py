"""The `modelyo-agent` command line, the configuration it produces, and its measurement.

The agent's configuration has a measured part: what decides whom the agent trusts. It is

    {"format": "modelyo-agent-config-v1", "ca_url": URL, "ca_mrenclave": [HEX, ...],
     "ca_root": "intel" | "simulation", "platform": "simulated" | "tdx"}

(`ca_mrenclave` sorted, lowercase; `ca_url` without a trailing slash), and

    MRCONFIGID = SHA-384(canonical JSON of that object)

where the canonical JSON is ``json.dumps(obj, sort_keys=True, separators=(",", ":"),
ensure_ascii=True)`` encoded as ASCII. So pointing the agent at another CA, expecting another CA
measurement or trusting another root changes the TD's measurement, and a CA policy (or the
owner) pinning MRCONFIGID sees it. On the simulated platform the agent puts this value in its
TD quotes itself. On hardware the VMM sets MRCONFIGID when it launches the TD, so the agent
checks that its quote carries the value of its own configuration and refuses to register
otherwise (launch the TD with the value `modelyo-agent ... --print-mrconfigid` prints).

Everything else (listen address, state directory, host names, GPU count, limits) is not
measured: it does not change whom the agent trusts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from modelyo.errors import ConfigError
from modelyo.service.options import add_server_arguments, parse_listen

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
CONFIG_FORMAT = "modelyo-agent-config-v1"
DEFAULT_MAX_IMAGE_BYTES = 32 << 30
DEFAULT_RETRY_MAX = 60.0
_HEX32 = re.compile(r"^[0-9a-f]{64}$")
_SIZE = re.compile(r"^(\d+)\s*([kmgt]i?b?|b)?$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

Platform = Literal["simulated", "tdx"]
Root = Literal["intel", "simulation"]


@dataclass(frozen=True)
class AgentConfig:
    """Everything `modelyo-agent` needs to start (see the module docstring for what is
    measured)."""

    host: str
    port: int
    state_dir: Path
    ca_url: str
    ca_mrenclave: tuple[str, ...]
    ca_root: Root
    platform: Platform = "simulated"
    sim_dir: Path | None = None
    simulated_gpus: int = 0
    tampered_gpus: tuple[int, ...] = ()
    crypt_root: Path | None = None
    hosts: tuple[str, ...] = DEFAULT_HOSTS
    name: str = "modelyo-agent"
    collateral: Path | None = None
    gpu_roots: tuple[Path, ...] = ()
    gpu_references: Path | None = None
    builtin_images: tuple[str, ...] = ()
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    retry_max: float = DEFAULT_RETRY_MAX
    log_level: str = "info"

    @property
    def simulated(self) -> bool:
        return self.platform == "simulated"

    def measured(self) -> dict[str, object]:
        """The measured part of the configuration (see the module docstring)."""
        return measured_config(self.ca_url, self.ca_mrenclave, self.ca_root, self.platform)

    def mr_config_id(self) -> bytes:
        """MRCONFIGID: SHA-384 of the canonical JSON of `measured()` (48 bytes)."""
        return mr_config_id(self.measured())

    def crypt_root_path(self) -> Path:
        """Where the containers' /modelyo folders live: --crypt-root, else a directory on
        /dev/shm (tmpfs) named after the state directory, so two agents never share one."""
        if self.crypt_root is not None:
            return self.crypt_root
        tag = hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:12]
        # tmpfs on every Linux; the folder is created 0700 and checked by CryptDirs.
        return Path("/dev/shm") / f"modelyo-agent-{tag}"  # noqa: S108


def measured_config(
    ca_url: str, ca_mrenclave: tuple[str, ...] | list[str], ca_root: str, platform: str
) -> dict[str, object]:
    """The measured object for these values (normalised as the module docstring says)."""
    return {
        "format": CONFIG_FORMAT,
        "ca_url": ca_url.rstrip("/"),
        "ca_mrenclave": sorted(value.lower() for value in ca_mrenclave),
        "ca_root": ca_root,
        "platform": platform,
    }


def canonical_json(value: object) -> bytes:
    """The canonical JSON encoding MRCONFIGID is computed over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode(
        "ascii"
    )


def mr_config_id(measured: dict[str, object]) -> bytes:
    """SHA-384 of the canonical JSON of the measured configuration."""
    return hashlib.sha384(canonical_json(measured)).digest()


# --- parsing ---------------------------------------------------------------------------------


def parse_size(value: str, option: str) -> int:
    """A byte count: `123`, `512M`, `32G`, `1TiB` (binary units)."""
    match = _SIZE.match(value.strip())
    if match is None:
        raise ConfigError(f"{option} {value!r} is not a size (e.g. 512M, 32G)")
    number, unit = int(match[1]), (match[2] or "")[:1].lower()
    size = number * _UNITS[unit]
    if size <= 0:
        raise ConfigError(f"{option} must be more than 0 bytes")
    return size


def check_ca_url(url: str) -> str:
    """The CA URL without a trailing slash; only https:// is accepted."""
    url = url.strip().rstrip("/")
    if not url.startswith("https://") or len(url) <= len("https://"):
        raise ConfigError(f"--ca {url!r} must be an https:// URL (e.g. https://ca.example:8443)")
    return url


def check_mrenclave(values: list[str]) -> tuple[str, ...]:
    """Expected CA MRENCLAVE values as lowercase hex (64 digits each)."""
    result = []
    for value in values:
        text = value.strip().lower().removeprefix("0x")
        if not _HEX32.match(text):
            raise ConfigError(
                f"--ca-mrenclave {value!r} is not 64 hex digits (32 bytes); take it from the "
                "CA's signed build, or `modelyo measure ca` on the simulated platform"
            )
        result.append(text)
    return tuple(sorted(set(result)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelyo-agent",
        description="The Modelyo agent in a TDX VM (HTTPS, TLS 1.3). See docs/agent.md.",
    )
    add_server_arguments(parser, state_help="the agent's state (0700)")
    parser.add_argument("--ca", required=True, metavar="URL", help="the Modelyo CA (measured)")
    parser.add_argument(
        "--ca-mrenclave",
        action="append",
        default=[],
        metavar="HEX",
        help="expected CA MRENCLAVE, repeatable (measured; default on the simulated platform: "
        "`modelyo measure ca` of this installation; required on tdx)",
    )
    parser.add_argument(
        "--ca-root",
        choices=("intel", "simulation"),
        help="root the CA's quote must chain to (measured; default: simulation on the "
        "simulated platform, intel on tdx)",
    )
    parser.add_argument(
        "--platform",
        choices=("simulated", "tdx"),
        default="simulated",
        help="simulated (software TD quotes, everything says SIMULATED) or tdx (configfs-tsm)",
    )
    parser.add_argument(
        "--sim-dir",
        type=Path,
        metavar="DIR",
        help="simulated platform directory (default: $MODELYO_SIM_DIR or "
        "~/.local/share/modelyo/sim); simulated GPUs live in its gpu/",
    )
    parser.add_argument(
        "--simulated-gpus",
        type=int,
        default=0,
        metavar="N",
        help="number of SIMULATED GPUs on the simulated platform (default 0)",
    )
    parser.add_argument(
        "--simulated-gpu-tampered",
        action="append",
        type=int,
        default=[],
        metavar="INDEX",
        help="make SIMULATED GPU INDEX report a measurement off its reference, so its "
        "verification fails (for demonstrations and tests; repeatable)",
    )
    parser.add_argument(
        "--crypt-root",
        type=Path,
        metavar="DIR",
        help="tmpfs directory for the containers' /modelyo folders (default /dev/shm/...)",
    )
    parser.add_argument(
        "--host",
        action="append",
        dest="hosts",
        metavar="NAME",
        help="DNS name or IP for the server certificate (repeatable; default localhost, 127.0.0.1)",
    )
    parser.add_argument(
        "--name", metavar="NAME", help="the VM's name at the CA (default: the host name)"
    )
    parser.add_argument(
        "--collateral",
        type=Path,
        metavar="FILE",
        help="collateral JSON for this TD's quotes (tdx; re-read on each attestation)",
    )
    parser.add_argument(
        "--gpu-root",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="NVIDIA device root certificate for GPU evidence (tdx; repeatable)",
    )
    parser.add_argument(
        "--gpu-references",
        type=Path,
        metavar="FILE",
        help="GPU reference measurements (tdx; see modelyo.gpu.reference)",
    )
    parser.add_argument(
        "--builtin-image",
        action="append",
        default=[],
        metavar="REF",
        help="an image the VM ships that the owner may use too (repeatable, e.g. "
        "modelyo/python:3.11)",
    )
    parser.add_argument(
        "--max-image-bytes",
        default=str(DEFAULT_MAX_IMAGE_BYTES),
        metavar="SIZE",
        help="largest image upload accepted (e.g. 512M, 32G; default 32G)",
    )
    parser.add_argument(
        "--retry-max",
        type=float,
        default=DEFAULT_RETRY_MAX,
        metavar="SECONDS",
        help="longest wait between registration attempts (default 60)",
    )
    parser.add_argument(
        "--print-mrconfigid",
        action="store_true",
        help="print the MRCONFIGID of this configuration and exit",
    )
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[AgentConfig, bool]:
    """Parse the command line: (configuration, whether only MRCONFIGID is to be printed).

    `ConfigError` for values argparse cannot check. Resolving the default expected CA
    measurement on the simulated platform hashes this installation's CA code.
    """
    args = build_parser().parse_args(argv)
    host, port = parse_listen(args.listen)
    ca_url = check_ca_url(args.ca)
    mrenclave = check_mrenclave(args.ca_mrenclave)
    platform: Platform = args.platform
    ca_root: Root = args.ca_root or ("simulation" if platform == "simulated" else "intel")
    if not mrenclave:
        if platform != "simulated":
            raise ConfigError(
                "--platform tdx needs --ca-mrenclave HEX: the measurement of the CA build you "
                "trust (from its signed build); an agent never trusts an unpinned CA"
            )
        # The simulated CA measures its own code; this installation has the same code.
        from modelyo.measure import measure

        mrenclave = (measure("ca").hex,)
    if args.simulated_gpus < 0:
        raise ConfigError("--simulated-gpus must be 0 or more")
    if args.simulated_gpus and platform != "simulated":
        raise ConfigError("--simulated-gpus is for --platform simulated; tdx uses NVML")
    for index in args.simulated_gpu_tampered:
        if not 0 <= index < args.simulated_gpus:
            raise ConfigError(
                f"--simulated-gpu-tampered {index}: there are {args.simulated_gpus} simulated "
                "GPUs (--simulated-gpus), numbered from 0"
            )
    if args.retry_max < 1:
        raise ConfigError("--retry-max must be at least 1 second")
    name = (args.name or socket.gethostname() or "modelyo-agent").strip()[:64]
    config = AgentConfig(
        host=host,
        port=port,
        state_dir=Path(os.path.expanduser(args.state_dir)).absolute(),
        ca_url=ca_url,
        ca_mrenclave=mrenclave,
        ca_root=ca_root,
        platform=platform,
        sim_dir=args.sim_dir.expanduser().absolute() if args.sim_dir else None,
        simulated_gpus=args.simulated_gpus,
        tampered_gpus=tuple(sorted(set(args.simulated_gpu_tampered))),
        crypt_root=args.crypt_root.expanduser().absolute() if args.crypt_root else None,
        hosts=tuple(args.hosts) if args.hosts else DEFAULT_HOSTS,
        name=name or "modelyo-agent",
        collateral=args.collateral,
        gpu_roots=tuple(args.gpu_root),
        gpu_references=args.gpu_references,
        builtin_images=tuple(args.builtin_image),
        max_image_bytes=parse_size(args.max_image_bytes, "--max-image-bytes"),
        retry_max=args.retry_max,
        log_level=args.log_level,
    )
    return config, bool(args.print_mrconfigid)
