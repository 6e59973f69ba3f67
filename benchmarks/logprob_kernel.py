"""The log-prob + loss kernel: chunked (pl_dpo.logprobs) vs the full-logits version, time and compiled memory.

Forward + backward of `sum(sequence_logprobs(...))` with respect to the hidden states and the unembedding.
Memory is XLA's compiled temporary allocation (what decides whether a step fits); the naive version
materialises [N, L, V] float32 logits and their gradient. A variant whose compiled temporaries exceed
`MAX_RUN_BYTES` is compiled (for its memory) but not run.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import Profile, compiled_bytes, median_seconds, row
from pl_dpo import logprobs

MAX_RUN_BYTES = 10 * 2**30


def shapes(profile: Profile) -> list[tuple[int, int, int, int]]:
    """(N, L, V, D) cases."""
    if profile.name == "quick":
        return [(2, 64, 512, 32)]
    n, d = (8, 2048) if profile.gpu else (2, 256)  # D is kept small on CPU: its FLOPs scale with D
    return [(n, length, v, d) for v in (32768, 128256) for length in (512, 2048)]


def run(profile: Profile) -> list[dict]:
    # One warm-up and at most 3 timed runs: on CPU a full-vocabulary case takes tens of seconds.
    profile = dataclasses.replace(profile, warmup=1, repeats=min(profile.repeats, 3))
    dtype = jnp.bfloat16 if profile.gpu else jnp.float32
    chunk = 256 if profile.name != "quick" else 16
    rows = []
    for n, length, v, d in shapes(profile):
        case = f"N={n} L={length} V={v} D={d}"
        abstract = (
            jax.ShapeDtypeStruct((n, length, d), dtype),
            jax.ShapeDtypeStruct((d, v), dtype),
            jax.ShapeDtypeStruct((n, length), jnp.int32),
            jax.ShapeDtypeStruct((n, length), jnp.bool_),
        )
        rng = np.random.default_rng(0)
        inputs = None
        variants = {
            "full logits": logprobs.naive_sequence_logprobs,
            f"chunked ({chunk})": lambda *a: logprobs.sequence_logprobs(*a, chunk_size=chunk),
        }
        for name, fn in variants.items():
            grad = jax.jit(jax.value_and_grad(lambda h, u, t, m, fn=fn: fn(h, u, t, m).sum(), argnums=(0, 1)))
            compiled = grad.lower(*abstract).compile()
            memory = compiled_bytes(compiled)
            seconds = None
            if memory["temp_bytes"] <= MAX_RUN_BYTES:
                if inputs is None:
                    inputs = (
                        jnp.asarray(rng.normal(size=(n, length, d)), dtype),
                        jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), dtype),
                        jnp.asarray(rng.integers(0, v, (n, length)), jnp.int32),
                        jnp.asarray(rng.random((n, length)) < 0.5),
                    )
                seconds = median_seconds(lambda c=compiled, x=inputs: jax.block_until_ready(c(*x)), profile)
            baseline = None if name == "full logits" else "full logits"
            rows.append(row("logprob_kernel", case, name, baseline=baseline, step_s=seconds, **memory))
    return rows
