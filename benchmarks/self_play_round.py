"""One whole self-play round, its time split into generation, reference scoring and training.

Runs the demo (`configs/demo.py`; `:quick` for the quick profile) as a user would, SPIN only, packed
and with the plain layout, twice each in turn (once on a GPU and in the quick profile); the last pass is
reported, so that both read their programs from the same warm persistent compilation cache. Every run after the
first resumes the same workdir after its SPIN lineage is deleted (SFT and its evaluation are shared;
`data.pack_prompt` is a numerics-only field), so every round starts from the same πθ(0). The split comes from the
`timing/*` records `pl_dpo.selfplay.rounds.SelfPlay` writes to `metrics.jsonl`; `round_s` is their sum for round 0.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from benchmarks.common import Profile, row

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = ("generation", "reference_scoring", "training")


def round_timings(metrics_path: str, skip_lines: int) -> dict[str, float]:
    """Seconds per kind of work of SPIN round 0, from the records after the first `skip_lines`."""
    out = dict.fromkeys(WORK, 0.0)
    with open(metrics_path, encoding="utf-8") as f:
        for line in f.readlines()[skip_lines:]:
            rec = json.loads(line)
            work = rec["phase"].removeprefix("timing/")
            if rec["phase"].startswith("timing/") and rec["stage"].startswith("spin/round_0"):
                out[work] += rec["seconds"]
    return out


def run(profile: Profile) -> list[dict]:
    config = "configs/demo.py:quick" if profile.name == "quick" else "configs/demo.py"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        # The repository first, then whatever the caller's path holds (carried wheels on a lent GPU machine).
        python_path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, PYTHONPATH=python_path)
        if profile.name != "quick" or "JAX_COMPILATION_CACHE_DIR" not in env:  # the quick profile: the caller's
            env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tmp, "jax_cache")
        if not profile.gpu:
            env.update(JAX_PLATFORMS="cpu")
        workdir = os.path.join(tmp, "run")
        metrics = os.path.join(workdir, "metrics.jsonl")
        # Two passes (the first warms the compilation cache); one on a GPU, where the suite has 8 minutes, and in
        # the quick profile, whose figures only show that the benchmark runs (tests/test_benchmarks.py).
        passes = 1 if profile.gpu or profile.name == "quick" else 2
        for variant, pack in passes * (("packed", True), ("plain", False)):
            skip = 0
            if os.path.exists(metrics):
                with open(metrics, encoding="utf-8") as f:
                    skip = len(f.readlines())
                shutil.rmtree(os.path.join(workdir, "spin"))
            argv = [
                sys.executable,
                "-m",
                "pl_dpo.main",
                f"--config={config}",
                f"--workdir={workdir}",
                "--config.modes=spin",
                "--config.rounds.num=1",
                f"--config.data.pack_prompt={pack}",
            ]
            proc = subprocess.run(argv, check=False, cwd=REPO, env=env, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
            results[variant] = round_timings(metrics, skip)
    rows = []
    for variant, split in results.items():
        total = sum(split.values())
        rows.append(
            row(
                "self_play_round",
                f"{config}, SPIN round 1",
                f"pl_dpo {variant}",
                baseline=None if variant == "plain" else "pl_dpo plain",
                round_s=total,
                **{f"{w}_s": s for w, s in split.items()},
            )
        )
    return rows
