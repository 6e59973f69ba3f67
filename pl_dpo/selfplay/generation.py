"""Responses sampled for a run's training prompts: the policy's, an assistant's, πθ(0)'s.

Each draw's key comes from the run's seed and a stage label (`seeds.stage_key`), so a resumed or
multi-process run samples exactly the same responses.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from tqdm import tqdm

from pl_dpo import sampler
from pl_dpo.data import Example, TokenizeConfig
from pl_dpo.data.tokenize import encode_examples
from pl_dpo.models import Decoder
from pl_dpo.selfplay.modes import TokenIds


def sample_responses(
    model: Decoder,
    prompts: dict[str, np.ndarray],
    sampling: sampler.SamplingConfig,
    key: jax.Array,
    *,
    batch_size: int,
    decode_tp: int | None,
    desc: str,
) -> list[TokenIds]:
    """One response per prompt of `prompts` (`RankedSet.prompts()`), with a progress bar; `sampling.eos_ids[0]`
    ends a response. `decode_tp`: the sampler's tensor-parallel group size (None: its rule)."""
    n = prompts["prompt_tokens_NxP"].shape[0]
    with tqdm(total=n, desc=desc, unit="prompt", leave=False, disable=jax.process_index() != 0) as bar:
        return sampler.generate_responses(
            model, prompts, sampling, key, batch_size, sampling.eos_ids[0], progress=bar, tp=decode_tp
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
