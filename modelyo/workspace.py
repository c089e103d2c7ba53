"""The user's working directory: the six onboarding files and the small config beside them.

| file            | purpose                 | channel       |
|-----------------|-------------------------|---------------|
| ca.pem          | the CA root certificate | tool <-> CA   |
| ca_client.pem   | client certificate      | tool <-> CA   |
| ca_client.key   | client private key 0600 | tool <-> CA   |
| tdx_ca.pem      | the VM's server cert    | tool <-> VM   |
| tdx_client.pem  | client certificate      | tool <-> VM   |
| tdx_client.key  | client private key 0600 | tool <-> VM   |
| modelyo.toml    | endpoints and choices   |               |

Endpoints are found, first match wins: command-line flags, environment variables
(`MODELYO_CA_URL`, `MODELYO_TDX_URL`), `./modelyo.toml`, the user's config file
(`$XDG_CONFIG_HOME/modelyo/config.toml`), and last the local stack started by `modelyo dev up`.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from modelyo.errors import ConfigError, NotAttestedError
from modelyo.files import atomic_write_text

CA_CERT = "ca.pem"
CA_CLIENT_CERT = "ca_client.pem"
CA_CLIENT_KEY = "ca_client.key"
TDX_CERT = "tdx_ca.pem"
TDX_CLIENT_CERT = "tdx_client.pem"
TDX_CLIENT_KEY = "tdx_client.key"
CONFIG_FILE = "modelyo.toml"
CA_FILES = (CA_CERT, CA_CLIENT_CERT, CA_CLIENT_KEY)
TDX_FILES = (TDX_CERT, TDX_CLIENT_CERT, TDX_CLIENT_KEY)
# What `modelyo attest` writes (steps 1 and 2); an owner's commands need them.
ATTEST_FILES = CA_FILES + TDX_FILES
ATTEST_HINT = "run `%modelyo attest` in a notebook, or `modelyo attest` in a shell, there first"


class WorkspaceConfig(BaseModel):
    """What `modelyo attest` records beside the certificates, and a user may write by hand."""

    model_config = ConfigDict(extra="forbid")

    ca_url: str | None = None
    tdx_url: str | None = None
    # True when the user chose to trust the simulated platform's root (never silently).
    simulation: bool = False
    sim_dir: str | None = None
    policy: str | None = None


def user_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "modelyo" / "config.toml"


def read_config(path: Path) -> WorkspaceConfig | None:
    """Read a config file; None when it does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return WorkspaceConfig.model_validate(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path} is invalid: {problems}") from None


def _toml(config: WorkspaceConfig) -> str:
    lines = ["# Written by `modelyo attest`; edit freely (see `modelyo attest --help`)."]
    for key, value in config.model_dump(exclude_none=True).items():
        # JSON string and boolean syntax is valid TOML for these flat values.
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Workspace:
    """A directory holding (or about to hold) the onboarding files."""

    root: Path

    @classmethod
    def here(cls) -> Workspace:
        return cls(Path.cwd())

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    def config(self) -> WorkspaceConfig:
        return read_config(self.config_path) or WorkspaceConfig()

    def save_config(self, config: WorkspaceConfig) -> None:
        atomic_write_text(self.config_path, _toml(config))

    def has(self, *names: str) -> bool:
        return all(self.path(n).is_file() for n in names)

    @property
    def ca_owner(self) -> bool:
        """Whether this directory holds a complete CA onboarding (pinned root and client)."""
        return self.has(*CA_FILES)

    @property
    def attested(self) -> bool:
        """Whether this directory holds all six files `modelyo attest` writes."""
        return self.has(*ATTEST_FILES)

    def require(self, names: tuple[str, ...] = ATTEST_FILES, *, needed_for: str = "this") -> None:
        """Raise NotAttestedError, saying what to do, unless all `names` are here."""
        missing = [n for n in names if not self.path(n).is_file()]
        if missing:
            raise NotAttestedError(
                f"{self.root} is not attested: {needed_for} needs {', '.join(missing)}, which "
                f"`modelyo attest` writes; {ATTEST_HINT}"
            )


@dataclass(frozen=True)
class Endpoint:
    """Where a service is, and where that answer came from (shown to the user)."""

    url: str
    source: str


def resolve_endpoint(
    service: str, flag: str | None, workspace: Workspace, *, dev_stack: dict[str, str] | None
) -> Endpoint | None:
    """Find the URL of `service` ("ca" or "tdx") by the documented order."""
    if flag:
        return Endpoint(flag, "command line")
    env = os.environ.get(f"MODELYO_{service.upper()}_URL")
    if env:
        return Endpoint(env, f"MODELYO_{service.upper()}_URL")
    for path in (workspace.config_path, user_config_path()):
        config = read_config(path)
        url = getattr(config, f"{service}_url", None) if config else None
        if url:
            return Endpoint(url, str(path))
    if dev_stack and dev_stack.get(service):
        return Endpoint(dev_stack[service], "the local stack (modelyo dev up)")
    return None
