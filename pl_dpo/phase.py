"""One resumable training phase: SFT of πθ(0) or of an assistant, or one self-play round.

A phase owns a folder: its mid-phase train state (Orbax, every `save_every_steps`
and on SIGTERM) lives in `<dir>/train`. Started again on the same folder, it
restores params, optimizer state and the data position and continues with exactly
the batches an uninterrupted run would have seen, so it ends bit-identical.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from pl_dpo import checkpoint, sharding, train
from pl_dpo.data import BatchIterator, RankedBatch
from pl_dpo.metric_log import MetricLog
from pl_dpo.models import Decoder

log = logging.getLogger(__name__)


class Preempted(SystemExit):
    """SIGTERM arrived; the phase saved its state and the run must stop (exit code 143)."""

    def __init__(self, message: str):
        super().__init__(143)
        self.message = message


@dataclasses.dataclass(frozen=True)
class PhaseSpec:
    name: str  # label in metrics.jsonl / TensorBoard, e.g. "sft" or "spin/round_1"
    directory: str
    num_epochs: int
    batch_size: int
    seed: int
    optim: ml_collections.ConfigDict
    save_every_steps: int
    # Steps beyond which a test or a budget stops the phase; None: all epochs.
    max_steps: int | None = None
    # Sequence-length buckets of the batches (one compile each); None: powers of two up to L.
    length_buckets: tuple[int, ...] | None = None


def _numbered_batches(it: BatchIterator, start_step: int) -> Iterator[tuple[int, RankedBatch]]:
    step = start_step
    for batch in it:
        yield step, batch
        step += 1


def train_phase(
    model: Decoder,
    arrays: dict[str, np.ndarray],
    objective: train.Objective,
    spec: PhaseSpec,
    *,
    mesh: jax.sharding.Mesh,
    rules: sharding.Rules,
    metric_log: MetricLog,
) -> Decoder:
    """Trains `model` on `arrays` for `spec.num_epochs` epochs and returns the trained model.

    The step donates its state, so `model`'s buffers are consumed: the caller must
    not use `model` afterwards (no second copy of the weights is ever held)."""
    it = BatchIterator(
        arrays,
        batch_size=spec.batch_size,
        seed=spec.seed,
        shuffle=True,
        drop_remainder=True,
        num_epochs=spec.num_epochs,
        length_buckets=spec.length_buckets,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    num_steps = it.steps_per_epoch * spec.num_epochs
    if spec.max_steps is not None:
        num_steps = min(num_steps, spec.max_steps)
    tx = train.make_optimizer(spec.optim, num_steps // max(spec.optim.get("grad_accum_steps", 1), 1))
    graphdef, state, state_sh = train.init_train_state(model, tx, mesh, rules)

    ckpts = checkpoint.TrainCheckpoints(os.path.join(spec.directory, "train"), spec.save_every_steps)
    ckpts.install_sigterm_handler()
    start_step = 0
    restored = ckpts.restore_latest(
        sharding.with_shardings(state.params, state_sh.params),
        sharding.with_shardings(state.opt_state, state_sh.opt_state),
    )
    if restored is not None:
        start_step, params, opt_state, extra = restored
        state = train.TrainState(params, opt_state)
        it.restore(extra["data"])
        log.info("%s: resumed at step %d of %d", spec.name, start_step, num_steps)

    step_fn = train.make_train_step(graphdef, objective, tx, state_sh, sharding.batch_sharding(mesh))

    def on_step_done(step: int, st: train.TrainState, flush) -> None:
        if ckpts.should_save(step, force=step == num_steps):
            flush()  # raises on a non-finite loss before anything is saved
        ckpts.maybe_save(step, st.params, st.opt_state, {"data": it.state()}, force=step == num_steps)

    def on_metrics(step: int, metrics: dict) -> None:
        metric_log.write(spec.name, step, metrics)

    def last_checkpoint() -> str:
        latest = ckpts.latest_step()
        return "none" if latest is None else f"{ckpts.directory}/{latest}"

    try:
        with tqdm(
            total=num_steps,
            initial=start_step,
            desc=spec.name,
            unit="step",
            leave=False,
            disable=jax.process_index() != 0,
        ) as bar:
            result = train.run_phase(
                train_step=step_fn,
                state=state,
                batches=_numbered_batches(it, start_step),
                num_steps=num_steps,
                start_step=start_step,
                mesh=mesh,
                on_step_done=on_step_done,
                on_metrics=on_metrics,
                stop_requested=lambda: ckpts.preemption.should_exit,
                last_checkpoint=last_checkpoint,
                progress=bar,
            )
    finally:
        ckpts.close()  # waits for an async save in flight, also when a NaN stopped the phase
    if ckpts.preemption.should_exit and result.steps < num_steps:
        raise Preempted(
            f"{spec.name}: SIGTERM, state saved at step {result.steps} in {ckpts.directory}; "
            "run the same command again to resume"
        )
    return nnx.merge(graphdef, result.state.params)
