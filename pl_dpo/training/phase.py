"""One resumable training phase: SFT of πθ(0) or of an assistant, or one self-play round.

A phase owns a folder: its mid-phase train state (Orbax, every `save_every_steps`
and on preemption) lives in `<dir>/train`. Started again on the same folder, it
restores params, optimizer state and the data position and continues with exactly
the batches an uninterrupted run would have seen, so it ends bit-identical.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from pl_dpo import sharding
from pl_dpo.data import BatchIterator, PackedBatch, RankedBatch, RankedSet
from pl_dpo.models import Decoder
from pl_dpo.models import lora as lora_lib
from pl_dpo.training import checkpoint, train
from pl_dpo.training.preemption import Preempted
from pl_dpo.workdir import layout as wd
from pl_dpo.workdir.metric_log import MetricLog

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the message names the step, batch and last checkpoint."""


@dataclasses.dataclass(frozen=True)
class PhaseSpec:
    name: str  # label in metrics.jsonl / TensorBoard, e.g. "sft" or "spin/round_1"
    directory: str
    num_epochs: int
    batch_size: int
    seed: int
    optim: train.OptimizerConfig
    save_every_steps: int
    # The batch layout: RankedBatch, or PackedBatch (the K responses behind one copy of the prompt,
    # `pl_dpo.data.packing`; length_buckets are scaled to packed rows).
    batch_type: type[RankedBatch] | type[PackedBatch]
    # Early stopping: every `eval_every` steps (0: never) train_phase's `heldout_score(model)` is read
    # (higher is better); after `patience` readings in a row without a new best the phase stops.
    eval_every: int
    patience: int
    # Steps beyond which a test or a budget stops the phase; None: all epochs.
    max_steps: int | None = None
    # Sequence-length buckets of the batches (one compile each); None: powers of two up to L.
    length_buckets: tuple[int, ...] | None = None
    # What the progress bar says; None: `name`. Rounds count from 1 on screen, as in the results table
    # ("spin round 1" trains πθ(0) into πθ(1)), and from 0 in files and metric names ("spin/round_0").
    label: str | None = None
    # LoRA: train fresh adapters on the frozen start policy instead of every weight (`pl_dpo.models.lora`).
    lora: lora_lib.LoraConfig | None = None


def epochs_for_steps(steps: int, num_examples: int, batch_size: int) -> int:
    """Epochs that hold `steps` full batches (an epoch drops its last partial batch)."""
    per_epoch = num_examples // batch_size
    if per_epoch < 1:
        raise ValueError(f"batch_size={batch_size} exceeds the {num_examples} examples: no full batch")
    return -(-steps // per_epoch)


def model_tokens(batch: RankedBatch | PackedBatch) -> int:
    """Real tokens the model runs on in a batch (a packed list counts its prompt once)."""
    if isinstance(batch, PackedBatch):
        return int(np.sum(np.asarray(batch.segment_ids_BxT) >= 0))
    return int(np.asarray(batch.attn_valid_BxKxL).sum())


def to_host_metrics(metrics: train.Metrics) -> dict[str, Any]:
    """Scalars to floats, vectors to lists (the JSONL / TensorBoard form)."""
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v)
        out[k] = float(v) if v.ndim == 0 else [float(x) for x in v.reshape(-1)]
    return out


