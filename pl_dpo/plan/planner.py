"""The plan of a config on a slice: every program of its run compiled for the slice's chips (`compile_row`),
with advice for what does not fit and notes (see the package doc, `pl_dpo.plan`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from pl_dpo import config_lib, sharding
from pl_dpo.plan import advice
from pl_dpo.plan.bounds import decode_tp_note
from pl_dpo.plan.compiler import Row, compile_row
from pl_dpo.plan.programs import programs_of
from pl_dpo.plan.slices import GiB, Slice, abstract_devices, get_slice


@dataclasses.dataclass
class Plan:
    slice: Slice
    rows: list[Row]
    notes: list[str]

    @property
    def fits(self) -> bool:
        return all(r.fits for r in self.rows)

    def to_json(self) -> dict[str, Any]:
        return {
            "topology": self.slice.name,
            "chips": self.slice.num_chips,
            "hbm_gib_per_chip": self.slice.chip.hbm_bytes / GiB,
            "fits": self.fits,
            "notes": self.notes,
            "programs": [r.to_json() for r in self.rows],
        }


def plan(
    config,
    slice_name: str,
    *,
    advise: bool = True,
    progress: Callable[[str], None] | None = None,
    only: tuple[str, ...] = (),
) -> Plan:
    """Compiles every program of `config` for `slice_name` (see the package doc)."""
    s = get_slice(slice_name)
    devices = abstract_devices(s)
    notes: list[str] = []
    settings = config_lib.run_settings(config)
    m = config.mesh
    mesh_axes = sharding.mesh_shape(m.data, m.fsdp, m.tensor, s.num_chips)
    kw = {"loss_cfg": settings.loss, "chunk_size": settings.logprob_chunk}
    rows = []
    for p in programs_of(config, notes):
        if only and not p.name.startswith(only):
            continue
        if progress:
            progress(f"compiling {p.name} for {s.name}")
        row = compile_row(p, s, devices, mesh_axes, **kw)
        if not row.fits and advise:
            row.advice = advice.advise(p, s, devices, mesh_axes, kw, progress, refused=row)
        elif row.fits and p.kind == "sample" and p.batch_field == "sampling.batch_size":
            note = decode_tp_note(p, s, mesh_axes)
            if note:
                notes.append(note)
        rows.append(row)
    return Plan(s, rows, notes)
