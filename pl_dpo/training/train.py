"""What a training phase computes, all pure: objectives, optimizer, the jitted step.

The K responses of B prompts go through the policy in one forward pass, as
`[B*K, L]` or packed behind one copy of each prompt as `[B, P + K*R]`
(`pl_dpo.scoring.batch_logps`: chunked log-probs, never the full logits); the
loss comes from `pl_dpo.losses`. Reference log-probs arrive precomputed with the
batch, so no second copy of the weights is held while training.

The step is `(params, opt_state, batch) -> (params, opt_state, metrics)`, jitted
with explicit shardings and donated state. The loop that drives it is `pl_dpo.training.phase`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pl_dpo import losses, sharding
from pl_dpo.data import PackedBatch
from pl_dpo.models import Decoder, lora
from pl_dpo.scoring import batch_logps, response_logps, response_token_counts

Metrics = dict[str, jax.Array]
Objective = Callable[[Decoder, Any], tuple[jax.Array, Metrics]]


# ----------------------------------------------------------------------------- objectives


def pl_dpo_objective(loss: losses.LossConfig, chunk_size: int) -> Objective:
    """Plackett-Luce DPO (or a pairwise variant) over the K ranked responses of each prompt,
    plus `loss.sft_weight` times the token-mean NLL of the rank-1 responses when it is > 0."""
    T, variant, top_m, sft_weight = float(loss.T), loss.variant, loss.top_m, float(loss.sft_weight)

    def objective(model: Decoder, batch) -> tuple[jax.Array, Metrics]:
        policy_BxK = batch_logps(model, batch, chunk_size)
        pref_loss, metrics = losses.pl_dpo_loss(
            policy_BxK, batch.ref_logps_BxK, T, batch.valid_BxK, variant, top_m, batch.labels_BxK
        )
        if not sft_weight:
            return pref_loss, metrics
        # The anchor: token-mean NLL of the rank-1 responses (as the SFT objective computes it).
        num_tokens = jnp.maximum(response_token_counts(batch)[:, 0].sum(), 1)
        sft_nll = -jnp.sum(jnp.where(batch.valid_BxK[:, 0], policy_BxK[:, 0], 0.0)) / num_tokens
        total = pref_loss + sft_weight * sft_nll
        return total, dict(metrics, loss=total, preference_loss=pref_loss, sft_nll=sft_nll)

    return objective


def sft_objective(chunk_size: int) -> Objective:
    """Token-mean NLL of the first (dataset) response of each list."""

    def objective(model: Decoder, batch) -> tuple[jax.Array, Metrics]:
        if isinstance(batch, PackedBatch):  # SFT sets hold one response per list (K=1)
            logps_B = batch_logps(model, batch, chunk_size)[:, 0]
        else:  # only the first row of each list goes through the model
            first = lambda x: x[:, 0]
            fields = (batch.tokens_BxKxL, batch.loss_mask_BxKxL, batch.attn_valid_BxKxL, batch.positions_BxKxL)
            logps_B = response_logps(model, *map(first, fields), chunk_size=chunk_size)
        num_tokens = jnp.maximum(response_token_counts(batch)[:, 0].sum(), 1)
        loss = -logps_B.sum() / num_tokens
        return loss, {"loss": loss, "answer_logp": logps_B.mean()}

    return objective


# ----------------------------------------------------------------------------- optimizer


DECAYS = ("constant", "linear", "cosine")  # after warmup


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW or RMSprop with linear warmup, then `decay` to `lr * final_lr_fraction`, global-norm
    clipping (0: off) and gradient accumulation over `grad_accum_steps` micro-batches."""

    # No defaults here: configs/common.py:optimizer() is their one home (config_lib.optimizer builds this).
    lr: float
    name: str  # "adamw" | "rmsprop"
    warmup_steps: int
    decay: str  # "constant" | "linear" | "cosine"
    final_lr_fraction: float
    b1: float
    b2: float
    eps: float
    weight_decay: float
    clip_norm: float  # 0: no clipping
    grad_accum_steps: int
    rms_decay: float

    def __post_init__(self):
        # Every field checked before anything compiles: a negative lr trains uphill and exits 0.
        checks = [
            ("name", self.name in ("adamw", "rmsprop"), "choose 'adamw' or 'rmsprop'"),
            ("lr", self.lr > 0, "must be > 0"),
            ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
            ("decay", self.decay in DECAYS, f"choose one of {list(DECAYS)}"),
            ("final_lr_fraction", 0 <= self.final_lr_fraction <= 1, "must be in [0, 1]"),
            ("b1", 0 <= self.b1 < 1, "must be in [0, 1)"),
            ("b2", 0 <= self.b2 < 1, "must be in [0, 1)"),
            ("eps", self.eps > 0, "must be > 0"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("clip_norm", self.clip_norm >= 0, "must be >= 0 (0: no clipping)"),
            ("grad_accum_steps", int(self.grad_accum_steps) == self.grad_accum_steps >= 1, "must be an integer >= 1"),
            ("rms_decay", 0 <= self.rms_decay < 1, "must be in [0, 1)"),
        ]
        for field, ok, rule in checks:
            if not ok:
                raise ValueError(f"{field}={getattr(self, field)!r} {rule}")

    def schedule(self, total_steps: int) -> optax.Schedule:
        """The learning rate against the optimizer update (`total_steps` updates in all)."""
        warmup = min(int(self.warmup_steps), max(total_steps - 1, 0))
        final = self.lr * self.final_lr_fraction
        decay_steps = max(total_steps - warmup, 1)
        decays = {
            "constant": lambda: optax.constant_schedule(self.lr),
            "linear": lambda: optax.linear_schedule(self.lr, final, decay_steps),
            "cosine": lambda: optax.cosine_decay_schedule(self.lr, decay_steps, alpha=final / self.lr),
        }
        if warmup == 0:
            return decays[self.decay]()
        return optax.join_schedules([optax.linear_schedule(0.0, self.lr, warmup), decays[self.decay]()], [warmup])

    def build(self, total_steps: int) -> optax.GradientTransformation:
        """The optax transformation; `total_steps` counts optimizer updates (after accumulation)."""
        schedule = self.schedule(total_steps)
        if self.name == "adamw":
            opt = optax.adamw(schedule, b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay)
        else:
            opt = optax.rmsprop(schedule, decay=self.rms_decay, eps=self.eps)
        chain = []
        if self.clip_norm:
            chain.append(optax.clip_by_global_norm(self.clip_norm))
        tx = optax.chain(*chain, opt)
        if self.grad_accum_steps > 1:
            tx = optax.MultiSteps(tx, every_k_schedule=self.grad_accum_steps)
        return tx


# ----------------------------------------------------------------------------- the step


def global_norm(tree: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


@dataclasses.dataclass
class TrainState:
    """What a phase trains: parameters and optimizer state (device pytrees). With LoRA (`pl_dpo.models.lora`)
    `params` are the adapters only and `frozen` holds the rest of the model, an input of every step that is never
    differentiated, updated or checkpointed with the train state (it is the phase's start policy, saved already)."""

    params: Any
    opt_state: Any
    frozen: Any = None


def trainable(model: Decoder) -> type[nnx.Variable]:
    """What a phase differentiates: the adapters when the model has them, else every parameter."""
    return nnx.LoRAParam if lora.has_adapters(model) else nnx.Param


def init_train_state(
    model: Decoder, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh, rules: sharding.Rules
) -> tuple[nnx.GraphDef, TrainState, Any]:
    """Split the model into what trains and what stays frozen, create the optimizer state sharded like the
    trained parameters; the frozen part (LoRA's base weights) is placed by the same rules.

    Returns (graphdef, state, state_shardings)."""
    if lora.has_adapters(model):
        graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, ...)
        frozen_sh = sharding.logical_to_shardings(frozen, mesh, rules)
        frozen = jax.device_put(frozen, frozen_sh)  # no copy when the start policy is placed by the rules already
    else:
        (graphdef, params), frozen, frozen_sh = nnx.split(model), None, None
    param_sh = sharding.logical_to_shardings(params, mesh, rules)
    params = jax.device_put(params, param_sh)
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_sh = sharding.logical_to_shardings(abstract_opt, mesh, rules, rank_mismatch="replicate")
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    return graphdef, TrainState(params, opt_state, frozen), TrainState(param_sh, opt_sh, frozen_sh)


def make_train_step(
    graphdef: nnx.GraphDef,
    objective: Objective,
    tx: optax.GradientTransformation,
    state_shardings: TrainState,
    batch_sharding: Any,
):
    """The jitted pure step `(params, opt_state, batch[, frozen]) -> (params, opt_state, metrics)`; `frozen`
    (LoRA's base weights) is an argument when `state_shardings.frozen` is set, and is not donated."""

    def step(params, opt_state, batch, *frozen):
        def loss_fn(p):
            return objective(nnx.merge(graphdef, p, *frozen), batch)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=global_norm(grads))
        return params, opt_state, metrics

    frozen_sh = () if state_shardings.frozen is None else (state_shardings.frozen,)
    return jax.jit(
        step,
        in_shardings=(state_shardings.params, state_shardings.opt_state, batch_sharding, *frozen_sh),
        out_shardings=(state_shardings.params, state_shardings.opt_state, None),
        donate_argnums=(0, 1),
    )
