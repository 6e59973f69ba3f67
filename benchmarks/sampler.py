"""Sampler: new tokens/s of pl_dpo's jitted prefill + `lax.while_loop` decode vs Hugging Face `generate`.

Same weights (pl_dpo's random init exported and loaded by `transformers`), same left-padded prompts of
random lengths in [P/2, P], greedy, no EOS (every row makes exactly the requested new tokens); runs are
interleaved so that a load change on a shared machine hits both sides alike. On a known card the
fraction of the decode's memory-bandwidth bound is given: each step must read every weight once (compute
dtype) plus the live part of the KV cache.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time

import jax
import numpy as np

from benchmarks.common import Profile, peaks, row
from pl_dpo import sampler
from pl_dpo.models import DecoderConfig, create_model, preset_config, save_pretrained


@dataclasses.dataclass(frozen=True)
class Case:
    preset: str
    dtype: str
    batch: int
    prompt_len: int
    new_tokens: int

    @property
    def name(self) -> str:
        return f"{self.preset} {self.dtype}, batch {self.batch}, prompt {self.prompt_len}, {self.new_tokens} new"


def cases(profile: Profile) -> list[Case]:
    if profile.gpu:
        return [Case("llama-3.2-1b", "bfloat16", 64, 256, 256)]
    if profile.name == "quick":
        return [Case("tiny-llama", "float32", 2, 8, 8)]
    return [Case("tiny-llama3", "float32", 8, 64, 64), Case("tiny-llama3", "float32", 32, 64, 64)]


def prompts(batch: int, prompt_len: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = np.zeros((batch, prompt_len), np.int32)
    valid = np.zeros((batch, prompt_len), bool)
    for b in range(batch):
        n = int(rng.integers(prompt_len // 2, prompt_len + 1))
        tokens[b, prompt_len - n :] = rng.integers(3, vocab, n)
        valid[b, prompt_len - n :] = True
    return tokens, valid


def hf_generate(folder: str, tokens, valid, new_tokens: int, dtype: str, threads: int):
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
    ids = torch.tensor(tokens, dtype=torch.long, device=device)
    mask = torch.tensor(valid.astype(np.int64), device=device)

    def run():
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


def bandwidth_bound(config: DecoderConfig, case: Case, bytes_per_s: float) -> float:
    """New tokens/s if each decode step only had to read the weights and the live KV cache once."""
    item = np.dtype(config.compute_dtype).itemsize
    mean_live = case.prompt_len * 0.75 + case.new_tokens / 2  # prompts average 3/4 of prompt_len
    kv = 2 * config.num_layers * case.batch * mean_live * config.num_kv_heads * config.head_dim * item
    return case.batch / ((config.num_params() * item + kv) / bytes_per_s)


def run(profile: Profile, with_torch: bool = True) -> list[dict]:
    if profile.gpu:  # Hugging Face `generate` of 64 x 256 tokens takes ~14 s on an H200: 3 runs, not 10
        profile = dataclasses.replace(profile, repeats=3, warmup=1)
    rows = []
    for case in cases(profile):
        config = preset_config(case.preset, param_dtype=case.dtype, compute_dtype=case.dtype)
        model = create_model(config, seed=0)
        tokens, valid = prompts(case.batch, case.prompt_len, config.vocab_size)
        cfg = sampler.SamplingConfig(max_new_tokens=case.new_tokens, greedy=True, eos_ids=(), pad_id=0)

        def ours(model=model, tokens=tokens, valid=valid, cfg=cfg):
            out = sampler.generate(model, tokens, valid, 0, cfg)
            return np.asarray(jax.block_until_ready(out.tokens_BxT))

        runners = {"pl_dpo": ours}
        folder = tempfile.TemporaryDirectory()
        if with_torch:
            save_pretrained(model, folder.name)
            # Timed at 1 thread and at all cores; its better figure is kept (torch's threaded kernels can
            # collapse when the machine is shared).
            threads = (1,) if profile.gpu else sorted({1, os.cpu_count() or 1})
            for t in threads:
                runners[f"hf{t}"] = hf_generate(folder.name, tokens, valid, case.new_tokens, case.dtype, t)
        start = time.perf_counter()
        ours()
        compile_s = time.perf_counter() - start
        for r in runners.values():
            r()  # warm-up
        times = {name: [] for name in runners}
        outs = {}
        for _ in range(profile.repeats):
            for name, r in runners.items():
                t0 = time.perf_counter()
                outs[name] = r()
                times[name].append(time.perf_counter() - t0)
        folder.cleanup()
        med = {name: statistics.median(ts) for name, ts in times.items()}
        new = case.batch * case.new_tokens
        bw = (peaks() or (None, None))[1]
        ours_tps = new / med["pl_dpo"]
        hf = [n for n in med if n.startswith("hf")]
        best_hf = min(hf, key=med.get) if hf else None
        rows.append(
            row(
                "sampler",
                case.name,
                "pl_dpo",
                baseline="Hugging Face generate" if best_hf else None,
                new_tokens_per_s=ours_tps,
                step_s=med["pl_dpo"],
                compile_s=compile_s - med["pl_dpo"],
                bandwidth_fraction=ours_tps / bandwidth_bound(config, case, bw) if bw else None,
                greedy_agreement=float((outs[best_hf] == outs["pl_dpo"]).mean()) if best_hf else None,
            )
        )
        if best_hf:
            rows.append(
                row(
                    "sampler",
                    case.name,
                    "Hugging Face generate",
                    new_tokens_per_s=new / med[best_hf],
                    step_s=med[best_hf],
                    torch_threads=int(best_hf[2:]),
                )
            )
    return rows
