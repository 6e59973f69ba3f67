"""Shared-prompt packing (`pl_dpo.data.packing`) against the plain layout: the same log-probs, loss and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common
from pl_dpo import config_lib, losses, scoring, sharding
from pl_dpo.data import BatchIterator, PackedBatch, RankedBatch, assemble_ranked
from pl_dpo.data.packing import gather_packed, packed_buckets, packed_lengths, scored_slots
from pl_dpo.models import create_model, preset_config
from pl_dpo.training import train

VOCAB = 96


def ranked_lists(n=6, K=3, seed=0, missing=True):
    """Prompts of 2..9 tokens, responses of 1..7, and (with `missing`) some lists shorter than K."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, VOCAB, rng.integers(2, 10)).tolist() for _ in range(n)]
    lists = []
    for i in range(n):
        k = K - (i % K) if missing else K  # K, K-1, ..., 1 responses
        lists.append([rng.integers(3, VOCAB, rng.integers(1, 8)).tolist() for _ in range(k)])
    arrays = assemble_ranked(prompts, lists, pad_id=0, k=K)
    ref = np.where(arrays.valid_NxK, rng.normal(-20, 3, (n, K)), 0).astype(np.float32)
    return prompts, lists, arrays.replace(ref_logps_NxK=ref)


def both_layouts(arrays, batch_size=None) -> tuple[RankedBatch, PackedBatch]:
    n = arrays.tokens_NxKxL.shape[0]
    kw = dict(batch_size=batch_size or n, shuffle=False, num_epochs=1)
    plain = next(iter(BatchIterator(arrays, batch_type=RankedBatch, **kw)))
    return plain, next(iter(BatchIterator(arrays, batch_type=PackedBatch, **kw)))


MODELS = {
    "llama": lambda: preset_config("tiny-llama", vocab_size=VOCAB),
    "mistral_sliding_window": lambda: preset_config("tiny-mistral", vocab_size=VOCAB, sliding_window=5),
    "qwen2": lambda: preset_config("tiny-qwen2", vocab_size=VOCAB),
}


def test_layout_of_one_list():
    """Prompt once, then the responses back to back; each response token scored from the slot before it,
    the first one from the prompt's last slot; positions restart after the prompt."""
    arrays = assemble_ranked([[5, 6, 7]], [[[10, 11], [20], [30, 31, 32]]], pad_id=0, k=3)
    prompt_N, scored_N = packed_lengths(arrays)
    assert prompt_N.tolist() == [3] and scored_N.tolist() == [6]
    b = gather_packed(arrays, np.array([0]), np.array([False]), seq_len=10, num_scored=7)
    assert b.tokens_BxT.tolist() == [[5, 6, 7, 10, 11, 20, 30, 31, 32, 0]]
    assert b.segment_ids_BxT.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3, 3, -1]]
    assert b.positions_BxT.tolist() == [[0, 1, 2, 3, 4, 3, 3, 4, 5, 0]]
    assert b.source_BxM.tolist() == [[2, 3, 2, 2, 6, 7, 0]]
    assert b.targets_BxM.tolist() == [[10, 11, 20, 30, 31, 32, 0]]
    assert b.response_BxM.tolist() == [[0, 0, 1, 2, 2, 2, -1]]
    pad = gather_packed(arrays, np.array([0]), np.array([True]), seq_len=10, num_scored=7)
    assert (pad.response_BxM == -1).all() and not pad.valid_BxK.any() and pad.example_ids_B.tolist() == [-1]
    with pytest.raises(ValueError, match="needs more than T=8"):
        gather_packed(arrays, np.array([0]), np.array([False]), seq_len=8, num_scored=7)


