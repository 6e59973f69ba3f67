"""What every benchmark of the suite shares: the machine it ran on, medians, compiled memory, result rows."""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

# Dense bf16 peak FLOP/s and HBM bandwidth (bytes/s) by device kind, from the vendors' data sheets.
PEAKS: dict[str, tuple[float, float]] = {
    "NVIDIA H100 80GB HBM3": (989e12, 3.35e12),
    "NVIDIA H200": (989e12, 4.8e12),
}


@dataclasses.dataclass(frozen=True)
class Profile:
    """Which shapes a run uses: `cpu` (today's small shapes), `quick` (tiny, for CI), `gpu` (Llama-3.2-1B shape)."""

    name: str
    repeats: int
    warmup: int

    @property
    def gpu(self) -> bool:
        return self.name == "gpu"


PROFILES = {
    "cpu": Profile("cpu", repeats=5, warmup=2),
    "quick": Profile("quick", repeats=2, warmup=1),
    "gpu": Profile("gpu", repeats=10, warmup=3),
}


def machine() -> dict[str, Any]:
    """The device the figures were measured on, in words a reader can compare."""
    dev = jax.devices()[0]
    out = {
        "device": dev.device_kind,
        "platform": dev.platform,
        "num_devices": jax.device_count(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
    }
    try:
        import torch

        out["torch"] = torch.__version__
        if torch.cuda.is_available():
            out["torch_device"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return out


def peaks() -> tuple[float, float] | None:
    """(bf16 FLOP/s, HBM bytes/s) of this machine's accelerator, None on CPU or an unknown card."""
    return PEAKS.get(jax.devices()[0].device_kind)


def median_seconds(run: Callable[[], Any], profile: Profile) -> float:
    """Median wall time of `run` (which must block until its work is done) after `profile.warmup` calls."""
    for _ in range(profile.warmup):
        run()
    times = []
    for _ in range(profile.repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compiled_bytes(compiled) -> dict[str, int]:
    """XLA's compiled memory: arguments, outputs and temporaries (what decides whether a program fits)."""
    m = compiled.memory_analysis()
    return {"argument_bytes": int(m.argument_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes)}


def row(benchmark: str, case: str, variant: str, baseline: str | None = None, **figures: Any) -> dict[str, Any]:
    """One result: `variant` of `case`; `baseline` names the variant of the same case it is compared with."""
    return {"benchmark": benchmark, "case": case, "variant": variant, "baseline": baseline, **figures}


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"
