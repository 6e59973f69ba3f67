"""Chunked vs naive log-prob kernel: compiled peak temporary memory and CPU time.

    python benchmarks/bench_logprobs.py                      # the two BENCHMARKS.md shapes
    python benchmarks/bench_logprobs.py --shapes=8x1024x32768 --hidden=256 --repeats=5

Memory is XLA's compiled `temp_size_in_bytes` of value_and_grad (forward + backward).
Time is the median wall time of forward + backward over `--repeats` runs after one
warm-up; a variant whose compiled temporary memory exceeds `--max_run_gib` is not run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pl_dpo import logprobs


def build(fn):
    return jax.jit(jax.value_and_grad(lambda h, u, t, m: fn(h, u, t, m).sum(), argnums=(0, 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="8x1024x32768,8x2048x128256", help="NxLxV,...")
    parser.add_argument("--hidden", type=int, default=256, help="D (kept small: CPU FLOPs scale with D)")
    parser.add_argument("--chunk_size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max_run_gib", type=float, default=10.0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    dtype = jnp.dtype(args.dtype)
    print(
        f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, D={args.hidden}, "
        f"chunk={args.chunk_size}, dtype={args.dtype}, median of {args.repeats}"
    )
    print("| N x L x V | variant | compiled temp memory | fwd+bwd time |")
    print("|---|---|---|---|")
    for shape in args.shapes.split(","):
        N, L, V = (int(x) for x in shape.split("x"))
        D = args.hidden
        rng = np.random.default_rng(0)
        abstract = (
            jax.ShapeDtypeStruct((N, L, D), dtype),
            jax.ShapeDtypeStruct((D, V), dtype),
            jax.ShapeDtypeStruct((N, L), jnp.int32),
            jax.ShapeDtypeStruct((N, L), jnp.bool_),
        )
        inputs = None
        variants = {
            "naive (full logits)": logprobs.naive_sequence_logprobs,
            f"chunked ({args.chunk_size})": lambda *a: logprobs.sequence_logprobs(*a, chunk_size=args.chunk_size),
        }
        for name, fn in variants.items():
            compiled = build(fn).lower(*abstract).compile()
            temp_gib = compiled.memory_analysis().temp_size_in_bytes / 2**30
            timing = "not run (over --max_run_gib)"
            if temp_gib <= args.max_run_gib:
                if inputs is None:
                    inputs = (
                        jnp.asarray(rng.normal(size=(N, L, D)), dtype),
                        jnp.asarray(rng.normal(size=(D, V)) / np.sqrt(D), dtype),
                        jnp.asarray(rng.integers(0, V, (N, L)), jnp.int32),
                        jnp.asarray(rng.random((N, L)) < 0.5),
                    )
                jax.block_until_ready(compiled(*inputs))
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    jax.block_until_ready(compiled(*inputs))
                    times.append(time.perf_counter() - start)
                timing = f"{statistics.median(times):.2f} s"
            print(f"| {N}x{L}x{V} | {name} | {temp_gib:.2f} GiB | {timing} |", flush=True)


if __name__ == "__main__":
    main()
