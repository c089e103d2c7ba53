"""What GPU evidence is verified against: device root certificates and reference measurements.

Both are configuration, given as files. On hardware the device root is NVIDIA's "NVIDIA Device
Identity CA" (nvtrust ships it as `verifier_device_root.pem`) and the reference measurements
come from NVIDIA's RIMs for the driver and VBIOS versions in use. In simulation both come from
the simulated GPU state directory (`modelyo.gpu.sim`), and say SIMULATED.

Reference measurements file (JSON, UTF-8):

    {"format": "modelyo-gpu-reference-v1", "name": "...", "simulated": false,
     "components": [
       {"kind": "driver", "version": "550.127.05",
        "measurements": {"33": ["<96 hex digits>", ...], ...}},
       {"kind": "vbios", "version": "96.00.9F.00.04", "measurements": {...}}]}

Each measurement index lists the values it may take (NVIDIA's RIMs allow alternatives). For a
GPU, the driver component whose version equals the driver version in its signed report and the
VBIOS component whose version equals its VBIOS version are merged; every measurement in the
report must then be listed and match (fail closed: an unlisted index is a problem).

Not done here: reading NVIDIA's RIM files themselves (SWID XML) and checking their XML-DSig
signatures to "NVIDIA CoRIM signing Root CA", and OCSP revocation checks of either chain. Until
then an operator who converts NVIDIA's RIMs into this format vouches for them, as for pinned
TDX measurements.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from modelyo.errors import ConfigError

SIMULATED_MARK = "SIMULATED"
REFERENCE_FORMAT = "modelyo-gpu-reference-v1"
COMPONENT_KINDS = ("driver", "vbios")

ComponentKind = Literal["driver", "vbios"]


@dataclass(frozen=True)
class DeviceRoot:
    """A root certificate GPU device chains may lead to."""

    name: str
    certificate: x509.Certificate
    simulated: bool = False

    @property
    def der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the DER certificate, hex."""
        return sha256(self.der).hexdigest()

    @property
    def subject(self) -> str:
        return self.certificate.subject.rfc4514_string()

    @classmethod
    def from_bytes(cls, data: bytes, name: str) -> DeviceRoot:
        """A root from PEM or DER; marked simulated when its subject says SIMULATED."""
        try:
            cert = (
                x509.load_pem_x509_certificate(data)
                if b"-----BEGIN" in data
                else x509.load_der_x509_certificate(data)
            )
        except ValueError:
            raise ConfigError(f"{name} is not a PEM or DER X.509 certificate") from None
        simulated = SIMULATED_MARK in cert.subject.rfc4514_string().upper()
        return cls(name, cert, simulated)

    @classmethod
    def from_file(cls, path: str | Path) -> DeviceRoot:
        """A root certificate file, e.g. NVIDIA's `verifier_device_root.pem`."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"cannot read GPU device root certificate {path}: {exc.strerror}"
            ) from None
        return cls.from_bytes(data, str(path))


@dataclass(frozen=True)
class RimComponent:
    """Reference measurements of one driver or VBIOS version: index -> allowed values."""

    kind: ComponentKind
    version: str
    measurements: Mapping[int, tuple[bytes, ...]]


@dataclass(frozen=True)
class ReferenceMeasurements:
    """Reference ("golden") measurements for the driver and VBIOS versions one trusts."""

    name: str
    components: tuple[RimComponent, ...]
    simulated: bool = False

    def select(
        self, driver_version: str, vbios_version: str
    ) -> tuple[dict[int, tuple[bytes, ...]], list[str]]:
        """The merged reference for these versions, and what is missing or inconsistent."""
        problems: list[str] = []
        merged: dict[int, tuple[bytes, ...]] = {}
        owner: dict[int, str] = {}
        for kind, version in (("driver", driver_version), ("vbios", vbios_version)):
            found = [
                c
                for c in self.components
                if c.kind == kind and c.version.casefold() == version.casefold()
            ]
            if not found:
                known = sorted({c.version for c in self.components if c.kind == kind})
                problems.append(
                    f"the reference measurements {self.name} have nothing for {kind} version "
                    f"{version} (they cover {', '.join(known) or 'no ' + kind + ' version'}); "
                    f"add the RIM of that version or update the {kind}"
                )
                continue
            for component in found:
                for index, values in component.measurements.items():
                    if index in owner and owner[index] != kind:
                        problems.append(
                            f"the reference measurements {self.name} list measurement {index} "
                            f"for both the driver and the VBIOS; fix the reference file"
                        )
                    owner[index] = kind
                    merged[index] = merged.get(index, ()) + tuple(values)
        return merged, problems

    def to_json(self) -> str:
        document = {
            "format": REFERENCE_FORMAT,
            "name": self.name,
            "simulated": self.simulated,
            "components": [
                {
                    "kind": c.kind,
                    "version": c.version,
                    "measurements": {
                        str(index): [value.hex() for value in values]
                        for index, values in sorted(c.measurements.items())
                    },
                }
                for c in self.components
            ],
        }
        return json.dumps(document, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "reference measurements") -> ReferenceMeasurements:
        try:
            doc: Any = json.loads(text)
            if not isinstance(doc, dict) or doc.get("format") != REFERENCE_FORMAT:
                raise ConfigError(
                    f"{source} is not a GPU reference measurements file (its format must be "
                    f"{REFERENCE_FORMAT!r})"
                )
            components = []
            for item in doc["components"]:
                kind = item["kind"]
                if kind not in COMPONENT_KINDS:
                    raise ConfigError(f"{source}: component kind {kind!r} is not driver or vbios")
                measurements = {
                    int(index): tuple(bytes.fromhex(v) for v in values)
                    for index, values in item["measurements"].items()
                }
                components.append(RimComponent(kind, str(item["version"]), measurements))
            return cls(
                name=str(doc.get("name") or source),
                components=tuple(components),
                simulated=bool(doc.get("simulated", False)),
            )
        except ConfigError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{source} is not valid: {type(exc).__name__}: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> ReferenceMeasurements:
        try:
            text = Path(path).read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read GPU reference measurements {path}: {exc}") from None
        return cls.from_json(text, str(path))
