"""One phase of training (SFT or Plackett-Luce DPO): objectives, optimizer, jitted step, loop.

The K responses of B prompts go through the policy in one forward pass as
`[B*K, L]`; log-probs come from `pl_dpo.logprobs` (chunked, never the full
logits); the loss from `pl_dpo.losses`. Reference log-probs arrive precomputed
with the batch, so no second copy of the weights is held while training.

The step is pure: `(params, opt_state, batch) -> (params, opt_state, metrics)`,
jitted with explicit shardings and donated state. The loop dispatches step n+1
before it reads step n's metrics, so the host never stalls the device.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from pl_dpo import logprobs, losses, sharding
from pl_dpo.data import RankedBatch
from pl_dpo.models import Decoder

log = logging.getLogger(__name__)

Metrics = dict[str, jax.Array]
Objective = Callable[[Decoder, Any], tuple[jax.Array, Metrics]]


# RankedBatch is a plain frozen dataclass of numpy arrays; as a pytree it can be
# sharded and passed to jit as one argument.
try:
    jax.tree_util.register_dataclass(
        RankedBatch, data_fields=[f.name for f in dataclasses.fields(RankedBatch)], meta_fields=[]
    )
except ValueError:  # already registered
    pass


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the message names the step, batch and last checkpoint."""


# ----------------------------------------------------------------------------- objectives


def response_logps(
    model: Decoder,
    tokens_NxL,
    loss_mask_NxL,
    attn_valid_NxL,
    positions_NxL,
    chunk_size: int = logprobs.DEFAULT_CHUNK_SIZE,
) -> jax.Array:
    """Summed log-prob of the tokens under `loss_mask` (the responses), float32 [N]."""
    hidden_NxLxD = model(tokens_NxL, positions_NxL, attn_valid_NxL)
    targets_NxL, mask_NxL = logprobs.shift_for_next_token(tokens_NxL, loss_mask_NxL)
    return logprobs.sequence_logprobs(
        hidden_NxLxD, model.unembedding_DxV(), targets_NxL, mask_NxL, chunk_size=chunk_size
    )


def list_logps(
    model: Decoder,
    tokens_BxKxL,
    loss_mask_BxKxL,
    attn_valid_BxKxL,
    positions_BxKxL,
    chunk_size: int = logprobs.DEFAULT_CHUNK_SIZE,
) -> jax.Array:
    """Summed response log-probs [B, K] of ranked lists: one forward pass over [B*K, L]."""
    B, K, L = tokens_BxKxL.shape
    flat = lambda x: x.reshape(B * K, L)
    fields = (tokens_BxKxL, loss_mask_BxKxL, attn_valid_BxKxL, positions_BxKxL)
    return response_logps(model, *map(flat, fields), chunk_size=chunk_size).reshape(B, K)


def pl_dpo_objective(loss_cfg: ml_collections.ConfigDict, chunk_size: int) -> Objective:
    """Plackett-Luce DPO over the K ranked responses of each prompt."""
    T, variant, top_m = float(loss_cfg.T), loss_cfg.variant, loss_cfg.get("top_m")

    def objective(model: Decoder, batch) -> tuple[jax.Array, Metrics]:
        policy_BxK = list_logps(
            model,
            batch.tokens_BxKxL,
            batch.loss_mask_BxKxL,
            batch.attn_valid_BxKxL,
            batch.positions_BxKxL,
            chunk_size=chunk_size,
        )
        return losses.pl_dpo_loss(policy_BxK, batch.ref_logps_BxK, T, batch.valid_BxK, variant, top_m)

    return objective


def sft_objective(chunk_size: int) -> Objective:
    """Token-mean NLL of the first (dataset) response of each list."""

    def objective(model: Decoder, batch) -> tuple[jax.Array, Metrics]:
        first = lambda x: x[:, 0]
        tokens, loss_mask = first(batch.tokens_BxKxL), first(batch.loss_mask_BxKxL)
        logps_B = response_logps(
            model, tokens, loss_mask, first(batch.attn_valid_BxKxL), first(batch.positions_BxKxL), chunk_size=chunk_size
        )
        num_tokens = jnp.maximum(loss_mask.sum(), 1)
        loss = -logps_B.sum() / num_tokens
        return loss, {"loss": loss, "answer_logp": logps_B.mean()}

    return objective


