"""The lm-evaluation-harness backend (`pl_dpo.harness`): its kernels against float64 numpy on a random model, and
on the real pretrained model (SmolLM2-135M-Instruct, tests/real_model.py) against Hugging Face PyTorch and
against lm-eval's own `hf` backend on local task files of every output type."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from scipy import special

from pl_dpo import logprobs, sampler
from pl_dpo.harness import requests as harness_requests
from pl_dpo.models import create_model, positions_from_valid, preset_config

VOCAB = 40


@pytest.fixture(scope="module")
def tiny():
    cfg = preset_config(
        "tiny-llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, head_dim=8, max_position_embeddings=48
    )
    model = create_model(cfg, seed=0)
    model.final_norm.scale[...] = model.final_norm.scale[...] * 10.0  # peaked distributions: greedy is decided
    return model


def _reference_logps(model, tokens: list[int]) -> np.ndarray:
    """float64 log-softmax of one unpadded row's logits [T, V]."""
    x = np.asarray([tokens], np.int32)
    v = np.ones_like(x, bool)
    hidden = model(x, positions_from_valid(v), v)
    logits = np.asarray(model.logits(hidden), np.float64)[0]
    return logits - special.logsumexp(logits, axis=-1, keepdims=True)


def test_token_logprobs_and_greedy_match_float64():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(3, 10, 16)).astype(np.float32)
    unembed = rng.normal(size=(16, 50)).astype(np.float32)
    logits = hidden.astype(np.float64) @ unembed.astype(np.float64)
    targets = rng.integers(0, 50, (3, 10))
    targets[0, :4] = logits[0, :4].argmax(-1)  # some greedy tokens
    logps, greedy = logprobs.token_logprobs_and_greedy(hidden, unembed, targets, chunk_size=4)
    want = np.take_along_axis(logits - special.logsumexp(logits, -1, keepdims=True), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(logps), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(greedy), logits.argmax(-1) == targets)


def test_continuation_scores_match_each_row_scored_alone(tiny):
    rng = np.random.default_rng(1)
    requests = []
    for n_ctx, n_cont in [(1, 1), (5, 3), (12, 1), (30, 6), (45, 8), (3, 2), (7, 7)]:
        requests.append((rng.integers(1, VOCAB, n_ctx).tolist(), rng.integers(1, VOCAB, n_cont).tolist()))
    # A continuation that greedy decoding gives: each token the argmax after the ones before.
    context = [5, 9, 2]
    cont = []
    for _ in range(3):
        cont.append(int(_reference_logps(tiny, context + cont)[-1].argmax()))
    requests.append((context, cont))
    max_length = 40
    got = harness_requests.continuation_scores(tiny, requests, batch_size=3, max_length=max_length)
    for (context, continuation), (logp, greedy) in zip(requests, got, strict=True):
        whole = (context + continuation)[-(max_length + 1) :]  # left-truncated as lm-eval's hf backend does
        ref = _reference_logps(tiny, whole[:-1])
        n = len(continuation)
        rows = ref[-n:]
        targets = np.asarray(whole[-n:])
        assert logp == pytest.approx(rows[np.arange(n), targets].sum(), rel=1e-5, abs=1e-5)
        assert greedy == bool((rows.argmax(-1) == targets).all())
    assert got[-1][1]  # the greedy continuation is said to be greedy


def test_continuation_scores_on_a_mesh_equal_one_device(tiny):
    from flax import nnx

    from pl_dpo import sharding

    mesh = sharding.make_mesh(2, 2, 2)
    graphdef, state = nnx.split(tiny)
    shardings = sharding.logical_to_shardings(state, mesh, sharding.DEFAULT_DECODER_RULES)
    sharded = nnx.merge(graphdef, jax.device_put(state, shardings))
    rng = np.random.default_rng(2)
    requests = [(rng.integers(1, VOCAB, n).tolist(), rng.integers(1, VOCAB, 3).tolist()) for n in (4, 9, 20, 2, 30)]
    one = harness_requests.continuation_scores(tiny, requests, batch_size=2, max_length=40)
    many = harness_requests.continuation_scores(sharded, requests, batch_size=2, max_length=40)
    np.testing.assert_allclose([s for s, _ in many], [s for s, _ in one], rtol=1e-5)
    assert [g for _, g in many] == [g for _, g in one]


def test_generate_gives_each_prompt_what_the_sampler_gives_it_alone(tiny):
    settings = sampler.SamplingConfig(max_new_tokens=5, greedy=True, eos_ids=(3,))
    prompts = [[4, 5, 6], [7, 8], [9, 10, 11, 12, 13], [14]]
    got = harness_requests.generate(tiny, prompts, settings, batch_size=2)
    for prompt, new in zip(prompts, got, strict=True):
        alone = sampler.generate(tiny, np.asarray([prompt]), np.ones((1, len(prompt)), bool), 0, settings)
        assert new == np.asarray(alone.tokens_BxT)[0, : int(alone.lengths_B[0])].tolist()
        assert 1 <= len(new) <= 5 and (len(new) == 5 or new[-1] == 3)
