"""`python -m pl_dpo.plan`: the command line (flags, exit codes) and the plan as a table."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence

import jax
from absl import flags
from ml_collections import config_flags

from pl_dpo import config_file, config_lib
from pl_dpo.plan.planner import Plan, plan
from pl_dpo.plan.slices import GiB, PlanError, get_slice

USAGE = "usage: python -m pl_dpo.plan --config=configs/<name>.py[:arg] --topology=v5e-16 [--json] [--config.x=y ...]"


def format_plan(result: Plan) -> str:
    s = result.slice
    head = (
        f"{s.name}: {s.num_chips} x {s.chip.device_kind}, {s.chip.hbm_bytes / GiB:.2f} GiB HBM per chip "
        f"(bounds at {s.chip.peak_flops / 1e12:.0f} TFLOP/s, {s.chip.hbm_bytes_per_s / 1e9:.0f} GB/s HBM, "
        f"{s.chip.ici_bytes_per_s / 1e9:.0f} GB/s ICI per chip)"
    )
    cols = ["program", "setting", "args", "temps", "total", "compiler total", "of HBM", "fits", "time bound"]
    table = [cols]

    def gib(x: float, ok: bool) -> str:
        return f"{x / GiB:.2f} GiB" if ok else "-"

    for r in result.rows:
        unit = "ms/step" if r.bound_unit == "step" else "ms/token"
        measured = r.total_bytes > 0
        table.append(
            [
                r.program,
                r.setting,
                gib(r.argument_bytes, measured),
                gib(r.temp_bytes, measured),
                gib(r.total_bytes, measured),
                gib(r.compiler_total_bytes, measured) + (f" +{r.host_bytes / GiB:.2f} host" if r.host_bytes else ""),
                f"{r.compiler_total_bytes / r.hbm_bytes:.0%}" if measured else "-",
                "yes" if r.fits else "NO",
                f"{r.bound_s * 1e3:.2f} {unit} ({r.bound_by})",
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = [head, ""] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    for r in result.rows:
        if not r.fits:
            lines.append(f"{r.program}: does not fit ({r.compiler_message})")
            if r.advice:
                lines.append(f"  {r.advice}")
    lines += [f"note: {n}" for n in result.notes]
    lines.append("fits" if result.fits else "does NOT fit")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else ["pl_dpo.plan", *argv])
    config_file.make_importable(argv)
    # Fresh flags per call (the tests call main several times); ml_collections finds the --config.x
    # overrides in the argv it is given.
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "ml_collections config file (configs/<name>.py[:arg]).", flag_values=fv, sys_argv=argv
    )
    flags.DEFINE_string("topology", None, "Cloud TPU accelerator type, e.g. v5litepod-16 (or v5e-16).", flag_values=fv)
    flags.DEFINE_bool("json", False, "Print the plan as JSON.", flag_values=fv)
    flags.DEFINE_bool("advise", True, "Compile nearby settings for what does not fit.", flag_values=fv)
    flags.DEFINE_list(
        "only", [], "Plan only the programs whose names start with these, e.g. 'pl-dpo step'.", flag_values=fv
    )
    if any(a in ("--help", "-h", "--helpfull", "-?") for a in argv[1:]):
        print(f"{USAGE}\n\n{fv.get_help(include_special_flags=False).strip()}")
        return 0
    try:
        try:
            fv(argv)
        except (AttributeError, KeyError, flags.Error) as e:  # a --config.x of no such field
            name = str(e.args[0] if e.args else e).strip("'\"")
            unknown = re.search(r"flag '-*config\.([\w.]+)'", str(e))
            if isinstance(e, flags.Error) and not unknown:
                raise
            name = unknown.group(1).split(".")[-1] if unknown else name
            raise PlanError(f"the config has no field {name!r} (its fields: configs/common.py:base())") from None
        if fv.config is None or fv.topology is None:
            raise PlanError(USAGE)
        s = get_slice(fv.topology)  # an unknown name fails before any compile
        try:  # the run's own checks, for a mesh over the slice's chips
            config_lib.validate(fv.config, num_devices=s.num_chips)
        except config_lib.ConfigError as e:
            if "hf_path" not in str(e):  # a model folder the run needs: the plan takes the section's preset
                raise
        # Programs compiled for abstract TPU chips cannot be read back from a persistent cache on this host.
        jax.config.update("jax_enable_compilation_cache", False)
        say = None if fv.json else (lambda m: print(m, file=sys.stderr, flush=True))
        result = plan(fv.config, fv.topology, advise=fv.advise, progress=say, only=tuple(fv.only))
    except (PlanError, ValueError, flags.Error) as e:  # config_lib.ConfigError is a ValueError
        line = str(e).splitlines()[0] if str(e) else repr(e)
        print(f"error: {line}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_json(), indent=1) if fv.json else format_plan(result))
    return 0 if result.fits else 1
