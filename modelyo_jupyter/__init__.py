"""Modelyo in Jupyter: IPython magics, widgets, encrypted DataFrames, papermill hooks.

Load the magics with `%load_ext modelyo_jupyter`, or automatically:

- every IPython kernel: `c.InteractiveShellApp.extensions = ["modelyo_jupyter"]` in
  `ipython_kernel_config.py` (or `ipython_config.py` for terminal IPython);
- one kernelspec: add `"--ext", "modelyo_jupyter"` to its `argv`;
- on first use: `c.MagicsManager.lazy_magics = {"modelyo": "modelyo_jupyter",
  "modelyo_run": "modelyo_jupyter"}`.

Importing this package is cheap: IPython, pandas and the client are imported when the
extension loads or a name is used.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

__all__ = ["load_ipython_extension", "read_encrypted", "unload_ipython_extension"]

# Names resolved on first use (module `__getattr__`), so `import modelyo_jupyter` stays light.
_LAZY = {"read_encrypted": "modelyo_jupyter.dataframes"}


def load_ipython_extension(ipython: InteractiveShell) -> None:
    """Register `%modelyo` and `%%modelyo_run` (called by `%load_ext modelyo_jupyter`)."""
    from modelyo_jupyter.magics import ModelyoMagics

    ipython.register_magics(ModelyoMagics(ipython))
    # The DataFrame accessor (`df.modelyo...`) registers itself on import.
    if importlib.util.find_spec("modelyo_jupyter.dataframes") is not None:
        importlib.import_module("modelyo_jupyter.dataframes")


def unload_ipython_extension(ipython: InteractiveShell) -> None:
    """Remove the magics again (`%unload_ext modelyo_jupyter`)."""
    manager = ipython.magics_manager
    manager.magics["line"].pop("modelyo", None)
    manager.magics["cell"].pop("modelyo_run", None)
    manager.registry.pop("ModelyoMagics", None)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'modelyo_jupyter' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