def train_phase(
    model: Decoder,
    ranked: RankedSet,
    objective: train.Objective,
    spec: PhaseSpec,
    *,
    mesh: jax.sharding.Mesh,
    rules: sharding.Rules,
    metric_log: MetricLog,
    heldout_score: Callable[[Decoder], float] | None = None,
) -> Decoder:
    """Trains `model` on the ranked set (K=1 for SFT) for `spec.num_epochs` epochs and returns the trained model.

    The step donates its state, so `model`'s buffers are consumed: the caller must
    not use `model` afterwards (no second copy of the weights is ever held). With `spec.lora` the model
    gets fresh adapters (or keeps those it has, e.g. from a PEFT folder) and only they train, on int8 frozen
    kernels with `spec.lora.frozen_int8`: the model is returned with its adapters, unmerged (`SelfPlay._merged`
    makes the phase's policy of them). With
    `heldout_score` and `spec.eval_every`, the phase stops early (the model of the stopping
    step is returned: `patience` readings after the best one)."""
    # ------------------------------------------------------------------ setup
    batches = BatchIterator(
        ranked,
        batch_size=spec.batch_size,
        batch_type=spec.batch_type,
        seed=spec.seed,
        shuffle=True,
        drop_remainder=True,
        num_epochs=spec.num_epochs,
        length_buckets=spec.length_buckets,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    num_steps = batches.steps_per_epoch * spec.num_epochs
    if spec.max_steps is not None:
        if spec.max_steps > num_steps:
            log.warning(
                "%s: max_steps=%d, but %d epochs of %d full batches give %d steps: %d will run",
                spec.name,
                spec.max_steps,
                spec.num_epochs,
                batches.steps_per_epoch,
                num_steps,
                num_steps,
            )
        num_steps = min(num_steps, spec.max_steps)
    tx = spec.optim.build(num_steps // max(spec.optim.grad_accum_steps, 1))
    if spec.lora is not None and not lora_lib.has_adapters(model):
        lora_lib.add_adapters(model, spec.lora, jax.random.key(spec.seed), sharding.placement(mesh, rules))
    if spec.lora is not None and spec.lora.frozen_int8:
        lora_lib.quantize_frozen(model)
    graphdef, state, state_sh = train.init_train_state(model, tx, mesh, rules)
    train_step = train.make_train_step(graphdef, objective, tx, state_sh, sharding.batch_sharding(mesh))
    frozen = () if state.frozen is None else (state.frozen,)
    model_of = lambda state: nnx.merge(graphdef, state.params, *frozen)  # noqa: E731
    ckpts = checkpoint.TrainCheckpoints(wd.train_state_dir(spec.directory), spec.save_every_steps)
    ckpts.install_sigterm_handler()

    # ------------------------------------------------------------------ restore
    start_step = 0
    early_stopping = bool(heldout_score is not None and spec.eval_every)
    early = {"best": None, "best_step": None, "bad_readings": 0, "stopped": False}
    restored = ckpts.restore_latest(
        sharding.with_shardings(state.params, state_sh.params),
        sharding.with_shardings(state.opt_state, state_sh.opt_state),
    )
    if restored is not None:
        start_step, params, opt_state, extra = restored
        state = dataclasses.replace(state, params=params, opt_state=opt_state)
        batches.restore(extra["data"])
        early.update(extra.get("early_stop", {}))
        # Steps after the checkpoint are trained (and logged) again: one record per step. The
        # early-stopping reading at the checkpoint's own step is part of the restored state.
        metric_log.drop({spec.name: start_step, f"{spec.name}/early_stopping": start_step + 1})
        log.info("%s: resumed at step %d of %d", spec.name, start_step, num_steps)

    # ------------------------------------------------------------------ metrics
    # Steps dispatched but whose metrics are not read yet: (step, device metrics, example ids, real tokens).
    pending: list[tuple[int, train.Metrics, np.ndarray, int]] = []
    clock = time.perf_counter()

    def read_metrics() -> None:
        """Reads every pending step's metrics (a host sync) and logs them; stops on a non-finite loss."""
        nonlocal clock
        while pending:
            step, metrics, example_ids, num_tokens = pending.pop(0)
            host = to_host_metrics(metrics)
            if not math.isfinite(host["loss"]):
                latest = ckpts.latest_step()
                raise NonFiniteLossError(
                    f"non-finite loss {host['loss']} at step {step} (batch example ids {example_ids.tolist()}); "
                    f"last good checkpoint: {'none' if latest is None else f'{ckpts.directory}/{latest}'}"
                )
            now = time.perf_counter()
            # Real (non-padding) tokens of the global batch per second of wall time.
            host["tokens_per_s"] = num_tokens / max(now - clock, 1e-9)
            clock = now
            metric_log.write(spec.name, step, host)

    def should_stop_early(step: int) -> bool:
        """Reads `heldout_score` at `step`; True once `patience` readings in a row brought no new best."""
        value = float(heldout_score(model_of(state)))
        if early["best"] is None or value > early["best"]:
            early.update(best=value, best_step=step, bad_readings=0)
        else:
            early["bad_readings"] += 1
        early["stopped"] = early["bad_readings"] >= spec.patience
        metric_log.write(f"{spec.name}/early_stopping", step, {"value": value, **early})
        if early["stopped"]:
            log.info(
                "%s: early stop at step %d (best %.4f at step %d)", spec.name, step, early["best"], early["best_step"]
            )
        return early["stopped"]

    # ------------------------------------------------------------------ the loop
    done = start_step
    end_step = start_step if early["stopped"] else num_steps
    try:
        with tqdm(
            total=num_steps,
            initial=start_step,
            desc=spec.label or spec.name,
            unit="step",
            leave=False,
            disable=jax.process_index() != 0,
        ) as bar:
            for step in range(start_step, end_step):
                host_batch = next(batches)
                # Under the mesh: Pallas kernels (splash attention) are traced inside shard_map over it.
                with jax.set_mesh(mesh):
                    params, opt_state, metrics = train_step(
                        state.params, state.opt_state, sharding.shard_batch(host_batch, mesh), *frozen
                    )
                state = dataclasses.replace(state, params=params, opt_state=opt_state)
                # The previous step's metrics are read only now, with this step already queued.
                read_metrics()
                num_tokens = model_tokens(host_batch) * jax.process_count()
                pending.append((step, metrics, np.asarray(host_batch.example_ids_B), num_tokens))
                bar.update(1)
                done = step + 1
                stop = early_stopping and done % spec.eval_every == 0 and should_stop_early(done)
                last = done == num_steps or stop
                if ckpts.should_save(done, force=last):  # on the interval, at the end, or preempted
                    read_metrics()  # a non-finite loss stops here, before anything is saved
                    extra = {"data": batches.state(), **({"early_stop": dict(early)} if early_stopping else {})}
                    ckpts.maybe_save(done, state.params, state.opt_state, extra, force=last)
                if ckpts.preemption.should_exit or stop:
                    break
            read_metrics()
    finally:
        ckpts.close()  # waits for an async save in flight, also when a NaN stopped the phase
    if ckpts.preemption.should_exit and done < num_steps and not early["stopped"]:
        raise Preempted(
            f"{spec.name}: SIGTERM, state saved at step {done} in {ckpts.directory}; "
            "run the same command again to resume"
        )
    return model_of(state)
