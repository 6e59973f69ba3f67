"""Responses sampled for a run's training prompts: the policy's, an assistant's, πθ(0)'s.

Each draw's key comes from the run's seed and a stage label (`stage_key`), so a resumed or
multi-process run samples exactly the same responses.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from pl_dpo import sampler
from pl_dpo.data import Example, TokenizeConfig
from pl_dpo.data.tokenize import encode_examples
from pl_dpo.models import Decoder

TokenIds = list[int]


def stage_key(seed: int, *labels: Any) -> jax.Array:
    """A key derived from the seed and a stage label (stable across runs and processes)."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32("/".join(map(str, labels)).encode()))


def sample_responses(
    model: Decoder,
    prompt_arrays: dict[str, np.ndarray],
    sampling: ml_collections.ConfigDict,
    key: jax.Array,
    *,
    eos_id: int,
    pad_id: int,
    desc: str,
) -> list[TokenIds]:
    """One response per prompt of `prompt_arrays` (`config.sampling` settings), with a progress bar."""
    cfg = sampler.SamplingConfig(
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        eos_ids=(eos_id,),
        pad_id=pad_id,
    )
    n = prompt_arrays["prompt_tokens_NxP"].shape[0]
    with tqdm(total=n, desc=desc, unit="prompt", leave=False, disable=jax.process_index() != 0) as bar:
        return sampler.generate_responses(
            model,
            prompt_arrays,
            cfg,
            key,
            sampling.batch_size,
            eos_id,
            progress=bar,
            tp=sampling.get("decode_tp") or None,
        )


def retokenise(
    texts: list[str], examples: list[Example], tokenizer, tokenize: TokenizeConfig, eos_id: int
) -> list[TokenIds]:
    """Answers of a model with another tokenizer, as the policy's response ids (EOS alone for an
    empty answer: still an answer, a bad one)."""
    out = []
    for example, text in zip(examples, texts):
        if not text:
            out.append([eos_id])
            continue
        retokenised = dataclasses.replace(example, responses=(text,))
        out.append(encode_examples(tokenizer, [retokenised], tokenize)[1][0][0])
    return out
