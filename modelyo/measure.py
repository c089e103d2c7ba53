"""Simulated measurements: real hashes of the code that would run.

On hardware, MRENCLAVE (SGX) and MRTD (TDX) are computed by the CPU over what was loaded. On
the simulated platform they are computed here, over the source files of the component, so a
policy that pins them detects any change to the code. `modelyo measure ca|agent` prints them.

Components (the one table, `COMPONENTS`):

=========  =====  ==========  =======  =====================================================
component  TEE    register    digest   packages (optional ones only when importable/present)
=========  =====  ==========  =======  =====================================================
ca         sgx    MRENCLAVE   SHA-256  ``ca_enclave`` (optional), ``modelyo``
agent      tdx    MRTD        SHA-384  ``tdx_agent`` (optional), ``modelyo``
=========  =====  ==========  =======  =====================================================

Locating files: each package's directory comes from the import system
(``importlib.util.find_spec``; works for editable and normal installs), or is
``source_root/<package>`` when a source root is given. Every file below it is measured,
recursively, except directories named ``__pycache__`` and files ending in ``.pyc``. Symbolic
links are followed (the content measured is the content Python imports); anything that is not
a regular file is refused.

Digest, algorithm version 1. Let ``u64(n)`` be n as 8 bytes big-endian and
``lp(b) = u64(len(b)) || b``. For each file, ``path`` is the package name, ``/``, and the
file's path relative to the package directory with ``/`` separators, encoded UTF-8 (for
example ``modelyo/tee/tdx.py``). With the files sorted by the bytes of ``path``::

    value = H( lp(b"modelyo-measurement-v1") || lp(component name, ASCII)
               || u64(number of files)
               || for each file: lp(path) || lp(SHA-256(file contents)) )

where H is SHA-256 for the CA (32 bytes, as MRENCLAVE) and SHA-384 for the agent (48 bytes,
as MRTD). Nothing else enters the digest: no modification times, absolute paths or file
modes, so the value is the same in every checkout and install of the same files, and it
changes when any file is changed, added, removed or renamed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from modelyo.errors import ConfigError, PlatformError
from modelyo.tee.provider import Tee

DOMAIN = b"modelyo-measurement-v1"
_CHUNK = 1 << 16


@dataclass(frozen=True)
class Component:
    """What one component's measurement covers and which register it stands for."""

    tee: Tee
    register: str
    hash_name: str
    required: tuple[str, ...]
    optional: tuple[str, ...]

    @property
    def packages(self) -> tuple[str, ...]:
        return self.optional + self.required


COMPONENTS: Mapping[str, Component] = {
    # The CA's enclave runs ca_enclave on top of the modelyo core (nothing else: see DESIGN).
    "ca": Component(
        tee=Tee.SGX,
        register="MRENCLAVE",
        hash_name="sha256",
        required=("modelyo",),
        optional=("ca_enclave",),
    ),
    # The agent's TD runs tdx_agent on top of the modelyo core.
    "agent": Component(
        tee=Tee.TDX,
        register="MRTD",
        hash_name="sha384",
        required=("modelyo",),
        optional=("tdx_agent",),
    ),
}


