"""The benchmark suite runs end to end (`python -m benchmarks.run --quick`) and writes what BENCHMARKS.md quotes.

Figures at these tiny shapes mean nothing; what is checked is that every benchmark runs, that each
speed-up is computed against a baseline measured in the same run, and that packed and plain agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_suite(out, only: str, timeout: float = 600) -> dict:
    argv = [sys.executable, "-m", "benchmarks.run", "--quick", f"--only={only}", f"--out={out}"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "quick.md").read_text().startswith("Machine: ")
    return json.loads((out / "quick.json").read_text())


@pytest.mark.slow  # ~17 s: the quick profile of three benchmarks end to end
def test_kernel_step_and_sampler_benchmarks(tmp_path):
    result = run_suite(tmp_path, "logprob_kernel,train_step,sampler")
    assert result["command"].startswith("python -m benchmarks.run --quick") and result["machine"]["jax"]
    rows = {(r["benchmark"], r["variant"]): r for r in result["rows"]}
    chunked = next(r for r in result["rows"] if r["benchmark"] == "logprob_kernel" and r["baseline"])
    assert chunked["baseline"] == "full logits" and chunked["speedup"] > 0 and chunked["temp_bytes"] > 0
    hf = ("train_step", "Hugging Face (TRL-style)")
    if hf in rows:  # torch installed (the test extras)
        assert rows[("train_step", "pl_dpo packed")]["baseline"] == hf[1]
        assert rows[("train_step", "pl_dpo packed")]["speedup"] > 0
        assert rows[("sampler", "pl_dpo")]["greedy_agreement"] == 1.0
    packed, plain = rows[("train_step", "pl_dpo packed")], rows[("train_step", "pl_dpo plain")]
    assert packed["model_tokens"] < plain["model_tokens"]  # the prompt runs once per list
    assert rows[("packing", "packed vs plain")]["model_tokens_ratio"] == plain["model_tokens"] / packed["model_tokens"]


@pytest.mark.slow
def test_self_play_round_benchmark(tmp_path):
    result = run_suite(tmp_path, "self_play_round", timeout=900)
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"pl_dpo packed", "pl_dpo plain"}
    for r in rows.values():
        assert r["generation_s"] > 0 and r["reference_scoring_s"] > 0 and r["training_s"] > 0
        assert r["round_s"] == pytest.approx(r["generation_s"] + r["reference_scoring_s"] + r["training_s"])
    assert rows["pl_dpo packed"]["baseline"] == "pl_dpo plain" and rows["pl_dpo packed"]["speedup"] > 0
