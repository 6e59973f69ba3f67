"""Small helpers shared by the tests and by the scripts they start (`gcs_emulator.py` imports this
module when it runs as a script: its folder is then first on `sys.path`, as it is under pytest)."""

from __future__ import annotations

import os
import socket
import subprocess
import time

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


def wait_for(proc: subprocess.Popen, path: str, timeout_s: float = 300) -> None:
    """Returns once `path` exists, or `proc` has ended, or `timeout_s` passed: the moment a test kills a run at."""
    deadline = time.time() + timeout_s
    while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)


def left_padded_prompts(batch: int, vocab: int, length: int = 12, seed: int = 0):
    """(tokens, valid) [batch, length] of random ids in [3, vocab), each row left padded by up to length/2 - 1."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (batch, length)).astype(np.int32)
    valid = np.ones((batch, length), bool)
    for b in range(batch):
        valid[b, : rng.integers(0, length // 2)] = False
    return np.where(valid, tokens, 0), valid
