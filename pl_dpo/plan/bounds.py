"""Analytic lower bounds on a program's time from FLOPs, HBM bytes and inter-chip (ICI) bytes at the chip's
published peaks; for the sampler, the bound at every tensor-parallel group it can take."""

from __future__ import annotations

import dataclasses

from pl_dpo import decode_layout, sharding
from pl_dpo.plan.programs import Program
from pl_dpo.plan.slices import Slice


def time_bound(p: Program, s: Slice, mesh_axes: tuple[int, int, int]) -> tuple[float, str, str]:
    """A lower bound on the program's time from FLOPs, HBM bytes and ICI bytes at the chip's peaks.

    Train: 6 N tokens (+ 2 N tokens more with full remat: the forward runs again in the backward) plus
    causal attention; weights gathered over "fsdp" three times in compute precision (forward, remat
    forward, backward) and gradients reduce-scattered in float32; HBM: the sharded state read and written
    once (params, gradients, optimizer moments) and the gathered weights read once per pass. Score: the
    forward only. Sample: per new token, in the sampler's layout (tensor parallelism over the fewest chips
    that hold the weights, rows split over the rest), each chip reads its share of the weights and its rows'
    KV cache, and its group all-reduces [rows, D] twice per layer. Collective latency is not modelled (it is
    what makes wide tensor parallelism slow in decoding, and why the sampler keeps its groups small).
    Ignores overlap limits, padding and kernel efficiency: the real step is slower, never faster."""
    cfg, chips = p.model, s.num_chips
    n = cfg.num_params()
    cdt = 2 if cfg.compute_dtype == "bfloat16" else 4
    pdt = 2 if cfg.param_dtype == "bfloat16" else 4
    _, fsdp, tensor = sharding.mesh_shape(*mesh_axes, chips)
    gather = (fsdp - 1) / fsdp
    attn_per_token = 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim  # QK^T and PV per context position
    if p.kind in ("train", "score"):
        if p.packed:
            r = p.length - p.prompt_len
            tokens = p.batch * (p.prompt_len + p.k * r)
        else:
            tokens = p.batch * p.k * p.length
        ctx = p.length / 2  # causal: each token sees half the row on average
        fwd = 2 * n * tokens + 2 * attn_per_token * tokens * ctx
        if p.kind == "score":
            flops, passes = fwd, 1
            hbm = n * cdt / fsdp + n * cdt
        else:
            remat = 1 if cfg.remat == "full" else 0
            flops, passes = fwd * (3 + remat), 2 + remat
            moments = {"adamw": 2, "rmsprop": 1}.get(p.optim.name, 2)
            hbm = 2 * n * (pdt + 4 + 4 * moments) / fsdp + passes * n * cdt
        ici = passes * n * cdt * gather + (n * 4 * gather if p.kind == "train" else 0)
        per = "step"
    else:
        # The sampler's own layout (decode_layout.decode_tp_split): weights tensor-parallel over `group` chips, the
        # rows split over the chips / group groups; per step each chip reads its weight share and its rows' cache,
        # and each layer all-reduces its group's [rows, D] activations twice.
        max_len = p.prompt_len + p.new_tokens
        tp = p.decode_tp or decode_layout.decode_tp_split(
            cfg, sharding.mesh_shape(*mesh_axes, chips), p.batch, max_len, s.chip.hbm_bytes
        )
        group = tp * tensor
        kv_bytes = 2 * cfg.num_layers * p.batch * max_len * cfg.num_kv_heads * cfg.head_dim * cdt
        flops = 2 * n * p.batch + 2 * attn_per_token * p.batch * (p.prompt_len + p.new_tokens / 2)
        hbm = n * cdt / group + kv_bytes / chips
        rows_per_group = p.batch / max(chips // group, 1)
        ici = 2 * cfg.num_layers * 2 * rows_per_group * cfg.hidden_size * cdt * (group - 1) / group
        per = "token"
    times = {
        "compute": flops / (chips * s.chip.peak_flops),
        "HBM": hbm / s.chip.hbm_bytes_per_s,
        "ICI": ici / s.chip.ici_bytes_per_s if chips > 1 else 0.0,
    }
    by = max(times, key=times.get)
    return times[by], per, by


def decode_tp_bounds(p: Program, s: Slice, mesh_axes: tuple[int, int, int]) -> dict[int, float]:
    """The sampler's time bound per token for every tensor-parallel group it can take on `s` (the divisors of
    the fsdp size), without compiling: what `sampling.decode_tp` would give by bandwidth alone."""
    fsdp = sharding.mesh_shape(*mesh_axes, s.num_chips)[1]
    return {
        tp: time_bound(dataclasses.replace(p, decode_tp=tp), s, mesh_axes)[0]
        for tp in range(1, fsdp + 1)
        if fsdp % tp == 0
    }


def decode_tp_note(p: Program, s: Slice, mesh_axes: tuple[int, int, int]) -> str | None:
    """A note when another `sampling.decode_tp` has a bound under two thirds of the sampler's."""
    bounds = decode_tp_bounds(p, s, mesh_axes)
    now = time_bound(p, s, mesh_axes)[0]
    best = min(bounds, key=bounds.get)
    if bounds[best] > 2 / 3 * now:
        return None
    listed = ", ".join(f"{tp}: {b * 1e3:.2f}" for tp, b in bounds.items())
    return (
        f"{p.name}: bound per token by sampling.decode_tp ({listed} ms; this plan: {now * 1e3:.2f}). Wider "
        "groups read fewer weight bytes per chip; the bound leaves out collective latency, which grows with the "
        f"group. To check its memory: --config.sampling.decode_tp={best}"
    )