def test_packed_buckets_and_global_shapes():
    # The plain layout's buckets, scaled to packed rows: as many compiles.
    assert packed_buckets((16, 32, 64), plain_max=64, packed_max=100) == (32, 56, 100)
    assert packed_buckets((56,), plain_max=56, packed_max=88) == (88,)
    assert scored_slots(56, arrays_min_prompt=3, max_scored=40) == 40
    assert scored_slots(32, arrays_min_prompt=3, max_scored=40) == 29
    _, _, arrays = ranked_lists(n=8)
    # Both processes of a 2-process run cut the same T and M: they come from the global batch.
    shapes = []
    for p in range(2):
        it = BatchIterator(
            arrays, batch_size=8, batch_type=PackedBatch, shuffle=False, process_index=p, process_count=2
        )
        b = next(iter(it))
        shapes.append((b.tokens_BxT.shape, b.source_BxM.shape))
    assert shapes[0] == shapes[1] and shapes[0][0][0] == 4


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_packed_logps_loss_and_grads_match_plain(kind):
    _, _, arrays = ranked_lists(seed=sorted(MODELS).index(kind))
    plain, packed = both_layouts(arrays)
    assert packed.tokens_BxT.shape[1] < plain.tokens_BxKxL.shape[1] * plain.tokens_BxKxL.shape[2]
    model = create_model(MODELS[kind](), seed=1)
    graphdef, params = nnx.split(model)
    objective = train.pl_dpo_objective(losses.LossConfig(T=0.5, variant="pl", top_m=0, sft_weight=0.3), chunk_size=4)

    def loss_and_logps(p, batch):
        m = nnx.merge(graphdef, p)
        loss, _ = objective(m, batch)
        return loss, scoring.batch_logps(m, batch, chunk_size=4)

    value_and_grad = jax.jit(jax.value_and_grad(loss_and_logps, has_aux=True))
    (loss_a, logps_a), grads_a = value_and_grad(params, plain)
    (loss_b, logps_b), grads_b = value_and_grad(params, packed)
    valid = plain.valid_BxK
    assert (~valid).any(), "the test needs lists shorter than K"
    np.testing.assert_allclose(np.where(valid, logps_b, 0), np.where(valid, logps_a, 0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
    flat_a, flat_b = jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)
    for ga, gb in zip(flat_a, flat_b):
        np.testing.assert_allclose(gb, ga, rtol=1e-4, atol=1e-6)
    assert max(float(jnp.abs(g).max()) for g in flat_a) > 1e-3  # the gradients are not trivially zero


def test_response_token_counts_and_sft_objective_agree():
    _, _, arrays = ranked_lists(K=1, missing=False)
    plain, packed = both_layouts(arrays)
    np.testing.assert_array_equal(scoring.response_token_counts(packed), scoring.response_token_counts(plain))
    model = create_model(MODELS["llama"](), seed=2)
    objective = train.sft_objective(chunk_size=8)
    loss_a, metrics_a = objective(model, plain)
    loss_b, metrics_b = objective(model, packed)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
    np.testing.assert_allclose(metrics_b["answer_logp"], metrics_a["answer_logp"], rtol=1e-5)


def test_score_ranked_packed_matches_plain_with_padding_rows():
    _, _, arrays = ranked_lists(n=7)
    model = create_model(MODELS["qwen2"](), seed=3)
    plain = scoring.score_ranked(model, arrays, batch_size=4, batch_type=RankedBatch)  # 7 in 4s: a padding row
    packed = scoring.score_ranked(model, arrays, batch_size=4, batch_type=PackedBatch)
    np.testing.assert_allclose(packed, plain, rtol=1e-5, atol=1e-4)
    assert (packed[~arrays.valid_NxK] == 0).all()


@pytest.mark.slow  # sharded equality stays in the fast tier: test_train.test_sharded_step_matches_single_device
def test_sharded_packed_step_matches_plain_on_8_devices():
    """On a 2x2x2 mesh (batch over data x fsdp, weights over fsdp x tensor), from the same state: packed and
    plain batches give the same gradients, and the jitted training step the same loss and gradient norm."""
    _, _, arrays = ranked_lists(n=8, seed=4)
    mesh = sharding.make_mesh(2, 2, 2)
    tx = config_lib.optimizer(common.optimizer(1e-2, name="adamw")).build(10)
    objective = train.pl_dpo_objective(losses.LossConfig(T=0.5, variant="pl", top_m=0), chunk_size=8)
    results = []
    for batch in both_layouts(arrays):
        model = create_model(MODELS["mistral_sliding_window"](), seed=5)
        graphdef, state, state_sh = train.init_train_state(model, tx, mesh, sharding.DEFAULT_DECODER_RULES)
        global_batch = sharding.shard_batch(batch, mesh)
        grads = jax.jit(jax.grad(lambda p, b: objective(nnx.merge(graphdef, p), b)[0]))(state.params, global_batch)
        assert len(jax.tree.leaves(grads)[0].sharding.device_set) == 8
        step = train.make_train_step(graphdef, objective, tx, state_sh, sharding.batch_sharding(mesh))
        _, _, metrics = step(state.params, state.opt_state, global_batch)
        results.append((jax.tree.map(np.asarray, grads), {k: float(metrics[k]) for k in ("loss", "grad_norm")}))
    (grads_a, metrics_a), (grads_b, metrics_b) = results
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(metrics_b[key], metrics_a[key], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention needs a GPU")
@pytest.mark.parametrize("layout", ["plain", "packed"])
def test_cudnn_attention_matches_einsum_on_gpu(layout):
    """The cuDNN path (bf16, a general boolean mask as bias) against the einsum path, in both layouts."""
    _, _, arrays = ranked_lists(n=8, seed=6)
    batch = dict(zip(("plain", "packed"), both_layouts(arrays)))[layout]
    logps = {}
    for impl in ("einsum", "cudnn"):
        cfg = preset_config("tiny-llama", vocab_size=VOCAB, compute_dtype="bfloat16", attention_impl=impl)
        logps[impl] = np.asarray(scoring.batch_logps(create_model(cfg, seed=7), batch, chunk_size=8))
    valid = np.asarray(batch.valid_BxK)
    np.testing.assert_allclose(np.where(valid, logps["cudnn"], 0), np.where(valid, logps["einsum"], 0), rtol=2e-2)
