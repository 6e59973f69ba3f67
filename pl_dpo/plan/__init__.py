"""The plan of a config on a TPU slice, compiled ahead of time by the TPU compiler, before any slice exists.

    python -m pl_dpo.plan --config=configs/spin.py --topology=v5e-16 [--config.x=y ...] [--json]

From abstract shapes only (no weights read, nothing allocated) every program the config's run
executes is compiled for the named slice by libtpu (the `tpu` extra): the SFT step, the
Plackett-Luce step at each K the config's modes use, the scoring of ranked sets (reference
log-probs and evaluation likelihoods), the sampler (prefill + decode) for the policy and for each
assistant, and greedy evaluation. One row per program: per-chip arguments, temporaries and total
(XLA's `memory_analysis()`) against the chip's HBM, whether the TPU compiler accepted it (its own
out-of-memory check decides "fits"; its figure is quoted when it refuses), and an analytic lower
bound on the program's time from FLOPs, HBM bytes and inter-chip (ICI) bytes at the chip's
published peaks. For a program that does not fit, the nearest setting that does is compiled and
named (full remat, micro-batches with gradient accumulation, a smaller sampling batch); where
nothing on the slice fits, the smallest slice of the generation on which the program fits.

Exit code 0 when every program fits, 1 when one does not, 2 for bad input (unknown topology, no
libtpu, a config error). A model folder is read for its config.json only; without one (or where
the folder is absent on this machine) the section's `preset` gives the shape, e.g. mistral-7b for
zephyr-7b-sft-full in configs/spin.py, and the plan says so.

Modules, by job:

    slices.py    the Cloud TPU catalogue: Chip, Slice, get_slice, abstract_devices (no jax until asked)
    programs.py  Program: one program of a run; programs_of(config), from config_lib.run_settings
    lower.py     abstract weights and batches (the data package's own batch constructors), lowered
    compiler.py  compile_row: the TPU compiler's verdict and memory figures (Row)
    bounds.py    analytic time bounds; the sampler's bound per tensor-parallel group
    advice.py    the nearest setting, or the smallest slice, on which a program fits
    planner.py   plan(config, slice): every program compiled, with advice and notes (Plan)
    cli.py       format_plan and main (`python -m pl_dpo.plan`, __main__.py)
"""

import os

# Set before any module of the package imports jax. The plan never runs a program: JAX only needs its CPU
# backend (and libtpu as a compiler).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu asks the VM's metadata server for worker names unless told; there is none off a TPU VM.
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
