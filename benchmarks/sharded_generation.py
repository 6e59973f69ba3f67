"""Sharded vs replicated generation and scoring of the same prompts on 8 simulated CPU devices (rows per second),
and generation of mixed-length prompts grouped by length vs in dataset order.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python -m benchmarks.sharded_generation

"Replicated" is the layout before issue 11: the weights FSDP-sharded over the 8 devices and every device working
on every row (decode: tp = the whole mesh, one batch group; scoring: the batch replicated). "Sharded" is today's:
decode with the batch split 8 ways and the weights whole per device (the CPU rule, tp = 1); scoring with the batch
split 8 ways and the weights gathered per layer. Outputs are checked equal. Median of a few runs after a warm-up.

Length grouping (`sampler.generate_responses`): 128 prompts, half of 8-16 tokens and half of 200-250, in
alternation, batch 16, 32 new tokens; in dataset order every batch pads to the long bucket, grouped half of them
pad to the short one. Each prompt has its own key, so the samples are the same either way (checked).
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax
import numpy as np
from flax import nnx

from pl_dpo import decode_layout, sampler, scoring, sharding
from pl_dpo.data import RankedBatch, RankedSet
from pl_dpo.models import create_model, preset_config

BATCH, PROMPT, NEW, RUNS = 32, 64, 32, 3


def _median(fn) -> tuple[float, object]:
    out = fn()  # compile
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _replicated_scores(model, arrays, batch):
    """Scoring as before: every device scores every row."""
    graphdef, params = nnx.split(model)
    rep = sharding.replicated_like(params)
    n = arrays.tokens_NxKxL.shape[0]
    outs = []
    fields = ("tokens_NxKxL", "loss_mask_NxKxL", "attn_valid_NxKxL", "positions_NxKxL")
    for start in range(0, n, batch):
        x = [jax.device_put(arrays[f][start : start + batch], rep) for f in fields]
        with jax.set_mesh(rep.mesh):
            outs.append(_score(graphdef, params, *x))
    return np.concatenate([np.asarray(o) for o in outs])


@jax.jit
def _score(graphdef, params, *fields):
    return scoring.list_logps(nnx.merge(graphdef, params), *fields)


def main() -> None:
    cfg = preset_config("tiny-llama3", vocab_size=512)
    model = create_model(cfg, seed=0)
    mesh = sharding.make_mesh(1, -1, 1)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, sharding.logical_to_shardings(state, mesh, sharding.DEFAULT_DECODER_RULES))
    sharded = nnx.merge(graphdef, state)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 512, (BATCH, PROMPT)).astype(np.int32)
    valid = np.ones((BATCH, PROMPT), bool)
    sc = sampler.SamplingConfig(max_new_tokens=NEW, greedy=True, pad_id=0)
    print(f"{cfg.num_params() / 1e6:.1f}M params, {len(jax.devices())} CPU devices, median of {RUNS}")
    one = jax.device_put(state, jax.devices()[0])
    rows = {}
    for name, m, tp in (
        ("1 device", nnx.merge(graphdef, one), None),
        ("8 devices, replicated batch", sharded, 8),
        ("8 devices, batch split 8 ways", sharded, None),
    ):
        w = decode_layout.decode_weights(m, BATCH, PROMPT + NEW, tp=tp)
        t, out = _median(lambda m=m, w=w: sampler.generate(m, tokens, valid, 0, sc, weights=w).tokens_BxT)
        rows[name] = np.asarray(out)
        print(f"generation  {name:32s} {BATCH / t:8.1f} rows/s  ({t * 1e3:.0f} ms, batch {BATCH}, {PROMPT}+{NEW})")
    assert all((v == rows["1 device"]).all() for v in rows.values()), "generation outputs differ"

    n, k, length = 64, 2, 128
    toks = rng.integers(3, 512, (n, k, length)).astype(np.int32)
    arrays = RankedSet(
        tokens_NxKxL=toks,
        loss_mask_NxKxL=np.broadcast_to(np.arange(length) >= 64, (n, k, length)).copy(),
        attn_valid_NxKxL=np.ones((n, k, length), bool),
        valid_NxK=np.ones((n, k), bool),
    )
    t_one, ref = _median(lambda: scoring.score_ranked(nnx.merge(graphdef, one), arrays, 16, batch_type=RankedBatch))
    t_rep, rep = _median(lambda: _replicated_scores(sharded, arrays, 16))
    t_sh, out = _median(lambda: scoring.score_ranked(sharded, arrays, 16, batch_type=RankedBatch))
    for name, t in (("1 device", t_one), ("8 devices, replicated batch", t_rep), ("8 devices, batch split", t_sh)):
        print(f"scoring     {name:32s} {n / t:8.1f} lists/s ({t * 1e3:.0f} ms, {n} lists x {k} x {length})")
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(rep, ref, rtol=1e-5, atol=1e-3)
    _length_grouping(sharded)


def _length_grouping(model, n: int = 128, width: int = 256, batch: int = 16) -> None:
    rng = np.random.default_rng(1)
    lengths = [int(rng.integers(8, 17)) if i % 2 else int(rng.integers(200, 251)) for i in range(n)]
    valid = np.arange(width)[None, :] >= width - np.array(lengths)[:, None]
    tokens = np.where(valid, rng.integers(3, 512, (n, width)), 0).astype(np.int32)
    arrays = {"prompt_tokens_NxP": tokens, "prompt_valid_NxP": valid}
    sc = sampler.SamplingConfig(max_new_tokens=NEW, temperature=1.0, pad_id=0, eos_ids=(1,))
    key = jax.random.key(0)
    out = {}
    for grouped in (False, True):
        run = lambda g=grouped: sampler.generate_responses(model, arrays, sc, key, batch, 1, group_by_length=g)
        t, out[grouped] = _median(run)
        name = "grouped by length" if grouped else "dataset order"
        print(f"generation  {name:32s} {n / t:8.1f} rows/s  ({t * 1e3:.0f} ms, {n} prompts of 8-16 | 200-250 tokens)")
    same = np.mean([a == b for a, b in zip(out[False], out[True])])
    print(f"            same sample for {same:.0%} of prompts")
    assert same >= 0.95, "length grouping changed the samples"


if __name__ == "__main__":
    main()
