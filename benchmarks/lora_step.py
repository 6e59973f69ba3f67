"""LoRA step vs full step: the same Plackett-Luce step (packed batch, AdamW) training every weight, or LoRA
adapters (rank 16, every attention and MLP projection) on the frozen weights.

Per variant: median step time, the compiled program's arguments (weights + optimizer state + batch) and
temporaries (activations, gradients), and the bytes of a mid-phase train state (what a checkpoint holds:
trained parameters and AdamW's two moments).
"""

from __future__ import annotations

import jax

from benchmarks.common import Profile, compiled_bytes, median_seconds, row
from benchmarks.train_step import Workload, model_config, ranked_arrays
from configs import common
from pl_dpo import config_lib, losses, sharding
from pl_dpo.data import BatchIterator, PackedBatch
from pl_dpo.models import create_model, lora
from pl_dpo.training import train

RANK = 16
ADAPTERS = lora.LoraConfig(rank=RANK, alpha=2.0 * RANK, rslora=False, targets=r"(q|k|v|o|gate|up|down)_proj$")


def workloads(profile: Profile) -> list[Workload]:
    if profile.gpu:
        return [Workload("1B, 16k tokens, K=2", 16, 2, 256, 256)]
    if profile.name == "quick":
        return [Workload("tiny, K=2", 2, 2, 24, 8)]
    return [Workload("19M, K=2, P=64 R=192", 4, 2, 64, 192), Workload("19M, K=3, P=64 R=192", 4, 3, 64, 192)]


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def step_figures(cfg, batch, profile: Profile, adapters: lora.LoraConfig | None) -> dict:
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = create_model(cfg, seed=0)
    if adapters is not None:
        lora.add_adapters(model, adapters, jax.random.key(0))
    tx = config_lib.optimizer(common.optimizer(1e-5, name="adamw")).build(100)
    graphdef, state, state_sh = train.init_train_state(model, tx, mesh, sharding.DEFAULT_DECODER_RULES)
    objective = train.pl_dpo_objective(losses.LossConfig(T=0.1, variant="pl", top_m=0), chunk_size=256)
    step = train.make_train_step(graphdef, objective, tx, state_sh, sharding.batch_sharding(mesh))
    batch = sharding.shard_batch(batch, mesh)
    frozen = () if state.frozen is None else (state.frozen,)
    memory = compiled_bytes(step.lower(state.params, state.opt_state, batch, *frozen).compile())
    holder = {"state": state}

    def run():
        s = holder["state"]
        params, opt_state, metrics = step(s.params, s.opt_state, batch, *frozen)
        jax.block_until_ready(metrics["loss"])
        holder["state"] = train.TrainState(params, opt_state, s.frozen)

    seconds = median_seconds(run, profile)
    s = holder["state"]
    return {
        "step_s": seconds,
        **memory,
        "trained_params": sum(x.size for x in jax.tree.leaves(s.params)),
        "train_state_bytes": nbytes(s.params) + nbytes(s.opt_state),
    }


def run(profile: Profile) -> list[dict]:
    rows = []
    for w in workloads(profile):
        cfg = model_config(profile, w)
        batch = next(iter(BatchIterator(ranked_arrays(w, cfg.vocab_size), batch_size=w.lists, batch_type=PackedBatch)))
        case = f"{w.name} ({cfg.num_params() / 1e6:.1f}M parameters)"
        full = step_figures(cfg, batch, profile, None)
        rows.append(row("lora_step", case, "full step", **full))
        adapted = step_figures(cfg, batch, profile, ADAPTERS)
        rows.append(row("lora_step", case, f"LoRA r={RANK}", baseline="full step", **adapted))
    return rows