# ----------------------------------------------------------------------------- optimizer


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup to `cfg.lr`, then `cfg.decay` in {"constant", "linear", "cosine"} to
    `cfg.lr * cfg.final_lr_fraction` at `total_steps`."""
    warmup = min(int(cfg.warmup_steps), max(total_steps - 1, 0))
    final = cfg.lr * cfg.get("final_lr_fraction", 0.0)
    decay_steps = max(total_steps - warmup, 1)
    decays = {
        "constant": lambda: optax.constant_schedule(cfg.lr),
        "linear": lambda: optax.linear_schedule(cfg.lr, final, decay_steps),
        "cosine": lambda: optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=final / cfg.lr),
    }
    if cfg.decay not in decays:
        raise ValueError(f"optim.decay={cfg.decay!r}: choose one of {sorted(decays)}")
    if warmup == 0:
        return decays[cfg.decay]()
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decays[cfg.decay]()], [warmup])


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """AdamW or RMSprop with warmup + decay, global-norm clipping and gradient accumulation.

    `total_steps` counts optimizer updates (after accumulation)."""
    schedule = learning_rate_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif cfg.name == "rmsprop":
        opt = optax.rmsprop(schedule, decay=cfg.get("rms_decay", 0.9), eps=cfg.eps)
    else:
        raise ValueError(f"optim.name={cfg.name!r}: choose 'adamw' or 'rmsprop'")
    chain = []
    if cfg.get("clip_norm"):
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    tx = optax.chain(*chain, opt)
    if cfg.get("grad_accum_steps", 1) > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
    return tx


# ----------------------------------------------------------------------------- the step


def global_norm(tree: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


@dataclasses.dataclass
class TrainState:
    """What a phase trains: parameters and optimizer state (device pytrees)."""

    params: Any
    opt_state: Any


def init_train_state(
    model: Decoder, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh, rules: sharding.Rules
) -> tuple[nnx.GraphDef, TrainState, Any]:
    """Split the model, create the optimizer state sharded like the parameters.

    Returns (graphdef, state, state_shardings)."""
    graphdef, params = nnx.split(model)
    param_sh = sharding.logical_to_shardings(params, mesh, rules)
    params = jax.device_put(params, param_sh)
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_sh = sharding.logical_to_shardings(abstract_opt, mesh, rules, rank_mismatch="replicate")
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    return graphdef, TrainState(params, opt_state), TrainState(param_sh, opt_sh)


def make_train_step(
    graphdef: nnx.GraphDef,
    objective: Objective,
    tx: optax.GradientTransformation,
    state_shardings: TrainState,
    batch_sharding: Any,
):
    """The jitted pure step `(params, opt_state, batch) -> (params, opt_state, metrics)`."""

    def step(params, opt_state, batch):
        def loss_fn(p):
            return objective(nnx.merge(graphdef, p), batch)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=global_norm(grads))
        return params, opt_state, metrics

    return jax.jit(
        step,
        in_shardings=(state_shardings.params, state_shardings.opt_state, batch_sharding),
        out_shardings=(state_shardings.params, state_shardings.opt_state, None),
        donate_argnums=(0, 1),
    )


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class PhaseResult:
    state: TrainState
    steps: int
    last_metrics: dict[str, Any]


def to_host_metrics(metrics: Metrics) -> dict[str, Any]:
    """Scalars to floats, vectors to lists (the JSONL / TensorBoard form)."""
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v)
        out[k] = float(v) if v.ndim == 0 else [float(x) for x in v.reshape(-1)]
    return out


def run_phase(
    *,
    train_step,
    state: TrainState,
    batches: Iterator[tuple[int, Any]],
    num_steps: int,
    start_step: int,
    mesh: jax.sharding.Mesh,
    on_step_done: Callable[[int, TrainState, Callable[[], dict]], None] | None = None,
    on_metrics: Callable[[int, dict[str, Any]], None] | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
    last_checkpoint: Callable[[], str] = lambda: "none",
    progress=None,
) -> PhaseResult:
    """Train from `start_step` up to `num_steps`.

    `batches` yields `(step, host_batch)` with the step the batch belongs to, so a
    resumed run sees exactly the batches an uninterrupted one would. Metrics of
    step n are read after step n+1 was dispatched (no per-step host sync); a
    non-finite loss raises `NonFiniteLossError` naming the step, the batch's
    example ids and the last good checkpoint.

    `on_step_done(steps_done, state, flush)` runs after each dispatched step; a
    checkpointer calls `flush()` (which reads the pending metrics and so raises on
    a NaN) before it saves, so no checkpoint ever holds a non-finite step.
    `stop_requested()` ends the phase early at a step boundary (SIGTERM).
    """
    pending: list[tuple[int, Metrics, np.ndarray, int]] = []
    last: dict[str, Any] = {}
    clock = [time.perf_counter()]

    def flush() -> dict[str, Any]:
        nonlocal last
        while pending:
            s, metrics, ids, num_tokens = pending.pop(0)
            host = to_host_metrics(metrics)
            if not math.isfinite(host["loss"]):
                raise NonFiniteLossError(
                    f"non-finite loss {host['loss']} at step {s} (batch example ids {ids.tolist()}); "
                    f"last good checkpoint: {last_checkpoint()}"
                )
            now = time.perf_counter()
            # Real (non-padding) tokens of the global batch per second of wall time.
            host["tokens_per_s"] = num_tokens / max(now - clock[0], 1e-9)
            clock[0] = now
            if on_metrics is not None:
                on_metrics(s, host)
            last = host
        return last

    step = start_step
    for batch_step, host_batch in batches:
        if step >= num_steps:
            break
        if batch_step != step:
            raise RuntimeError(f"batch iterator is at step {batch_step}, training at step {step}")
        batch = sharding.shard_batch(host_batch, mesh)
        params, opt_state, metrics = train_step(state.params, state.opt_state, batch)
        state = TrainState(params, opt_state)
        # The previous step's metrics are read only now, with this step already queued.
        flush()
        num_tokens = int(np.asarray(host_batch.attn_valid_BxKxL).sum()) * jax.process_count()
        pending.append((step, metrics, np.asarray(host_batch.example_ids_B), num_tokens))
        step += 1
        if progress is not None:
            progress.update(1)
        if on_step_done is not None:
            on_step_done(step, state, flush)
        if stop_requested():
            break
    flush()
    return PhaseResult(state=state, steps=step, last_metrics=last)
