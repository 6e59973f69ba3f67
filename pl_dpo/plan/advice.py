"""Advice for a program that does not fit: the nearest setting that does (full remat, micro-batches with
gradient accumulation, a smaller sampling batch), compiled to check; else the smallest larger slice of the same
chips on which it fits."""

from __future__ import annotations

import dataclasses

from pl_dpo.plan.compiler import compile_row
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


def advise(p: Program, s: Slice, devices, mesh_axes, kw, progress) -> str:
    """The nearest setting that fits on `s`; else the smallest larger slice of the same chips on which the
    program fits as it is, or with the smallest of those settings (e.g. a 70B sampler needs both)."""
    nearby = candidates(p)
    for flags, candidate in nearby:
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
