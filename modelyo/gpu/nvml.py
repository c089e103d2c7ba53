"""The hardware path: NVIDIA GPUs and their confidential-computing evidence through NVML.

NVML is reached through `pynvml` (PyPI package nvidia-ml-py, in the `agent` extra), imported
only when GPUs are collected, so nothing else needs it. Calls, as NVIDIA's own verifier makes
them: `nvmlInit`; `nvmlSystemGetConfComputeState` (ccFeature, devToolsMode: system-wide);
`nvmlSystemGetDriverVersion`; per GPU `nvmlDeviceGetHandleByIndex`, `nvmlDeviceGetUUID`,
`nvmlDeviceGetName`, `nvmlDeviceGetArchitecture`, `nvmlDeviceGetVbiosVersion`,
`nvmlDeviceGetConfComputeGpuAttestationReport(handle, nonce)` (the SPDM report over the 32-byte
nonce; `attestationReport[:attestationReportSize]`) and `nvmlDeviceGetConfComputeGpuCertificate`
(`attestationCertChain[:attestationCertChainSize]`: PEM, device leaf first); `nvmlShutdown`.

Where there is no NVML (package or driver missing) or no GPU, the report has no GPUs and its
`detail` says why; it never raises for that. A failure on one GPU is recorded on that GPU (as a
problem starting with "collection:") and the others are still collected.

The CC mode is what the TD's own NVIDIA driver reports; it is not inside the signed SPDM report,
so it is as trustworthy as the measured TD that reports it.
"""

from __future__ import annotations

import base64
import importlib
import re
from collections.abc import Callable
from typing import Any

from modelyo.api.agent import GpuEvidence, GpuReport

COLLECTION_PROBLEM = "collection: "

# NVML_DEVICE_ARCH_* values (nvml.h), in case the binding lacks a constant.
_ARCHITECTURES = {
    2: "KEPLER",
    3: "MAXWELL",
    4: "PASCAL",
    5: "VOLTA",
    6: "TURING",
    7: "AMPERE",
    8: "ADA",
    9: "HOPPER",
    10: "BLACKWELL",
}

_PEM_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def load_library() -> tuple[Any | None, str]:
    """`pynvml`, or None and why it is unavailable."""
    try:
        return importlib.import_module("pynvml"), ""
    except ImportError as exc:
        return None, (
            "no NVIDIA GPU: NVML is not available (the Python package nvidia-ml-py is not "
            f"installed: {exc}; install `modelyo[agent]` in a VM with NVIDIA GPUs)"
        )


def _text(value: Any) -> str:
    # Older bindings return bytes, newer ones str.
    if isinstance(value, bytes | bytearray):
        return bytes(value).split(b"\0", 1)[0].decode("utf-8", errors="replace")
    return str(value)


def _buffer(array: Any, size: int) -> bytes:
    # ctypes arrays of c_uint8: only the first `size` bytes are filled.
    return bytes(array[:size])


def split_pem_chain(data: bytes) -> list[str]:
    """The PEM certificates in `data`, in order (NVML pads its buffer with NULs)."""
    text = data.split(b"\0", 1)[0].decode("ascii", errors="replace")
    return [block + "\n" for block in _PEM_BLOCK.findall(text)]


def cc_mode_of(state: Any) -> str:
    """ "devtools", "on" or "off" from an nvmlConfComputeSystemState_t."""
    if getattr(state, "ccFeature", 0) == 0:
        return "off"
    return "devtools" if getattr(state, "devToolsMode", 0) else "on"


