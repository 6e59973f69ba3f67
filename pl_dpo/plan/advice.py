"""Advice for a program that does not fit: the nearest setting that does (full remat, micro-batches with
gradient accumulation, a smaller sampling batch), compiled to check; else the smallest larger slice of the same
chips on which it fits."""

from __future__ import annotations

import dataclasses

from pl_dpo.plan.compiler import Row, compile_row, refused_temporaries
from pl_dpo.plan.programs import Program
from pl_dpo.plan.slices import Slice, abstract_devices, larger_slices


def candidates(p: Program) -> list[tuple[str, Program]]:
    """Nearby settings, nearest first, each as (the flags that set it, the program)."""
    out: list[tuple[str, Program]] = []
    if p.kind == "train":
        base = p
        if p.model.remat != "full":
            base = dataclasses.replace(p, model=p.model.replace(remat="full"))
            out.append(("--config.model.remat=full", base))
        accum = p.optim.grad_accum_steps
        for split in (2, 4, 8, 16):
            if p.batch % split or p.batch // split < 1:
                continue
            micro = dataclasses.replace(
                base, batch=p.batch // split, optim=dataclasses.replace(p.optim, grad_accum_steps=accum * split)
            )
            flags = f"--config.{p.batch_field}={p.batch // split} --config.{p.accum_field}={accum * split}"
            if base is not p:
                flags = "--config.model.remat=full " + flags
            out.append((flags + f" (same {p.batch * accum} lists per update)", micro))
    else:
        for split in (2, 4, 8, 16):
            if p.batch // split >= 1:
                out.append(
                    (f"--config.{p.batch_field}={p.batch // split}", dataclasses.replace(p, batch=p.batch // split))
                )
    return out


def ruled_out(p: Program, refused: Row | None, candidate: Program) -> str:
    """Why `candidate` (a smaller batch of `p`, same remat) cannot fit where the compiler refused `p`, or "".

    Temporaries shrink at most in proportion to the batch (activations, caches and logits scale with it; weights,
    gradients and the optimizer's buffers do not), so temps(p) * batch'/batch is a lower bound: a candidate whose
    bound alone exceeds the HBM the compiler said is available is not worth a compile (~20-60 s each)."""
    figures = refused_temporaries(refused) if refused is not None else None
    if figures is None or candidate.model.remat != p.model.remat or candidate.batch >= p.batch:
        return ""
    needed, available = figures
    bound = needed * candidate.batch / p.batch
    if bound <= available:
        return ""
    return f"at least {bound / 2**30:.2f}G of temporaries ({needed / 2**30:.2f}G x {candidate.batch}/{p.batch}) > {available / 2**30:.2f}G"


def advise(p: Program, s: Slice, devices, mesh_axes, kw, progress, refused: Row | None = None) -> str:
    """The nearest setting that fits on `s`; else the smallest larger slice of the same chips on which the
    program fits as it is, or with the smallest of those settings (e.g. a 70B sampler needs both). `refused`:
    `p`'s own row on `s`, whose figures rule out settings without compiling them (`ruled_out`)."""
    nearby = candidates(p)
    for flags, candidate in nearby:
        why_not = ruled_out(p, refused, candidate)
        if why_not:
            if progress:
                progress(f"  skipping {flags}: {why_not}")
            continue
        if progress:
            progress(f"  trying {flags}")
        if compile_row(candidate, s, devices, mesh_axes, **kw).fits:
            return f"fits with {flags}"
    for bigger in larger_slices(s):
        for flags, candidate in [("", p), *nearby[-1:]]:
            if progress:
                progress(f"  trying {bigger.name}" + (f" with {flags}" if flags else ""))
            if compile_row(candidate, bigger, abstract_devices(bigger), (1, -1, 1), **kw).fits:
                where = f"{bigger.name}" + (f" with {flags}" if flags else "")
                return f"nothing nearby fits on {s.name}; the smallest {s.chip.generation} slice that fits it: {where}"
    largest = max(t.num_chips for t in [s, *larger_slices(s)])
    return f"does not fit on any {s.chip.generation} slice up to {largest} chips"
