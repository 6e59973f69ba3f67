"""Sampler: the sampled distribution (chi-square against the exact renormalised softmax), log-probs, EOS handling,
bucketing without recompiles, and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import special, stats

from pl_dpo import sampler
from pl_dpo.models import create_model, positions_from_valid, preset_config

VOCAB = 24


@pytest.fixture(scope="module")
def model():
    m = create_model(
        preset_config(
            "tiny-llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, head_dim=8, max_position_embeddings=64
        ),
        seed=0,
    )
    # Random init gives nearly uniform next-token distributions; sharpen them so temperature and top-p matter.
    m.final_norm.scale[...] = m.final_norm.scale[...] * 10.0
    return m


def _prompts(batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, VOCAB, (batch, 6)).astype(np.int32)
    valid = np.ones((batch, 6), bool)
    for b in range(batch):
        valid[b, : b % 4] = False
    return np.where(valid, tokens, 0), valid


def _next_token_logits(model, tokens, valid):
    h = model(jnp.asarray(tokens), positions_from_valid(jnp.asarray(valid)), jnp.asarray(valid))
    return np.asarray(model.logits(h)[:, -1], np.float64)


def _chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    order = np.argsort(expected)
    # Pool the rare bins so every pooled expected count is >= 5 (chi-square validity).
    pooled_obs, pooled_exp, acc_o, acc_e = [], [], 0.0, 0.0
    for i in order:
        acc_o += counts[i]
        acc_e += expected[i]
        if acc_e >= 5:
            pooled_obs.append(acc_o)
            pooled_exp.append(acc_e)
            acc_o = acc_e = 0.0
    pooled_obs[-1] += acc_o
    pooled_exp[-1] += acc_e
    return stats.chisquare(pooled_obs, pooled_exp).pvalue


def _renormalised(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p)
    above = np.cumsum(p[order]) - p[order]
    keep = np.zeros_like(p, bool)
    keep[order[above < top_p]] = True
    q = np.where(keep, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_p", [(0.7, 1.0), (1.0, 0.9)])
def test_first_token_distribution_matches_exact_softmax(model, temperature, top_p):
    n = 4096
    prompt = np.array([[0, 0, 5, 9, 11, 7]], np.int32)
    valid = prompt > 0
    logits = _next_token_logits(model, prompt, valid)[0]
    cfg = sampler.SamplingConfig(max_new_tokens=1, temperature=temperature, top_p=top_p, pad_id=0)
    out = sampler.generate(model, np.repeat(prompt, n, 0), np.repeat(valid, n, 0), 1234, cfg)
    counts = np.bincount(np.asarray(out.tokens_BxT[:, 0]), minlength=VOCAB).astype(np.float64)
    exact = _renormalised(logits, temperature, top_p)
    assert counts[exact == 0].sum() == 0  # nothing outside the nucleus
    assert _chi_square_pvalue(counts[exact > 0], exact[exact > 0]) > 1e-3
    # The test has power: the untempered (or untruncated) distribution is rejected.
    wrong = _renormalised(logits, temperature if top_p < 1 else 1.0, 1.0)
    assert _chi_square_pvalue(counts, wrong) < 1e-6
    # Sampling-distribution log-probs are those of the renormalised distribution.
    toks = np.asarray(out.tokens_BxT[:, 0])
    np.testing.assert_allclose(np.asarray(out.logprobs_BxT[:, 0]), np.log(exact[toks]), atol=1e-4)


def test_logprobs_match_teacher_forcing_and_top_k(model):
    tokens, valid = _prompts(5)
    cfg = sampler.SamplingConfig(max_new_tokens=7, temperature=0.8, top_k=3, pad_id=0)
    out = sampler.generate(model, tokens, valid, jax.random.key(3), cfg)
    new = np.asarray(out.tokens_BxT)
    assert np.asarray(out.valid_BxT).all() and (np.asarray(out.lengths_B) == 7).all()
    full = np.concatenate([tokens, new], 1)
    full_valid = np.concatenate([valid, np.ones_like(new, bool)], 1)
    logits = np.asarray(
        model.logits(model(jnp.asarray(full), positions_from_valid(jnp.asarray(full_valid)), jnp.asarray(full_valid))),
        np.float64,
    )[:, 5:-1]
    logp = special.log_softmax(logits, axis=-1)
    expected = np.take_along_axis(logp, new[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.model_logprobs_BxT), expected, atol=1e-4)
    rank = (logits > np.take_along_axis(logits, new[..., None], -1)).sum(-1)
    assert rank.max() < 3  # top-k=3: only the 3 most likely tokens are ever drawn
    kth = np.sort(logits, axis=-1)[..., -3:-2]
    tempered = special.log_softmax(np.where(logits >= kth, logits / 0.8, -np.inf), axis=-1)
    np.testing.assert_allclose(
        np.asarray(out.logprobs_BxT), np.take_along_axis(tempered, new[..., None], -1)[..., 0], atol=1e-4
    )


def test_eos_stops_rows_and_pads(model):
    tokens, valid = _prompts(6, seed=1)
    greedy = sampler.SamplingConfig(max_new_tokens=12, greedy=True, pad_id=0)
    ref = np.asarray(sampler.generate(model, tokens, valid, 0, greedy).tokens_BxT)
    eos = int(ref[0, 3])  # a token row 0 emits greedily at step 3
    out = sampler.generate(
        model, tokens, valid, 0, sampler.SamplingConfig(max_new_tokens=12, greedy=True, eos_ids=(eos, 999), pad_id=0)
    )
    toks, val, lengths = np.asarray(out.tokens_BxT), np.asarray(out.valid_BxT), np.asarray(out.lengths_B)
    for b in range(6):
        hits = np.flatnonzero(ref[b] == eos)
        n = hits[0] + 1 if hits.size else 12
        assert lengths[b] == n
        np.testing.assert_array_equal(toks[b, :n], ref[b, :n])
        assert (toks[b, n:] == 0).all() and val[b, :n].all() and not val[b, n:].any()
        assert (np.asarray(out.logprobs_BxT)[b, n:] == 0).all()
    assert lengths[0] == 4
    # Every token is a stop token: all rows stop after one token (and the loop exits early).
    stop_all = sampler.SamplingConfig(max_new_tokens=12, temperature=1.0, eos_ids=tuple(range(VOCAB)), pad_id=0)
    out = sampler.generate(model, tokens, valid, 0, stop_all)
    assert (np.asarray(out.lengths_B) == 1).all() and (np.asarray(out.tokens_BxT)[:, 1:] == 0).all()


def test_buckets_avoid_recompiling_and_keys_are_per_row(model):
    cfg = sampler.SamplingConfig(max_new_tokens=4, temperature=1.0, pad_id=0)
    sampler.generate(model, *_prompts(5), 0, cfg)
    before = sampler._generate_padded._cache_size()  # compiled programs so far
    tokens, valid = _prompts(7, seed=2)
    a = sampler.generate(model, tokens[:, 2:], valid[:, 2:] | True, 1, cfg)  # batch 7 -> 8, prompt 4 -> 16
    b = sampler.generate(model, *_prompts(6, seed=3), 1, cfg)
    assert sampler._generate_padded._cache_size() == before
    assert a.tokens_BxT.shape == (7, 4) and b.tokens_BxT.shape == (6, 4)
    keys = jax.random.split(jax.random.key(5), 6)
    t, v = _prompts(6, seed=3)
    one = sampler.generate(model, t, v, keys, cfg)
    two = sampler.generate(model, t, v, keys, cfg)
    other = sampler.generate(model, t, v, jax.random.split(jax.random.key(6), 6), cfg)
    np.testing.assert_array_equal(one.tokens_BxT, two.tokens_BxT)
    assert (np.asarray(one.tokens_BxT) != np.asarray(other.tokens_BxT)).any()
    assert sampler.bucket_shapes(65, 300, cfg) == (128, 512)
    assert sampler.bucket_shapes(3, 9000, cfg) == (4, 16384)


def test_bad_input_errors(model):
    tokens, valid = _prompts(3)
    cfg = sampler.SamplingConfig(max_new_tokens=60, pad_id=0)
    with pytest.raises(ValueError, match="prompt row 0: 6 prompt tokens"):
        sampler.generate(model, tokens, valid, 0, cfg)
    cfg = sampler.SamplingConfig(max_new_tokens=2, pad_id=0)
    right = valid[:, ::-1].copy()
    with pytest.raises(ValueError, match="row 1 is not left-padded"):
        sampler.generate(model, tokens, right, 0, cfg)
    empty = valid.copy()
    empty[2] = False
    with pytest.raises(ValueError, match="row 2 is empty"):
        sampler.generate(model, tokens, empty, 0, cfg)
    big = tokens.copy()
    big[1, -1] = VOCAB
    with pytest.raises(ValueError, match="row 1 has a token id outside"):
        sampler.generate(model, big, valid, 0, cfg)
    with pytest.raises(ValueError, match="one key per row|3 keys"):
        sampler.generate(model, tokens, valid, jax.random.split(jax.random.key(0), 2), cfg)
    with pytest.raises(ValueError, match="temperature"):
        sampler.SamplingConfig(max_new_tokens=2, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        sampler.SamplingConfig(max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampler.SamplingConfig(max_new_tokens=0)


def test_sharded_model_generates_the_same_tokens(model):
    from pl_dpo import sharding

    mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=2 if len(jax.devices()) % 2 == 0 else 1)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, sharding.logical_to_shardings(state, mesh, sharding.DEFAULT_DECODER_RULES))
    sharded = nnx.merge(graphdef, state)
    tokens, valid = _prompts(8)
    cfg = sampler.SamplingConfig(max_new_tokens=6, temperature=0.9, top_p=0.95, pad_id=0)
    ref = sampler.generate(model, tokens, valid, 7, cfg)
    out = sampler.generate(sharded, tokens, valid, 7, cfg)
    np.testing.assert_array_equal(out.tokens_BxT, ref.tokens_BxT)
    np.testing.assert_allclose(out.logprobs_BxT, ref.logprobs_BxT, atol=1e-5)


def _mixed_length_arrays(n: int, width: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    """Left-padded prompts alternating short (2-5 tokens) and long (30-40 tokens)."""
    rng = np.random.default_rng(seed)
    lengths = [int(rng.integers(2, 6)) if i % 2 else int(rng.integers(30, width + 1)) for i in range(n)]
    valid = np.zeros((n, width), bool)
    for i, length in enumerate(lengths):
        valid[i, width - length :] = True
    tokens = np.where(valid, rng.integers(3, VOCAB, (n, width)), 0).astype(np.int32)
    return {"prompt_tokens_NxP": tokens, "prompt_valid_NxP": valid}


def test_length_order_is_longest_first_and_stable():
    valid = np.array([[0, 1, 1], [1, 1, 1], [0, 0, 1], [0, 1, 1]], bool)
    np.testing.assert_array_equal(sampler.length_order(valid), [1, 0, 3, 2])
    # Grouped by length, the batches pad to far fewer prompt positions than in dataset order.
    from pl_dpo.data import prompt_batches

    arrays = _mixed_length_arrays(64)
    order = sampler.length_order(arrays["prompt_valid_NxP"])
    grouped = {k: v[order] for k, v in arrays.items()}
    width = lambda a: sum(b.prompt_tokens_BxP.size for b in prompt_batches(a, batch_size=8))
    assert width(grouped) <= 0.7 * width(arrays)


def test_a_prompts_sample_does_not_depend_on_its_batch(model):
    """Keys come from the prompt's index (`prompt_keys`): batch size and length grouping leave each prompt's
    sample as it is; another seed changes them."""
    cfg = sampler.SamplingConfig(max_new_tokens=5, temperature=1.0, pad_id=0, eos_ids=(1,))
    arrays = _mixed_length_arrays(12)
    key = jax.random.key(3)
    by4 = sampler.generate_responses(model, arrays, cfg, key, batch_size=4, eos_id=1)
    counted = []  # the progress bar's updates: every real prompt once (the filler rows of the last batch not)
    progress = type("Bar", (), {"update": lambda self, k: counted.append(k)})()
    by8 = sampler.generate_responses(model, arrays, cfg, key, batch_size=8, eos_id=1, progress=progress)
    assert counted == [8, 4]
    assert by4 == by8 and all(r for r in by4)
    # Row by row through `generate` with the prompt's own key gives the same sample.
    for i in (5,):  # one row: each row length is another compile
        valid = arrays["prompt_valid_NxP"][i : i + 1]
        n = int(valid.sum())
        one = sampler.generate(
            model,
            arrays["prompt_tokens_NxP"][i : i + 1, -n:],
            valid[:, -n:],
            sampler.prompt_keys(key, np.array([i])),
            cfg,
        )
        assert np.asarray(one.tokens_BxT)[0, : int(one.lengths_B[0])].tolist()[: len(by4[i])] == by4[i]
    assert sampler.generate_responses(model, arrays, cfg, jax.random.key(4), batch_size=4, eos_id=1) != by4
    # A prompt too long for the context is named by its index in the data, not its row in a reordered batch.
    long_cfg = sampler.SamplingConfig(max_new_tokens=30, temperature=1.0, pad_id=0)
    with pytest.raises(
        ValueError, match=r"prompt row 0: \d+ prompt tokens \+ max_new_tokens=30 exceed .*; 3 of 12 rows do$"
    ):
        sampler.generate_responses(model, arrays, long_cfg, key, batch_size=4, eos_id=1)
    keys = sampler.prompt_keys(key, np.array([7, -1, 7, 0]))
    data = np.asarray(jax.random.key_data(keys))
    np.testing.assert_array_equal(data[0], data[2])
    np.testing.assert_array_equal(data[1], data[3])  # filler rows: prompt 0's key