def collect(nonce: bytes, library: Any | None = None) -> GpuReport:
    """Evidence of every NVIDIA GPU through NVML, over `nonce` (already checked: 32 bytes).

    `library` is a pynvml-compatible module (tests pass a fake one); None imports pynvml.
    """
    if library is None:
        library, why = load_library()
        if library is None:
            return GpuReport(detail=why)
    error_type: type[BaseException] = getattr(library, "NVMLError", Exception)
    try:
        library.nvmlInit()
    except error_type as exc:
        return GpuReport(
            detail=f"no NVIDIA GPU: NVML could not start ({exc}); no NVIDIA driver is loaded "
            "in this VM, or no GPU is passed through to it"
        )
    try:
        return _collect(library, error_type, nonce)
    finally:
        try:
            library.nvmlShutdown()
        except error_type:
            pass  # nothing left to release if shutting down fails


def _collect(library: Any, error_type: type[BaseException], nonce: bytes) -> GpuReport:
    def call(name: str, *args: Any) -> Any:
        function: Callable[..., Any] = getattr(library, name)
        return function(*args)

    try:
        count = int(call("nvmlDeviceGetCount"))
    except error_type as exc:
        return GpuReport(detail=f"no NVIDIA GPU: NVML cannot count devices ({exc})")
    if count == 0:
        return GpuReport(detail="no NVIDIA GPU: NVML sees no device in this VM")

    notes: list[str] = []
    try:
        cc_mode = cc_mode_of(call("nvmlSystemGetConfComputeState"))
    except (error_type, AttributeError) as exc:
        cc_mode = "off"
        notes.append(f"confidential-computing state unreadable ({exc}), taken as off")
    try:
        driver_version = _text(call("nvmlSystemGetDriverVersion"))
    except error_type as exc:
        driver_version = ""
        notes.append(f"driver version unreadable ({exc})")

    gpus = []
    for index in range(count):
        problems: list[str] = []
        fields: dict[str, Any] = {
            "uuid": "",
            "name": "",
            "arch": "",
            "vbios_version": "",
            "report": "",
            "certificate_chain": [],
        }
        try:
            handle = call("nvmlDeviceGetHandleByIndex", index)
        except error_type as exc:
            problems.append(f"{COLLECTION_PROBLEM}NVML has no handle for GPU {index} ({exc})")
            handle = None
        if handle is not None:
            for key, name, convert in (
                ("uuid", "nvmlDeviceGetUUID", _text),
                ("name", "nvmlDeviceGetName", _text),
                ("arch", "nvmlDeviceGetArchitecture", _arch_name),
                ("vbios_version", "nvmlDeviceGetVbiosVersion", _text),
            ):
                try:
                    fields[key] = convert(call(name, handle))
                except error_type as exc:
                    problems.append(f"{COLLECTION_PROBLEM}{name} failed ({exc})")
            try:
                raw = call("nvmlDeviceGetConfComputeGpuAttestationReport", handle, nonce)
                report = _buffer(raw.attestationReport, raw.attestationReportSize)
                fields["report"] = base64.b64encode(report).decode("ascii")
            except (error_type, AttributeError, TypeError) as exc:
                problems.append(
                    f"{COLLECTION_PROBLEM}the GPU gave no attestation report ({exc}); is it in "
                    "confidential-computing mode, and the driver recent enough?"
                )
            try:
                raw = call("nvmlDeviceGetConfComputeGpuCertificate", handle)
                chain = _buffer(raw.attestationCertChain, raw.attestationCertChainSize)
                fields["certificate_chain"] = split_pem_chain(chain)
            except (error_type, AttributeError, TypeError) as exc:
                problems.append(f"{COLLECTION_PROBLEM}the GPU gave no certificate chain ({exc})")
        gpus.append(
            GpuEvidence(
                index=index,
                driver_version=driver_version,
                cc_mode=cc_mode,
                simulated=False,
                nonce=nonce.hex(),
                verified=False,
                problems=problems,
                **fields,
            )
        )
    detail = f"{count} NVIDIA GPU{'s' if count != 1 else ''} (CC {cc_mode}) through NVML"
    if notes:
        detail += "; " + "; ".join(notes)
    return GpuReport(gpus=gpus, detail=detail)


def _arch_name(value: Any) -> str:
    return _ARCHITECTURES.get(int(value), f"ARCH{int(value)}")
