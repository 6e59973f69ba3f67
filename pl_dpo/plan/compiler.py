"""A program compiled for a slice by the TPU compiler: its verdict (the compiler's own out-of-memory check) and
its per-chip memory figures, with the analytic time bound, as one plan row."""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import tempfile
from typing import Any

from pl_dpo import sharding
from pl_dpo.plan.bounds import time_bound
from pl_dpo.plan.lower import lower
from pl_dpo.plan.programs import Program, settings_text
from pl_dpo.plan.slices import GiB, Slice

# What the TPU compiler keeps back from a chip's HBM (v5e: "exceeds available HBM (15.75G)" of 16 GiB).
COMPILER_RESERVE_BYTES = 0.25 * GiB


@dataclasses.dataclass
class Row:
    """A compiled program's figures (per chip)."""

    program: str
    setting: str  # e.g. "batch 64, K=2, L=1024, remat full"
    fits: bool
    argument_bytes: float = 0.0
    temp_bytes: float = 0.0  # memory_analysis()
    total_bytes: float = 0.0  # memory_analysis(): arguments + outputs - aliased + temporaries
    # The compiler's memory-usage report (arguments included): what its out-of-memory check compares with
    # the chip's HBM. Lower than memory_analysis()'s total by 1-5 GiB at 7B: it counts buffers shared in time once.
    compiler_total_bytes: float = 0.0
    host_bytes: float = 0.0  # host memory the program keeps (remat="offload_dots": the offloaded residuals)
    hbm_bytes: float = 0.0
    compiler_message: str = ""  # the compiler's own figures when it refused the program
    bound_s: float = 0.0  # analytic lower bound per step (train / score) or per new token (sample)
    bound_unit: str = "step"
    bound_by: str = ""  # "compute" | "HBM" | "ICI"
    advice: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Oo]ut of memory|exceeds available HBM|Ran out of memory")


def compile_row(p: Program, s: Slice, devices, mesh_axes: tuple[int, int, int], **kw) -> Row:
    """Compiles `p` for slice `s` on the mesh `mesh_axes` (data, fsdp, tensor; one may be -1: the rest); the TPU
    compiler's out-of-memory check decides whether it fits. `kw`: `lower`'s loss_cfg and chunk_size."""
    mesh = sharding.make_mesh(*mesh_axes, devices=devices)
    bound, unit, by = time_bound(p, s, mesh_axes)
    row = Row(p.name, settings_text(p), True, hbm_bytes=s.chip.hbm_bytes, bound_s=bound, bound_unit=unit, bound_by=by)
    lowered = lower(p, mesh, **kw)
    with tempfile.TemporaryDirectory() as dump:
        try:
            # The compiler's own memory-usage report (what its out-of-memory check uses) lands in the dump.
            compiled = lowered.compile(compiler_options={"xla_dump_to": dump, "xla_dump_hlo_as_text": False})
            row.compiler_total_bytes = _reported_total(dump)
        except Exception as e:  # noqa: BLE001 -- only the compiler's out-of-memory refusal is a result
            text = str(e)
            if not _OOM.search(text):
                raise
            row.fits = False
            row.compiler_message = _oom_summary(text)
            return row
    m = compiled.memory_analysis()
    row.argument_bytes = float(m.argument_size_in_bytes)
    row.host_bytes = float(getattr(m, "host_temp_size_in_bytes", 0) + getattr(m, "host_argument_size_in_bytes", 0))
    row.temp_bytes = float(m.temp_size_in_bytes)
    row.total_bytes = float(
        m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    )
    # Without a report (another compiler version), the larger memory_analysis() figure stands in.
    row.compiler_total_bytes = row.compiler_total_bytes or row.total_bytes
    row.fits = row.compiler_total_bytes <= s.chip.hbm_bytes - COMPILER_RESERVE_BYTES
    if not row.fits:
        row.compiler_message = f"{row.compiler_total_bytes / GiB:.2f} GiB needed per chip"
    return row


def _reported_total(dump: str) -> float:
    """'Total bytes' of the compiler's memory-usage report for the program (0 when there is none)."""
    totals = []
    for path in glob.glob(os.path.join(dump, "*memory-usage-report.txt")):
        with open(path, encoding="utf-8", errors="replace") as f:
            found = re.search(r"Total bytes:\s*(\d+)", f.read(4096))
        if found:
            totals.append(float(found.group(1)))
    return max(totals, default=0.0)


_UNIT = {"K": 2**10, "M": 2**20, "G": 2**30}


def refused_temporaries(row: Row) -> tuple[float, float] | None:
    """(temporaries needed, HBM available) in bytes when the compiler refused `row` for its temporaries alone,
    from its sentence 'HLO temporaries (76.33G) exceeds available HBM (15.75G)'; else None."""
    found = re.search(
        r"HLO temporaries \(([\d.]+)([KMG])\) exceeds available HBM \(([\d.]+)([KMG])\)", row.compiler_message
    )
    if not found:
        return None
    return float(found[1]) * _UNIT[found[2]], float(found[3]) * _UNIT[found[4]]


def _oom_summary(text: str) -> str:
    """The compiler's own sentence with its figures, e.g. 'HLO temporaries (18.94G) exceeds available HBM (15.75G)'."""
    for pattern in (r"Used [\d.]+[GMK] of [\d.]+[GMK] hbm[^.\n]*", r"[^\n:]*exceeds available HBM[^\n]*"):
        found = re.search(pattern, text)
        if found:
            return found.group(0).strip()
    first = next((line for line in text.splitlines() if _OOM.search(line)), text.splitlines()[0] if text else "")
    return first.strip()[:300]
