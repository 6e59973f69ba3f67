"""The benchmark suite: every benchmark, one JSON and one markdown table, baselines measured in the same run.

    python -m benchmarks.run                  # CPU, today's small shapes (~15 minutes on 2 cores)
    python -m benchmarks.run --quick          # tiny shapes: checks the suite end to end (~2 minutes)
    python -m benchmarks.run --gpu            # Llama-3.2-1B shape, bf16 (under 8 minutes on an H100/H200)
    python -m benchmarks.run --only=train_step,sampler --out=benchmarks/results

1. logprob_kernel   chunked log-probs vs full logits: time and compiled memory, V in {32768, 128256}, L in {512, 2048}
2. train_step       tokens/s, MFU, memory: pl_dpo plain and packed vs a TRL-style Hugging Face PyTorch step
3. sampler          new tokens/s vs Hugging Face `generate`, fraction of the memory-bandwidth bound
4. self_play_round  one SPIN round of the demo, split into generation, reference scoring and training
5. harness_backend  lm-eval requests/s on SmolLM2-135M-Instruct: pl_dpo's backend vs lm-eval's own `hf` backend
6. trl_step         one DPO step on SmolLM2-135M-Instruct, 8 pairs: pl_dpo plain and packed vs TRL's own DPOTrainer
7. lora_step        the Plackett-Luce step with LoRA adapters (rank 16) vs training every weight: time and memory
8. int8_sampler     the sampler with int8 weights (model.sample_int8) vs as trained, SmolLM2: tokens/s, agreement

Writes `<out>/<profile>.json` (the machine, the command, every row) and `<out>/<profile>.md` (the tables
for BENCHMARKS.md). With --gpu, set XLA_PYTHON_CLIENT_PREALLOCATE=false so that JAX and torch share the
card (the suite sets it when it is unset).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

BENCHMARKS = (
    "logprob_kernel",
    "train_step",
    "sampler",
    "self_play_round",
    "harness_backend",
    "trl_step",
    "lora_step",
    "int8_sampler",
)

# Columns of each benchmark's table: (heading, row key, format).
COLUMNS = {
    "logprob_kernel": [("time", "step_s", "s"), ("compiled temporaries", "temp_bytes", "gib")],
    "train_step": [
        ("step", "step_s", "ms"),
        ("list tokens/s", "data_tokens_per_s", "int"),
        ("model tokens/step", "model_tokens", "int"),
        ("MFU", "mfu", "pct"),
        ("compiled temporaries", "temp_bytes", "gib"),
        ("peak memory", "peak_bytes", "gib"),
    ],
    "packing": [
        ("step speed-up", "speedup", "x"),
        ("fewer model tokens", "model_tokens_ratio", "x"),
        ("less compiled temporary memory", "temp_bytes_ratio", "x"),
    ],
    "sampler": [
        ("new tokens/s", "new_tokens_per_s", "int"),
        ("compile", "compile_s", "s"),
        ("of bandwidth bound", "bandwidth_fraction", "pct"),
        ("greedy agreement", "greedy_agreement", "pct"),
    ],
    "self_play_round": [
        ("round", "round_s", "s"),
        ("generation", "generation_s", "s"),
        ("reference scoring", "reference_scoring_s", "s"),
        ("training", "training_s", "s"),
    ],
    "harness_backend": [
        ("simple_evaluate", "step_s", "s"),
        ("requests", "requests", "int"),
        ("requests/s", "requests_per_s", "f1"),
        ("score", "score", "f3"),
        ("same answers as hf", "agreement", "pct"),
    ],
    "lora_step": [
        ("step", "step_s", "ms"),
        ("trained parameters", "trained_params", "int"),
        ("train state", "train_state_bytes", "mib"),
        ("compiled arguments", "argument_bytes", "mib"),
        ("compiled temporaries", "temp_bytes", "mib"),
    ],
    "int8_sampler": [
        ("new tokens/s", "new_tokens_per_s", "int"),
        ("compile", "compile_s", "s"),
        ("same rows", "rows_agreement", "pct"),
        ("same tokens before a difference", "tokens_agreement", "pct"),
        ("of bandwidth bound", "bandwidth_fraction", "pct"),
    ],
    "trl_step": [
        ("step", "step_s", "ms"),
        ("pairs/s", "pairs_per_s", "f1"),
        ("model tokens/step", "model_tokens", "int"),
    ],
}
# The figure a speed-up is taken on, per benchmark (higher is better unless it is a time).
SPEED_KEY = {
    "logprob_kernel": "step_s",
    "train_step": "step_s",
    "sampler": "step_s",
    "self_play_round": "round_s",
    "harness_backend": "step_s",
    "trl_step": "step_s",
    "lora_step": "step_s",
    "int8_sampler": "step_s",
}


def fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    return {
        "s": lambda v: f"{v:.2f} s",
        "ms": lambda v: f"{v * 1e3:,.0f} ms",
        "int": lambda v: f"{v:,.0f}",
        "pct": lambda v: f"{100 * v:.1f}%",
        "gib": lambda v: f"{v / 2**30:.2f} GiB",
        "mib": lambda v: f"{v / 2**20:.1f} MiB",
        "x": lambda v: f"{v:.2f}x",
        "f1": lambda v: f"{v:.1f}",
        "f3": lambda v: f"{v:.3f}",
    }[kind](value)


def with_speedups(rows: list[dict]) -> list[dict]:
    """Adds `speedup` (baseline time / this time) to every row that names a baseline of its case."""
    by_case = {(r["benchmark"], r["case"], r["variant"]): r for r in rows}
    for r in rows:
        base = by_case.get((r["benchmark"], r["case"], r["baseline"])) if r.get("baseline") else None
        key = SPEED_KEY.get(r["benchmark"])
        if base and key and base.get(key) and r.get(key):
            r["speedup"] = base[key] / r[key]
    return rows


def markdown(rows: list[dict], header: dict) -> str:
    m = header["machine"]
    lines = [
        (
            f"Machine: {m.get('torch_device', m['device'])} ({m['platform']}, {m['cpus']} CPUs), jax {m['jax']}, "
            f"torch {m.get('torch', '-')}; `{header['command']}`; median of {header['repeats']} runs after "
            f"{header['warmup']} warm-up; {header['date']}."
        ),
        "",
    ]
    for bench, cols in COLUMNS.items():
        mine = [r for r in rows if r["benchmark"] == bench]
        if not mine:
            continue
        speed = bench in SPEED_KEY
        heads = ["case", "variant"] + [c[0] for c in cols] + (["speed-up vs baseline"] if speed else [])
        lines += [f"### {bench}", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        for r in mine:
            cells = [r["case"], r["variant"]] + [fmt(r.get(key), kind) for _, key, kind in cols]
            if speed:
                cells.append(f"{r['speedup']:.2f}x vs {r['baseline']}" if r.get("speedup") else "baseline")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="Llama-3.2-1B shape, bf16, on the GPU")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (checks the suite, not a measurement)")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma list of benchmarks to run")
    parser.add_argument("--no_torch", action="store_true", help="skip the Hugging Face baselines")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if args.gpu and args.quick:
        parser.error("--gpu and --quick are exclusive")
    unknown = set(args.only.split(",")) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmarks {sorted(unknown)}; known: {', '.join(BENCHMARKS)}")
    if args.gpu:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    else:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax

    from benchmarks import (
        common,
        harness_backend,
        int8_sampler,
        logprob_kernel,
        lora_step,
        sampler,
        self_play_round,
        train_step,
        trl_step,
    )

    profile = common.PROFILES["gpu" if args.gpu else "quick" if args.quick else "cpu"]
    if args.gpu and jax.devices()[0].platform != "gpu":
        parser.error(f"--gpu, but JAX sees {jax.devices()[0].platform} devices")
    with_torch = not args.no_torch
    if with_torch:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            print("torch / transformers not installed: Hugging Face baselines skipped", file=sys.stderr)
            with_torch = False
    runs = {
        "logprob_kernel": lambda: logprob_kernel.run(profile),
        "train_step": lambda: train_step.run(profile, with_torch=with_torch),
        "sampler": lambda: sampler.run(profile, with_torch=with_torch),
        "self_play_round": lambda: self_play_round.run(profile),
        "harness_backend": lambda: harness_backend.run(profile, with_torch=with_torch),
        "trl_step": lambda: trl_step.run(profile, with_torch=with_torch),
        "lora_step": lambda: lora_step.run(profile),
        "int8_sampler": lambda: int8_sampler.run(profile),
    }
    header = {
        "machine": common.machine(),
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "profile": profile.name,
        "repeats": profile.repeats,
        "warmup": profile.warmup,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    rows: list[dict] = []
    os.makedirs(args.out, exist_ok=True)
    table = ""
    for name in args.only.split(","):
        start = time.perf_counter()
        print(f"[benchmarks] {name} ...", file=sys.stderr, flush=True)
        rows += runs[name]()
        print(f"[benchmarks] {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        # Written after every benchmark, so that a run cut short (a lease or a timeout) keeps what it measured.
        table = write_results(args.out, header, with_speedups(rows))
    print(table)
    return 0


def write_results(out: str, header: dict, rows: list[dict]) -> str:
    """Writes `<out>/<profile>.json` and `.md`; returns the markdown."""
    table = markdown(rows, header)
    with open(os.path.join(out, f"{header['profile']}.json"), "w", encoding="utf-8") as f:
        json.dump({**header, "rows": rows}, f, indent=1)
    with open(os.path.join(out, f"{header['profile']}.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    return table


if __name__ == "__main__":
    sys.exit(main())
