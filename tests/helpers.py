"""Small helpers shared by the tests and by the scripts they start (`gcs_emulator.py` imports this
module when it runs as a script: its folder is then first on `sys.path`, as it is under pytest)."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def jax_env(devices: int = 1, **extra: str) -> dict[str, str]:
    """The environment of a child JAX process: this one's, on the CPU with `devices` simulated
    devices (1: as on a user's machine), plus `extra`."""
    flags = "" if devices == 1 else f"--xla_force_host_platform_device_count={devices}"
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, **extra)
