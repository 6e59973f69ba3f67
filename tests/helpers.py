"""Small helpers shared by the tests and by the scripts they start (`gcs_emulator.py` imports this
module when it runs as a script: its folder is then first on `sys.path`, as it is under pytest)."""

from __future__ import annotations

import os
import socket

# XLA's LLVM optimisation passes are most of the time of a CPU compile of these small programs, and the tests
# compile far more than they run: at -O0 a tiny decoder's sharded init compiles in 2 s instead of 13 s, and the
# quick demo (`configs/demo.py:quick`, steps included) takes 75 s of CPU instead of 123 s. The tests and the
# JAX processes they start compile at -O0 on the CPU (values differ from -O2 by float32 rounding only).
CPU_FAST_COMPILE = "--xla_backend_optimization_level=0"


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def jax_env(devices: int = 1, **extra: str) -> dict[str, str]:
    """The environment of a child JAX process: this one's, on the CPU with `devices` simulated
    devices (1: as on a user's machine) compiling at -O0 (`CPU_FAST_COMPILE`), plus `extra`."""
    flags = CPU_FAST_COMPILE if devices == 1 else f"{CPU_FAST_COMPILE} --xla_force_host_platform_device_count={devices}"
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, **extra)
