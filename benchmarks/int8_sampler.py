"""The int8 sampler (`model.sample_int8`) against the sampler as trained: new tokens/s and greedy agreement.

A real model, so that agreement means something (a random model's logits are nearly flat): SmolLM2-135M-Instruct
(`pl_dpo.models.smollm2`, the `real-model` extra; the quick profile: the tiny random model) on the arithmetic
questions of configs/harness_tasks in its chat template, greedy, no stop token (every row makes exactly the
requested new tokens). Agreement: the share of rows whose new tokens are the same, and of tokens before a row's
first difference (later tokens continue different texts, so they are not compared).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time

import jax
import numpy as np

from benchmarks.common import Profile, peaks, row
from pl_dpo import sampler
from pl_dpo.models import DecoderConfig, create_model, from_pretrained, preset_config

QUESTIONS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "harness_tasks", "arith_test.jsonl")


def model_and_prompts(profile: Profile, batch: int, dtype: str):
    if profile.name == "quick":
        model = create_model(preset_config("tiny-llama", vocab_size=256), seed=0)
        rng = np.random.default_rng(0)
        return model, rng.integers(3, 256, (batch, 16)).astype(np.int32), np.ones((batch, 16), bool)
    import transformers

    from pl_dpo.models.smollm2 import smollm2_folder

    folder = smollm2_folder()
    model = from_pretrained(folder, param_dtype=dtype, compute_dtype=dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    with open(QUESTIONS, encoding="utf-8") as f:
        questions = [json.loads(line)["question"] for line in f][:batch]
    ids = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True) for q in questions
    ]
    ids = [list(x["input_ids"]) if isinstance(x, dict) or hasattr(x, "keys") else list(x) for x in ids]
    width = max(map(len, ids))
    tokens = np.zeros((len(ids), width), np.int32)
    valid = np.zeros((len(ids), width), bool)
    for b, x in enumerate(ids):  # left padded
        tokens[b, width - len(x) :], valid[b, width - len(x) :] = x, True
    return model, tokens, valid


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(rows equal, tokens before each row's first difference / all tokens)."""
    same = a == b
    first = np.where(same.all(1), a.shape[1], np.argmin(same, axis=1))
    return float(same.all(1).mean()), float(first.sum() / a.size)


def bandwidth_bound(config: DecoderConfig, batch: int, int8: bool, bytes_per_s: float) -> float:
    """New tokens/s if a decode step only had to read the weights once (int8: the layers at one byte each)."""
    item = np.dtype(config.compute_dtype).itemsize
    weights = config.num_params() * item - (config.num_layer_params() * (item - 1) if int8 else 0)
    return batch / (weights / bytes_per_s)


def run(profile: Profile) -> list[dict]:
    batch, new_tokens = (2, 8) if profile.name == "quick" else (16, 32)
    dtype = "bfloat16" if profile.gpu else "float32"
    model, tokens, valid = model_and_prompts(profile, batch, dtype)
    base = sampler.SamplingConfig(max_new_tokens=new_tokens, greedy=True, eos_ids=(), pad_id=0)
    runners = {"as trained": base, "int8 weights": dataclasses.replace(base, int8=True)}
    outs, times, compile_s = {}, {name: [] for name in runners}, {}
    for name, cfg in runners.items():
        start = time.perf_counter()
        jax.block_until_ready(sampler.generate(model, tokens, valid, 0, cfg).tokens_BxT)
        compile_s[name] = time.perf_counter() - start
    for _ in range(profile.repeats):  # interleaved, so that a load change hits both alike
        for name, cfg in runners.items():
            t0 = time.perf_counter()
            outs[name] = np.asarray(jax.block_until_ready(sampler.generate(model, tokens, valid, 0, cfg).tokens_BxT))
            times[name].append(time.perf_counter() - t0)
    bw = (peaks() or (None, None))[1]
    case = f"{'tiny random' if profile.name == 'quick' else 'SmolLM2-135M-Instruct'} {dtype}, batch {batch}, {new_tokens} new"
    rows = []
    for name in runners:
        med = statistics.median(times[name])
        rows_equal, tokens_equal = agreement(outs[name], outs["as trained"])
        tps = batch * new_tokens / med
        rows.append(
            row(
                "int8_sampler",
                case,
                name,
                baseline=None if name == "as trained" else "as trained",
                step_s=med,
                new_tokens_per_s=tps,
                compile_s=compile_s[name] - med,
                rows_agreement=rows_equal,
                tokens_agreement=tokens_equal,
                bandwidth_fraction=tps / bandwidth_bound(model.config, batch, name != "as trained", bw) if bw else None,
            )
        )
    return rows