@dataclass(frozen=True)
class Measurement:
    """The simulated measurement register value of one component."""

    component: str
    tee: Tee
    register: str
    value: bytes
    file_count: int
    packages: tuple[str, ...]
    missing: tuple[str, ...]

    @property
    def hex(self) -> str:
        """The value as lowercase hex, the form policies pin."""
        return self.value.hex()

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready view, marked simulated."""
        return {
            "component": self.component,
            "tee": str(self.tee),
            "register": self.register,
            "value": self.hex,
            "file_count": self.file_count,
            "packages": list(self.packages),
            "missing": list(self.missing),
            "simulated": True,
        }


def component(name: str) -> Component:
    """Return the table entry for `name`, or raise `ConfigError` naming the valid ones."""
    try:
        return COMPONENTS[name]
    except KeyError:
        raise ConfigError(
            f"unknown component {name!r}; choose one of {', '.join(sorted(COMPONENTS))}"
        ) from None


def locate_packages(name: str, source_root: Path | None = None) -> dict[str, Path]:
    """Return {package: directory} for the packages of component `name` that are present.

    Raises `PlatformError` when a required package cannot be found.
    """
    spec = component(name)
    found: dict[str, Path] = {}
    for package in spec.packages:
        if source_root is not None:
            directory = Path(source_root) / package
            path = directory if (directory / "__init__.py").is_file() else None
        else:
            path = _installed_package_dir(package)
        if path is not None:
            found[package] = path
        elif package in spec.required:
            where = f"under {source_root}" if source_root is not None else "on the import path"
            raise PlatformError(
                f"cannot measure {name}: package {package!r} not found {where}; "
                "install Modelyo or point --source-root at a checkout"
            )
    return found


def measure(name: str, *, source_root: Path | None = None) -> Measurement:
    """Compute the simulated measurement of component `name` ("ca" or "agent").

    `source_root` is a directory holding the package directories (a checkout, or a copy);
    without it the packages are located through the import system.
    """
    spec = component(name)
    packages = locate_packages(name, source_root)
    files: list[tuple[bytes, Path]] = []
    for package, directory in packages.items():
        files.extend(_package_files(package, directory))
    files.sort(key=lambda item: item[0])

    digest = hashlib.new(spec.hash_name)
    digest.update(_lp(DOMAIN))
    digest.update(_lp(name.encode("ascii")))
    digest.update(_u64(len(files)))
    for rel, path in files:
        digest.update(_lp(rel))
        digest.update(_lp(_file_sha256(path)))
    return Measurement(
        component=name,
        tee=spec.tee,
        register=spec.register,
        value=digest.digest(),
        file_count=len(files),
        packages=tuple(sorted(packages)),
        missing=tuple(p for p in spec.packages if p not in packages),
    )


def _installed_package_dir(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.submodule_search_locations is None:
        return None
    locations = list(spec.submodule_search_locations)
    if len(locations) != 1:
        # A namespace package spread over several directories has no single tree to measure.
        raise PlatformError(
            f"cannot measure package {package!r}: it spans {len(locations)} directories "
            f"({', '.join(locations)}); remove the stray copies so one tree is imported"
        )
    return Path(locations[0])


def _package_files(package: str, directory: Path) -> list[tuple[bytes, Path]]:
    files: list[tuple[bytes, Path]] = []
    # Real paths of the directories above each one to visit: links are followed, so a link
    # back to one of them would make the walk endless.
    above: dict[str, frozenset[str]] = {os.fspath(directory): frozenset()}
    for dirpath, dirnames, filenames in os.walk(os.fspath(directory), followlinks=True):
        real = os.path.realpath(dirpath)
        chain = above.pop(dirpath)
        if real in chain:
            raise PlatformError(
                f"cannot measure {directory}: symbolic links form a cycle at {dirpath}; "
                "remove the link"
            )
        chain = chain | {real}
        # Bytecode caches differ between Python versions and runs; they are not the source.
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in dirnames:
            above[os.path.join(dirpath, name)] = chain
        for filename in filenames:
            if filename.endswith(".pyc"):
                continue
            path = Path(dirpath) / filename
            if not path.is_file():
                raise PlatformError(
                    f"cannot measure {path}: not a regular file (a broken link, a socket or "
                    "a pipe); remove it from the package directory"
                )
            rel = f"{package}/{path.relative_to(directory).as_posix()}"
            files.append((rel.encode("utf-8"), path))
    return files


def _file_sha256(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.digest()


def _u64(value: int) -> bytes:
    return value.to_bytes(8, "big")


def _lp(data: bytes) -> bytes:
    return _u64(len(data)) + data
