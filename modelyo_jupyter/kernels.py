"""Local kernels on Unix sockets in a private folder, not on loopback TCP.

A notebook that holds decrypted data talks to its kernel over five ZeroMQ sockets. On TCP
(Jupyter's default) they listen on 127.0.0.1, where any local process can connect or watch
the traffic, and ipykernel warns "Kernel is running over TCP without encryption". With the
IPC transport they are Unix sockets; placed in the user's Jupyter runtime folder (mode 0700)
only the user can reach them.

    papermill.execute_notebook(src, dst, kernel_manager_class=PrivateKernelManager)

or for every kernel a Jupyter server starts: `c.KernelManager.transport = "ipc"` in
`jupyter_server_config.py` (its sockets then go to the kernel's working folder).
"""

from __future__ import annotations

import os
import secrets

from jupyter_client.manager import KernelManager
from jupyter_core.paths import jupyter_runtime_dir
from jupyter_core.utils import ensure_dir_exists
from traitlets import default

__all__ = ["PrivateKernelManager", "private_socket_prefix"]


def private_socket_prefix() -> str:
    """A fresh path prefix for one kernel's sockets, in the 0700 Jupyter runtime folder."""
    folder = jupyter_runtime_dir()
    ensure_dir_exists(folder, mode=0o700)
    return os.path.join(folder, f"modelyo-kernel-{secrets.token_hex(6)}")


class PrivateKernelManager(KernelManager):
    """A KernelManager whose kernel listens on Unix sockets only the user can open."""

    @default("transport")
    def _default_transport(self) -> str:
        return "ipc"

    @default("ip")
    def _default_ip(self) -> str:
        # For the ipc transport `ip` is the sockets' path prefix (jupyter_client appends -N).
        return private_socket_prefix()
