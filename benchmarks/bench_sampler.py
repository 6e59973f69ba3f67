"""Sampler throughput (new tokens/s) against Hugging Face `generate` on the same weights and prompts, same run.

    python benchmarks/bench_sampler.py                               # CPU, small model, vs HF (torch CPU)
    python benchmarks/bench_sampler.py --llama_1b --hbm_gbps=4800    # GPU: Llama-3.2-1B shape, bf16, batch 64,
                                                                     # 256-token prompts, 256 new tokens (add --hf)

Both sides decode greedily with no EOS, so every row produces exactly --new_tokens tokens. Prompts are left-padded
with random lengths in [prompt_len/2, prompt_len]. Times are medians of --runs runs after one warm-up call; our
compile time (first call minus the median) is reported separately. With --hbm_gbps the fraction of the decode's
memory-bandwidth bound is printed: each decode step must read every weight once (compute dtype) plus the live part
of the KV cache; bound = batch / (bytes per step / bandwidth).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import numpy as np

from pl_dpo import sampler
from pl_dpo.models import create_model, preset_config, save_pretrained


def _prompts(batch: int, prompt_len: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = np.zeros((batch, prompt_len), np.int32)
    valid = np.zeros((batch, prompt_len), bool)
    for b in range(batch):
        n = int(rng.integers(prompt_len // 2, prompt_len + 1))
        tokens[b, prompt_len - n :] = rng.integers(3, vocab, n)
        valid[b, prompt_len - n :] = True
    return tokens, valid


def _ours(model, tokens, valid, cfg):
    def run(seed: int):
        out = sampler.generate(model, tokens, valid, seed, cfg)
        jax.block_until_ready(out.tokens_BxT)
        return np.asarray(out.tokens_BxT)

    return run


def _hf(folder: str, tokens, valid, new_tokens: int, dtype: str, threads: int):
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = (
        transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=getattr(torch, dtype), attn_implementation="sdpa"
        )
        .to(device)
        .eval()
    )
    ids = torch.tensor(tokens, dtype=torch.long, device=device)
    mask = torch.tensor(valid.astype(np.int64), device=device)

    def run(seed: int):
        del seed  # greedy
        torch.set_num_threads(threads)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
                eos_token_id=None,
            )
        if device == "cuda":
            torch.cuda.synchronize()
        return out[:, tokens.shape[1] :].cpu().numpy()

    return run


def _timed(run, seed: int):
    t0 = time.perf_counter()
    out = run(seed)
    return time.perf_counter() - t0, out


def _bandwidth_bound(config, batch: int, prompt_len: int, new_tokens: int, gbps: float) -> float:
    """New tokens/s if each decode step only had to read the weights and the live KV cache once."""
    bytes_per = np.dtype(config.compute_dtype).itemsize
    weights = config.num_params() * bytes_per
    mean_live = prompt_len * 0.75 + new_tokens / 2  # mean prompt length is 3/4 of prompt_len (see _prompts)
    kv = 2 * config.num_layers * batch * mean_live * config.num_kv_heads * config.head_dim * bytes_per
    return batch / ((weights + kv) / (gbps * 1e9))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-llama3")
    parser.add_argument("--vocab_size", type=int, default=0, help="override the preset's vocabulary (0: keep)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--hf",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time HF generate (default: on, except with --llama_1b)",
    )
    parser.add_argument(
        "--llama_1b", action="store_true", help="Llama-3.2-1B shape, bf16, batch 64, 256-token prompts, 256 new tokens"
    )
    parser.add_argument(
        "--torch_threads",
        default=f"1,{os.cpu_count() or 1}",
        help="comma list; HF is timed at each and its best is reported (on a shared machine, torch's "
        "multi-threaded kernels can collapse under contention)",
    )
    parser.add_argument("--hbm_gbps", type=float, default=0.0, help="memory bandwidth (GB/s) for the bound")
    args = parser.parse_args()
    if args.llama_1b:
        args.preset, args.dtype, args.batch, args.prompt_len, args.new_tokens = "llama-3.2-1b", "bfloat16", 64, 256, 256
    hf = (not args.llama_1b) if args.hf is None else args.hf

    overrides = {"vocab_size": args.vocab_size} if args.vocab_size else {}
    config = preset_config(args.preset, param_dtype=args.dtype, compute_dtype=args.dtype, **overrides)
    model = create_model(config, seed=0)
    tokens, valid = _prompts(args.batch, args.prompt_len, config.vocab_size)
    cfg = sampler.SamplingConfig(max_new_tokens=args.new_tokens, greedy=True, eos_ids=(), pad_id=0)
    runners = {"ours": _ours(model, tokens, valid, cfg)}
    folder = tempfile.TemporaryDirectory()
    if hf:
        save_pretrained(model, folder.name)
        for threads in sorted({int(x) for x in args.torch_threads.split(",")}):
            runners[f"hf{threads}"] = _hf(folder.name, tokens, valid, args.new_tokens, args.dtype, threads)
    first = {name: _timed(run, 0)[0] for name, run in runners.items()}  # compile / warm-up
    times = {name: [] for name in runners}
    outs = {}
    for r in range(args.runs):  # interleaved, so a load change on a shared machine hits both sides alike
        for name, run in runners.items():
            t, outs[name] = _timed(run, r + 1)
            times[name].append(t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    new = args.batch * args.new_tokens
    ours_tps = new / med["ours"]
    compile_s = first["ours"] - med["ours"]
    hf_cell, speed_cell, agree_cell = "-", "-", "-"
    if hf:
        best = min((n for n in med if n.startswith("hf")), key=med.get)
        hf_cell = f"{new / med[best]:,.0f} ({best[2:]} thr)"
        speed_cell = f"{med[best] / med['ours']:.1f}x"
        agree_cell = f"{(outs[best] == outs['ours']).mean():.3f}"
        print(
            "HF tok/s per torch thread count: "
            + ", ".join(f"{n[2:]}: {new / med[n]:,.0f}" for n in med if n.startswith("hf"))
        )
    folder.cleanup()
    bound_cell = "-"
    if args.hbm_gbps:
        bound = _bandwidth_bound(config, args.batch, args.prompt_len, args.new_tokens, args.hbm_gbps)
        bound_cell = f"{ours_tps / bound:.2f} of {bound:,.0f}"
    device = jax.devices()[0].device_kind
    print(
        f"jax {jax.__version__}, {device}, {os.cpu_count()} CPUs, {config.num_params() / 1e6:.2f}M params, "
        f"median of {args.runs}"
    )
    print(
        "| model | device | dtype | batch | prompt | new | ours tok/s | HF tok/s | speedup | greedy agreement "
        "| compile s | fraction of bandwidth bound |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.preset} | {device} | {args.dtype} | {args.batch} | {args.prompt_len} | {args.new_tokens} "
        f"| {ours_tps:,.0f} | {hf_cell} | {speed_cell} | {agree_cell} | {compile_s:.1f} | {bound_cell} |"
    )


if __name__ == "__main__":
    main()
