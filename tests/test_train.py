"""The jitted PL-DPO / SFT step: sharded vs single device, NaN guard, optimizer."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.common import optimizer
from pl_dpo import config_lib, losses, scoring, sharding
from pl_dpo.data import BatchIterator, RankedBatch, assemble_ranked
from pl_dpo.models import create_model, lora, preset_config
from pl_dpo.training import phase, train
from pl_dpo.workdir.metric_log import MetricLog

OPTIM = config_lib.optimizer(optimizer(1e-3, warmup=2, decay="cosine", weight_decay=0.01))
LOSS = losses.LossConfig(T=0.5, variant="pl", top_m=0)


def ranked_arrays(n=16, K=3, vocab=64, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, rng.integers(3, 8)).tolist() for _ in range(n)]
    lists = [
        [rng.integers(3, vocab, rng.integers(1, 6)).tolist() for _ in range(rng.integers(2, K + 1))] for _ in range(n)
    ]
    ref = (rng.normal(size=(n, K)) * 3 - 20).astype(np.float32)
    return assemble_ranked(prompts, lists, pad_id=0, k=K, seq_len=16, ref_logps=ref)


def tiny_model(seed=0):
    return create_model(
        preset_config(
            "tiny-llama",
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
        ),
        seed=seed,
    )


def train_tiny_phase(directory, arrays, objective, heldout_score=None, **spec_fields):
    """`phase.train_phase` of a fresh tiny model on one device: batches of 8 at length 16 in plain rows, OPTIM,
    no early stopping unless `spec_fields` ask for it, metrics to `<directory>/logs`; `spec_fields` give the rest
    of the PhaseSpec."""
    spec_fields = {"eval_every": 0, "patience": 1, **spec_fields}
    spec = phase.PhaseSpec(
        directory=str(directory),
        batch_size=8,
        seed=0,
        optim=OPTIM,
        length_buckets=(16,),
        batch_type=RankedBatch,
        **spec_fields,
    )
    return phase.train_phase(
        tiny_model(),
        arrays,
        objective,
        spec,
        mesh=sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]),
        rules=sharding.DEFAULT_DECODER_RULES,
        metric_log=MetricLog(os.path.join(directory, "logs")),
        heldout_score=heldout_score,
    )


def run_steps(mesh, arrays, steps=3, adapters: lora.LoraConfig | None = None):
    model = tiny_model()
    if adapters is not None:
        lora.add_adapters(model, adapters, jax.random.key(0))
    tx = OPTIM.build(steps)
    graphdef, state, state_sh = train.init_train_state(model, tx, mesh, sharding.DEFAULT_DECODER_RULES)
    step_fn = train.make_train_step(
        graphdef, train.pl_dpo_objective(LOSS, chunk_size=8), tx, state_sh, sharding.batch_sharding(mesh)
    )
    it = BatchIterator(arrays, batch_size=8, batch_type=RankedBatch, seed=0, length_buckets=(16,))
    losses_ = []
    for _ in range(steps):
        batch = sharding.shard_batch(next(it), mesh)
        params, opt_state, metrics = step_fn(state.params, state.opt_state, batch, *[state.frozen] * bool(adapters))
        state = train.TrainState(params, opt_state, state.frozen)
        losses_.append(float(metrics["loss"]))
    return losses_, jax.tree.map(np.asarray, state.params)


@pytest.mark.parametrize(
    "adapters", [None, lora.LoraConfig(rank=4, alpha=8.0, rslora=False, targets="_proj$")], ids=["full", "lora"]
)
def test_sharded_step_matches_single_device(adapters):
    """8 simulated devices on a 2x2x2 mesh vs 1 device: same losses and parameters (with LoRA: adapters)
    after 3 AdamW steps (tolerance 1e-5: only the reduction order differs)."""
    arrays = ranked_arrays()
    mesh8 = sharding.make_mesh(2, 2, 2)
    mesh1 = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    losses8, params8 = run_steps(mesh8, arrays, adapters=adapters)
    losses1, params1 = run_steps(mesh1, arrays, adapters=adapters)
    assert losses8[-1] != losses8[0]  # the adapters do train
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(params8), jax.tree.leaves(params1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def separate_logps(model, batch):
    """Each response scored alone with the full logits: summed response log-probs [B, K]."""
    B, K, L = batch.tokens_BxKxL.shape
    policy = np.zeros((B, K), np.float32)
    for b in range(B):
        for k in range(K):
            tokens = batch.tokens_BxKxL[b, k][None]
            logits = model.logits(model(tokens, batch.positions_BxKxL[b, k][None], batch.attn_valid_BxKxL[b, k][None]))
            logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float64 if jax.config.x64_enabled else jnp.float32))
            tok_logp = np.take_along_axis(np.asarray(logp), tokens[0, 1:, None], -1)[:, 0]
            policy[b, k] = (tok_logp * batch.loss_mask_BxKxL[b, k, 1:]).sum()
    return policy


def test_objective_equals_loss_of_separately_computed_logps():
    """The [B*K, L] single forward equals scoring each response alone with the full logits."""
    arrays = ranked_arrays(n=4)
    model = tiny_model()
    batch = next(BatchIterator(arrays, batch_size=4, batch_type=RankedBatch, shuffle=False, length_buckets=(16,)))
    loss, _ = train.pl_dpo_objective(LOSS, chunk_size=4)(model, batch)
    policy = separate_logps(model, batch)
    want, _ = losses.pl_dpo_loss(jnp.asarray(policy), jnp.asarray(batch.ref_logps_BxK), LOSS.T, batch.valid_BxK)
    np.testing.assert_allclose(loss, want, rtol=1e-5)


@pytest.mark.parametrize("variant", ["pl", "lipo_lambda"])
def test_sft_anchor_adds_the_token_mean_nll_of_the_rank_one_responses(variant):
    arrays = ranked_arrays(n=4)
    arrays.valid_NxK[1, 0] = False  # a list without its rank-1 response adds nothing to the anchor
    arrays.loss_mask_NxKxL[1, 0] = False
    model = tiny_model()
    batch = next(BatchIterator(arrays, batch_size=4, batch_type=RankedBatch, shuffle=False, length_buckets=(16,)))
    anchored = dataclasses.replace(LOSS, variant=variant, sft_weight=0.3)
    loss, metrics = train.pl_dpo_objective(anchored, chunk_size=4)(model, batch)
    policy = separate_logps(model, batch)
    pref, _ = losses.pl_dpo_loss(
        jnp.asarray(policy), jnp.asarray(batch.ref_logps_BxK), LOSS.T, batch.valid_BxK, variant=variant
    )
    valid = np.asarray(batch.valid_BxK)[:, 0]
    nll = -policy[valid, 0].sum() / np.asarray(batch.loss_mask_BxKxL)[valid, 0].sum()
    np.testing.assert_allclose(metrics["sft_nll"], nll, rtol=1e-5)
    np.testing.assert_allclose(loss, pref + 0.3 * nll, rtol=1e-5)
    np.testing.assert_allclose(metrics["preference_loss"], pref, rtol=1e-5)


def test_first_step_scores_are_zero_when_reference_is_the_policy():
    """With ref log-probs computed by the policy itself, every score s_k = 0 at step 0."""
    arrays = ranked_arrays(n=8)
    model = tiny_model()
    arrays = arrays.replace(ref_logps_NxK=scoring.score_ranked(model, arrays, batch_size=4, batch_type=RankedBatch))
    batch = next(BatchIterator(arrays, batch_size=8, batch_type=RankedBatch, shuffle=False, length_buckets=(16,)))
    _, metrics = train.pl_dpo_objective(LOSS, chunk_size=8)(model, batch)
    np.testing.assert_allclose(metrics["scores_K"], 0.0, atol=1e-5)


def test_nan_loss_stops_phase_naming_step_batch_and_checkpoint(tmp_path):
    arrays = ranked_arrays(n=32)
    bad_example = 5

    def poisoned(model, batch):
        loss, metrics = train.pl_dpo_objective(LOSS, chunk_size=8)(model, batch)
        poison = jnp.where(jnp.any(batch.example_ids_B == bad_example), jnp.nan, 1.0)
        return loss * poison, metrics

    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with pytest.raises(phase.NonFiniteLossError) as err:
        train_tiny_phase(tmp_path, arrays, poisoned, name="nan-test", num_epochs=3, save_every_steps=2)
    message = str(err.value)
    assert "non-finite loss" in message and f"{bad_example}" in message
    step = int(message.split("at step ")[1].split()[0])
    # The batch of that step holds the poisoned example (order is a function of seed and epoch).
    it = BatchIterator(arrays, batch_size=8, batch_type=RankedBatch, seed=0, length_buckets=(16,))
    batches = [next(it) for _ in range(step + 1)]
    assert bad_example in batches[step].example_ids_B
    # The named checkpoint exists, holds no NaN, and is older than the bad step.
    from pl_dpo.training import checkpoint

    ckpt_dir = message.split("last good checkpoint: ")[1].strip()
    saved_step = int(os.path.basename(ckpt_dir)) if ckpt_dir != "none" else None
    if saved_step is not None:
        assert saved_step <= step
        ckpts = checkpoint.TrainCheckpoints(os.path.join(tmp_path, "train"), 2)
        model = tiny_model()
        tx = OPTIM.build(12)
        _, state, state_sh = train.init_train_state(model, tx, mesh, sharding.DEFAULT_DECODER_RULES)
        got = ckpts.restore_latest(
            sharding.with_shardings(state.params, state_sh.params),
            sharding.with_shardings(state.opt_state, state_sh.opt_state),
        )
        assert got[0] == saved_step
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(got[1]))


@pytest.mark.parametrize("decay", ["constant", "linear", "cosine"])
def test_schedule_warmup_and_decay(decay):
    cfg = dataclasses.replace(OPTIM, decay=decay, warmup_steps=4, lr=1.0)
    sched = cfg.schedule(total_steps=20)
    assert float(sched(0)) == 0.0 and abs(float(sched(4)) - 1.0) < 1e-6
    end = float(sched(20))
    assert (abs(end - 1.0) < 1e-6) if decay == "constant" else (abs(end - 0.1) < 1e-6)


def test_optimizer_errors_and_rmsprop_accumulation():
    with pytest.raises(ValueError, match="adamw' or 'rmsprop"):
        dataclasses.replace(OPTIM, name="sgd").build(10)
    with pytest.raises(ValueError, match="decay=.step. choose one of"):
        dataclasses.replace(OPTIM, decay="step").build(10)
    cfg = dataclasses.replace(OPTIM, name="rmsprop", grad_accum_steps=2, rms_decay=0.9, warmup_steps=0)
    tx = cfg.build(10)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.ones(3)}, state, params)
    assert np.all(np.asarray(updates["w"]) == 0)  # first micro-step: accumulate only
    updates, state = tx.update({"w": jnp.ones(3)}, state, params)
    assert np.all(np.asarray(updates["w"]) != 0)


def test_early_stopping_stops_after_patience_readings_and_stays_stopped(tmp_path):
    arrays = ranked_arrays(n=32)
    readings = iter([1.0, 2.0, 1.5, 1.9, 5.0])  # best at step 4, then two worse: stop at step 8
    seen = []

    def evaluate(model):
        seen.append(model)
        return next(readings)

    objective = train.pl_dpo_objective(LOSS, chunk_size=8)
    spec_fields = dict(name="es", num_epochs=10, save_every_steps=3, eval_every=2, patience=2)
    run = lambda: train_tiny_phase(tmp_path, arrays, objective, evaluate, **spec_fields)
    first = jax.tree.map(np.asarray, nnx.state(run()))
    assert len(seen) == 4  # readings at steps 2, 4, 6, 8 (of 40)
    records = [json.loads(line) for line in open(tmp_path / "logs" / "metrics.jsonl")]
    assert max(r["step"] for r in records if r["phase"] == "es") == 7
    stops = [r for r in records if r["phase"] == "es/early_stopping"]
    assert [r["step"] for r in stops] == [2, 4, 6, 8]
    assert stops[-1]["best_step"] == 4 and stops[-1]["stopped"] and stops[-1]["best"] == 2.0
    # The stopping step was saved: a second run (a resume after a crash before the policy was
    # committed) trains nothing, reads nothing and returns the same parameters.
    assert os.path.isdir(tmp_path / "train" / "8")
    again = jax.tree.map(np.asarray, nnx.state(run()))
    assert len(seen) == 4
    jax.tree.map(np.testing.assert_array_equal, first, again)
