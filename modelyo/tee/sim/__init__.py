"""The simulated platform: a software "Intel" for laptops and CI (everything says SIMULATED).

Quotes have the genuine DCAP byte layout and verify with the same dcap-qvl path as hardware
quotes, but only under the simulated root CA (`SimulatedPlatform.root_certificate_der()`),
which a user must choose to trust explicitly.
"""

from modelyo.tee.sim.platform import (
    SIMULATED,
    SimulatedPlatform,
    SimulatedQuoteProvider,
    default_platform,
    default_state_dir,
)

__all__ = [
    "SIMULATED",
    "SimulatedPlatform",
    "SimulatedQuoteProvider",
    "default_platform",
    "default_state_dir",
]
