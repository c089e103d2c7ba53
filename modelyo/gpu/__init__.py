"""NVIDIA GPU confidential-computing evidence: collected per GPU over the nonce
REPORTDATA[0:32] of the TD quote (through NVML, or from SIMULATED GPUs), and verified against a
device root and reference measurements. The wire form is `modelyo.api.agent.GpuReport`.
"""

from modelyo.gpu.evidence import (
    TAMPERED_MEASUREMENT,
    GpuSource,
    GpuVerdict,
    NvmlSource,
    SimulatedSource,
    check_nonce,
    collect,
    describe,
    simulated_platform,
    verify,
    verify_gpu,
)
from modelyo.gpu.reference import DeviceRoot, ReferenceMeasurements, RimComponent
from modelyo.gpu.sim import SimulatedGpu, SimulatedGpuPlatform

__all__ = [
    "TAMPERED_MEASUREMENT",
    "DeviceRoot",
    "GpuSource",
    "GpuVerdict",
    "NvmlSource",
    "ReferenceMeasurements",
    "RimComponent",
    "SimulatedGpu",
    "SimulatedGpuPlatform",
    "SimulatedSource",
    "check_nonce",
    "collect",
    "describe",
    "simulated_platform",
    "verify",
    "verify_gpu",
]
