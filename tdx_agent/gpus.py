"""The VM's GPUs as the agent sees them: where evidence comes from and what verifies it.

On the simulated platform the GPUs are SIMULATED (`--simulated-gpus N`, kept in the simulated
platform's `gpu/` directory, the same one the tool verifies against); their device root and
reference measurements come from there. On hardware the evidence comes from NVML, and the roots
and references are files the operator configures (`--gpu-root`, `--gpu-references`); without
them every GPU is reported as refused, saying which is missing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from modelyo.api.agent import GpuReport
from modelyo.errors import ModelyoError
from modelyo.gpu import (
    DeviceRoot,
    GpuSource,
    NvmlSource,
    ReferenceMeasurements,
    SimulatedSource,
    collect,
    simulated_platform,
    verify,
)
from modelyo.tee.sim import default_state_dir
from tdx_agent.config import AgentConfig

log = logging.getLogger("modelyo.agent")


@dataclass(frozen=True)
class Gpus:
    """A GPU evidence source with the roots and references its evidence is verified against."""

    source: GpuSource
    roots: tuple[DeviceRoot, ...]
    references: ReferenceMeasurements | None

    def report(self, nonce: bytes) -> GpuReport:
        """Evidence of every GPU over `nonce` (32 bytes), verified by the agent.

        A failure to collect is reported in `detail` (with no GPUs), never hidden.
        """
        try:
            collected = collect(nonce, source=self.source)
        except ModelyoError as exc:
            log.warning("GPU evidence could not be collected: %s", exc)
            return GpuReport(detail=f"GPU evidence could not be collected: {exc}")
        if not collected.gpus:
            return collected
        return verify(collected, nonce, roots=list(self.roots), references=self.references)


def make_gpus(config: AgentConfig) -> Gpus:
    """The configured GPUs: SIMULATED ones on the simulated platform, NVML on hardware."""
    if config.simulated:
        directory = (config.sim_dir or default_state_dir()) / "gpu"
        source = SimulatedSource(
            state_dir=directory, count=config.simulated_gpus, tampered=config.tampered_gpus
        )
        if config.simulated_gpus == 0:
            return Gpus(source, (), None)
        platform = simulated_platform(directory)
        return Gpus(source, (platform.device_root(),), platform.reference_measurements())
    roots = tuple(DeviceRoot.from_file(Path(path)) for path in config.gpu_roots)
    references = (
        ReferenceMeasurements.from_file(config.gpu_references) if config.gpu_references else None
    )
    return Gpus(NvmlSource(), roots, references)
