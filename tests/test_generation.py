"""pl_dpo.selfplay.generation: stage keys, the sampling pass of a round on a tiny random policy, and
answers of another tokenizer retokenised for the policy."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from pl_dpo import sampler
from pl_dpo.data import Example, TokenizeConfig
from pl_dpo.models import create_model, preset_config
from pl_dpo.selfplay import generation
from pl_dpo.selfplay.seeds import stage_key
from pl_dpo.tokenizer import build_tiny_tokenizer, load_tokenizer

VOCAB, EOS, PAD = 24, 2, 0
MAX_NEW = 8


def _key_data(key) -> list[int]:
    return np.asarray(jax.random.key_data(key)).tolist()


# ----------------------------------------------------------------------------- stage_key


def test_stage_key_is_stable_and_differs_by_label_and_seed():
    a = _key_data(stage_key(0, "spin", 1))
    assert a == _key_data(stage_key(0, "spin", 1))
    others = [
        stage_key(0, "spin", 2),
        stage_key(0, "asft", 1),
        stage_key(0, "spin"),
        stage_key(1, "spin", 1),
    ]
    keys = [a, *map(_key_data, others)]
    assert len({tuple(k) for k in keys}) == len(keys), keys


def test_stage_key_is_the_same_in_another_process():
    """What a resumed run or another host derives (Python's salted `hash` would differ here)."""
    code = (
        "import jax, numpy as np; from pl_dpo.selfplay.seeds import stage_key;"
        "print(np.asarray(jax.random.key_data(stage_key(0, 'spin', 1))).tolist())"
    )
    env = dict(os.environ, PYTHONHASHSEED="123", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(_key_data(stage_key(0, "spin", 1)))


# ----------------------------------------------------------------------------- sample_responses


@pytest.fixture(scope="module")
def model():
    m = create_model(
        preset_config(
            "tiny-llama",
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            head_dim=8,
            num_layers=1,  # the decode step is unrolled over layers: one compiles fastest
            max_position_embeddings=64,
            eos_token_id=EOS,
        ),
        seed=0,
    )
    # Random init gives nearly uniform next tokens; sharpen them so that some responses stop at EOS early.
    m.final_norm.scale[...] = m.final_norm.scale[...] * 4.0
    return m


def _prompts(n: int = 7, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, VOCAB, (n, 6)).astype(np.int32)
    valid = np.ones((n, 6), bool)
    for b in range(n):
        valid[b, : b % 4] = False  # left padding: prompts of 6, 5, 4 and 3 tokens
    return {"prompt_tokens_NxP": np.where(valid, tokens, PAD), "prompt_valid_NxP": valid}


SAMPLING = sampler.SamplingConfig(max_new_tokens=MAX_NEW, temperature=1.0, eos_ids=(EOS,), pad_id=PAD)


def _sample(model, key, batch_size: int, prompts=None):
    prompts = _prompts() if prompts is None else prompts
    return generation.sample_responses(
        model, prompts, SAMPLING, key, batch_size=batch_size, decode_tp=None, desc="test"
    )


@pytest.fixture(scope="module")
def sampled(model):
    return _sample(model, stage_key(0, "test"), batch_size=8)


def test_one_response_per_prompt_ending_at_eos_or_max_new_tokens(sampled):
    assert len(sampled) == 7
    ended_at_eos = 0
    for ids in sampled:
        assert 1 <= len(ids) <= MAX_NEW, ids
        assert all(isinstance(t, int) and 0 <= t < VOCAB for t in ids), ids
        assert EOS not in ids[:-1], ids  # nothing after the first EOS
        assert ids[-1] == EOS or len(ids) == MAX_NEW, ids
        ended_at_eos += ids[-1] == EOS
    # Both ways of ending occur with this key (else the checks above would not be exercised).
    assert 0 < ended_at_eos < len(sampled), sampled


def test_same_key_same_responses_other_key_others(model, sampled):
    assert _sample(model, stage_key(0, "test"), batch_size=8) == sampled
    assert _sample(model, stage_key(0, "other"), batch_size=8) != sampled


def test_responses_do_not_depend_on_the_sampling_batch_size(model, sampled):
    """Each prompt has its own key: batching (and the padding of the last batch) changes nothing."""
    assert _sample(model, stage_key(0, "test"), batch_size=2) == sampled  # 4 batches, not 1


def test_a_prompt_is_sampled_the_same_among_other_prompts(model, sampled):
    """The first six prompts without the seventh get the responses they got among the seven (a prompt's
    key follows its index, not its row or batch)."""
    prompts = _prompts()
    alone = {k: v[:6] for k, v in prompts.items()}
    assert _sample(model, stage_key(0, "test"), batch_size=8, prompts=alone) == sampled[:6]


# ----------------------------------------------------------------------------- retokenise


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(d)
    return load_tokenizer(d)


def test_retokenise_gives_the_answers_ids_and_eos_alone_for_an_empty_answer(tokenizer):
    cfg = TokenizeConfig(max_prompt_len=64, max_response_len=64)
    examples = [
        Example(example_id="a", prompt="Add 12 and 30.", responses=("42",)),
        Example(example_id="b", prompt="Reverse abc.", responses=("cba",)),
        Example(example_id="c", prompt="Sort 3 1 2.", responses=("1 2 3",)),
    ]
    eos = tokenizer.eos_token_id
    out = generation.retokenise(["forty two", "", "1 2 3"], examples, tokenizer, cfg, eos)
    assert len(out) == 3
    assert out[1] == [eos]  # still an answer (a bad one): one EOS
    for ids, text in ((out[0], "forty two"), (out[2], "1 2 3")):
        assert len(ids) > 1 and ids[-1] == eos and eos not in ids[:-1], ids
        assert tokenizer.decode(ids[:-1]) == text
