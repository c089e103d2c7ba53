"""Modelyo: confidential GPU computing for data scientists.

The core package is the `modelyo` tool and everything the CA, the agent and the Jupyter
integration share: attestation, quote providers, PKI helpers and the encrypted-file format.
"""

__version__ = "0.1.0"
