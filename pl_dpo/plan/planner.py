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
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

# The plan never runs a program: JAX only needs its CPU backend (and libtpu as a compiler).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu asks the VM's metadata server for worker names unless told; there is none off a TPU VM.
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

GiB = 2**30
# What the TPU compiler keeps back from a chip's HBM (v5e: "exceeds available HBM (15.75G)" of 16 GiB).
COMPILER_RESERVE_BYTES = 0.25 * GiB


# ----------------------------------------------------------------------------- chips and slices


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip's published figures (Cloud TPU system architecture pages)."""

    generation: str
    device_kind: str  # what jax reports for its devices
    hbm_bytes: float
    peak_flops: float  # bf16 dense, per chip
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # all of a chip's inter-chip links together, one direction


CHIPS = {
    "v4": Chip("v4", "TPU v4", 32 * GiB, 275e12, 1.2e12, 2400e9 / 8),
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GiB, 197e12, 819e9, 1600e9 / 8),
    "v5p": Chip("v5p", "TPU v5", 95 * GiB, 459e12, 2765e9, 4800e9 / 8),
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GiB, 918e12, 1640e9, 3584e9 / 8),
}


@dataclasses.dataclass(frozen=True)
class Slice:
    """A slice in Cloud TPU's accelerator-type name, e.g. v5litepod-16 (alias v5e-16) or v5p-8."""

    name: str
    chip: Chip
    num_chips: int
    topology: str  # jax.experimental.topologies' name, e.g. "v5e:4x4"
    chip_config: str  # "default", or "megacore" (v4: one device per chip, as on the VM)


def _slices() -> dict[str, Slice]:
    out: dict[str, Slice] = {}
    # v4 and v5p count TensorCores in their names (2 per chip); v5e and v6e count chips.
    cube = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4"}
    for gen, config in (("v4", "megacore"), ("v5p", "default")):
        for chips, dims in cube.items():
            name = f"{gen}-{2 * chips}"
            out[name] = Slice(name, CHIPS[gen], chips, f"{gen}:{dims}", config)
    grid = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
    for gen, cloud in (("v5e", "v5litepod"), ("v6e", "v6e")):
        for chips, dims in grid.items():
            out[f"{cloud}-{chips}"] = Slice(f"{cloud}-{chips}", CHIPS[gen], chips, f"{gen}:{dims}", "default")
    return out


SLICES = _slices()
ALIASES = {f"v5e-{s.num_chips}": s.name for s in SLICES.values() if s.chip.generation == "v5e"}


def get_slice(name: str) -> Slice:
    name = ALIASES.get(name.strip().lower(), name.strip().lower())
    if name not in SLICES:
        known = ", ".join(sorted(SLICES, key=lambda n: (SLICES[n].chip.generation, SLICES[n].num_chips)))
        raise ValueError(
            f"unknown topology {name!r}; known (Cloud TPU accelerator types): {known} (v5e-N = v5litepod-N)"
        )
    return SLICES[name]


def larger_slices(s: Slice) -> list[Slice]:
    return sorted(
        (t for t in SLICES.values() if t.chip is s.chip and t.num_chips > s.num_chips), key=lambda t: t.num_chips
    )


def abstract_devices(s: Slice) -> list:
    """The slice's devices as the TPU compiler sees them (abstract: nothing to run on)."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise PlanError("the TPU compiler (libtpu) is not installed: pip install -e '.[tpu]'") from None
    from jax.experimental import topologies

    return list(
        topologies.get_topology_desc(
            platform="tpu",
            topology_name=s.topology,
            chip_config_name=s.chip_config,
            chips_per_host_bounds=(2, 2, 1),
            num_slices=1,
        ).devices
    )


class PlanError(ValueError):
    """Bad input to the planner: one line, exit code 2."""


# ----------------------------------------------------------------------------- programs


@dataclasses.dataclass
class Program:
    """One program of a run, at the shapes the config gives it."""

    name: str
    kind: str  # "train" | "score" | "sample"
    model: Any  # DecoderConfig
    batch: int
    # train / score: K responses per list and the model's row length; sample: prompt length and new tokens.
    k: int = 1
    length: int = 0
    prompt_len: int = 0
    new_tokens: int = 0
    packed: bool = False
    optim: Any = None  # train.OptimizerConfig
    objective: str = "pl_dpo"  # "pl_dpo" | "sft"
    # The config fields this program's batch comes from (for advice), e.g. "rounds.batch_size".
    batch_field: str = ""
    accum_field: str = ""
    decode_tp: int = 0  # sample: config.sampling.decode_tp (0: decode_layout.decode_tp_split's rule)


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


def _settings_text(p: Program) -> str:
    remat = p.model.remat
    if p.kind == "sample":
        return f"batch {p.batch}, prompt {p.prompt_len} + {p.new_tokens} new"
    layout = "packed" if p.packed else "plain"
    accum = p.optim.grad_accum_steps if p.optim is not None and p.optim.grad_accum_steps > 1 else 1
    acc = f" x{accum} accum" if accum > 1 else ""
    return f"batch {p.batch}{acc}, K={p.k}, L={p.length} {layout}, remat {remat}"


def _abstract(shape, dtype, sh):
    import jax

    return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)


def _abstract_model(cfg, mesh):
    """(graphdef, abstract params with their shardings, param shardings)."""
    import jax
    from flax import nnx

    from pl_dpo import sharding
    from pl_dpo.models import create_model

    graphdef, params = nnx.split(nnx.eval_shape(lambda: create_model(cfg, seed=0)))
    param_sh = sharding.logical_to_shardings(params, mesh, sharding.DEFAULT_DECODER_RULES)
    with_sh = jax.tree.map(lambda a, s: _abstract(a.shape, a.dtype, s), params, param_sh)
    return graphdef, with_sh, param_sh


def _abstract_batch(p: Program, bsh, with_ref: bool):
    """A RankedBatch or PackedBatch of abstract arrays at the program's largest shapes."""
    import jax.numpy as jnp

    from pl_dpo.data import RankedBatch
    from pl_dpo.data.packing import PackedBatch

    b, k = p.batch, p.k
    ref = _abstract((b, k), jnp.float32, bsh) if with_ref else None
    if p.packed:
        # [prompt, r_1, ..., r_K] in one row: T = P + K R slots, M = K R scored tokens at most.
        t, m = p.prompt_len + k * (p.length - p.prompt_len), k * (p.length - p.prompt_len)
        i32 = lambda *s: _abstract(s, jnp.int32, bsh)  # noqa: E731
        return PackedBatch(
            tokens_BxT=i32(b, t),
            segment_ids_BxT=i32(b, t),
            positions_BxT=i32(b, t),
            source_BxM=i32(b, m),
            targets_BxM=i32(b, m),
            response_BxM=i32(b, m),
            valid_BxK=_abstract((b, k), jnp.bool_, bsh),
            example_ids_B=None,
            ref_logps_BxK=ref,
        )
    return RankedBatch(
        tokens_BxKxL=_abstract((b, k, p.length), jnp.int32, bsh),
        loss_mask_BxKxL=_abstract((b, k, p.length), jnp.bool_, bsh),
        attn_valid_BxKxL=_abstract((b, k, p.length), jnp.bool_, bsh),
        positions_BxKxL=_abstract((b, k, p.length), jnp.int32, bsh),
        valid_BxK=_abstract((b, k), jnp.bool_, bsh),
        example_ids_B=None,
        ref_logps_BxK=ref,
    )


def lower(p: Program, mesh, *, loss_cfg=None, chunk_size: int = 256):
    """The program lowered for `mesh` (abstract devices), ready for `.compile()`."""
    import jax
    import jax.numpy as jnp

    from pl_dpo import decode_layout, sampler, scoring, sharding
    from pl_dpo.training import train

    graphdef, params, param_sh = _abstract_model(p.model, mesh)
    bsh = sharding.batch_sharding(mesh)
    with jax.set_mesh(mesh):
        if p.kind == "train":
            tx = p.optim.build(1000)
            opt = jax.eval_shape(tx.init, params)
            opt_sh = sharding.logical_to_shardings(opt, mesh, sharding.DEFAULT_DECODER_RULES, rank_mismatch="replicate")
            opt = jax.tree.map(lambda a, s: _abstract(a.shape, a.dtype, s), opt, opt_sh)
            objective = (
                train.sft_objective(chunk_size)
                if p.objective == "sft"
                else train.pl_dpo_objective(loss_cfg, chunk_size=chunk_size)
            )
            step = train.make_train_step(graphdef, objective, tx, train.TrainState(param_sh, opt_sh), bsh)
            return step.lower(params, opt, _abstract_batch(p, bsh, with_ref=p.objective != "sft"))
        from flax import nnx

        if p.kind == "score":
            # As `scoring.score_ranked`: the batch split over ("data", "fsdp") (padded to a multiple of that),
            # the weights as trained (FSDP: XLA gathers each layer's weights as the forward reaches it).
            shards = sharding.batch_shards(mesh)
            batch = _abstract_batch(dataclasses.replace(p, batch=-(-p.batch // shards) * shards), bsh, with_ref=False)
            score = jax.jit(lambda prm, batch: scoring.batch_logps(nnx.merge(graphdef, prm), batch, chunk_size))
            return score.lower(params, batch)
    # As `sampler.generate_responses`: the weights as trained are the program's arguments (they stay resident);
    # the program moves them into the decode layout (`decode_layout.decode_weights`: tensor parallel over the fewest
    # chips that hold them, per the chip's memory) and decodes a batch split over the rest.
    sampling = sampler.SamplingConfig(max_new_tokens=p.new_tokens, eos_ids=(0,), pad_id=0)
    chip = next((c for c in CHIPS.values() if c.device_kind == mesh.devices.flat[0].device_kind), None)
    mesh_shape = tuple(int(mesh.shape[a]) for a in sharding.MESH_AXES)
    max_len = p.prompt_len + p.new_tokens
    tp = p.decode_tp or decode_layout.decode_tp_split(
        p.model, mesh_shape, p.batch, max_len, chip.hbm_bytes if chip else None
    )
    layout = decode_layout.decode_layout(mesh.devices, mesh_shape, tp)
    batch = -(-p.batch // layout.groups) * layout.groups
    g, layers_state, rest_state = nnx.split(nnx.merge(graphdef, params), nnx.PathContains("layers"), ...)
    static = decode_layout.relayout_settings(p.model, layers_state, rest_state, layout)

    def sample(layers_state, rest_state, tokens, valid, keys):
        rest, layers = decode_layout._relayout(layers_state, rest_state, **static)
        return sampler._generate_padded(g, rest, layers, tokens, valid, keys, sampling, layout)

    rows = layout.batch()
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch))
    return jax.jit(sample).lower(
        layers_state,
        rest_state,
        _abstract((batch, p.prompt_len), jnp.int32, rows),
        _abstract((batch, p.prompt_len), jnp.bool_, rows),
        _abstract(keys.shape, keys.dtype, rows),
    )


_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Oo]ut of memory|exceeds available HBM|Ran out of memory")


def compile_row(p: Program, s: Slice, devices, mesh_axes: tuple[int, int, int], **kw) -> Row:
    """Compiles `p` for slice `s`; the TPU compiler's out-of-memory check decides whether it fits."""
    from pl_dpo import sharding

    mesh = sharding.make_mesh(*mesh_axes, devices=devices)
    bound, unit, by = time_bound(p, s, mesh_axes)
    row = Row(p.name, _settings_text(p), True, hbm_bytes=s.chip.hbm_bytes, bound_s=bound, bound_unit=unit, bound_by=by)
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


def _oom_summary(text: str) -> str:
    """The compiler's own sentence with its figures, e.g. 'HLO temporaries (18.94G) exceeds available HBM (15.75G)'."""
    for pattern in (r"Used [\d.]+[GMK] of [\d.]+[GMK] hbm[^.\n]*", r"[^\n:]*exceeds available HBM[^\n]*"):
        found = re.search(pattern, text)
        if found:
            return found.group(0).strip()
    first = next((line for line in text.splitlines() if _OOM.search(line)), text.splitlines()[0] if text else "")
    return first.strip()[:300]


# ----------------------------------------------------------------------------- analytic bounds


def _fsdp_size(s: Slice, mesh_axes: tuple[int, int, int]) -> int:
    """The "fsdp" axis of the mesh `mesh_axes` (data, fsdp, tensor; fsdp -1: the rest) on the chips of `s`."""
    return mesh_axes[1] if mesh_axes[1] > 0 else s.num_chips // max(mesh_axes[0] * mesh_axes[2], 1)


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
    from pl_dpo import decode_layout

    cfg, chips = p.model, s.num_chips
    n = cfg.num_params()
    cdt = 2 if cfg.compute_dtype == "bfloat16" else 4
    pdt = 2 if cfg.param_dtype == "bfloat16" else 4
    fsdp = _fsdp_size(s, mesh_axes)
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
        tensor = mesh_axes[2] if mesh_axes[2] > 0 else 1
        tp = p.decode_tp or decode_layout.decode_tp_split(
            cfg, (chips // (fsdp * tensor), fsdp, tensor), p.batch, max_len, s.chip.hbm_bytes
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


# ----------------------------------------------------------------------------- from a config


def model_section_config(section, vocab_size: int, notes: list[str], where: str):
    """The decoder shape of a model section: the folder's config.json when it is there, else its preset."""
    from pl_dpo import config_lib
    from pl_dpo.models import config as model_config

    numerics = {k: section[k] for k in ("param_dtype", "compute_dtype", "remat", "attention_impl") if section.get(k)}
    path = section.get("hf_path") or ""
    if path and os.path.exists(os.path.join(path, "config.json")):
        return config_lib.model_config(section, vocab_size)
    preset = section.get("preset") or "tiny-llama"
    overrides = dict(section.get("overrides", {}) or {})
    if preset.startswith("tiny"):  # sized by the run's own tokenizer, built at run time: planned at vocab_size
        overrides.setdefault("vocab_size", vocab_size)
    if path:
        notes.append(f"{where}: model folder {path!r} not found here; planning with the shape preset {preset!r}")
    elif not preset.startswith("tiny"):
        notes.append(f"{where}: no model folder given; planning with the shape preset {preset!r}")
    return model_config.preset_config(preset, **{**overrides, **numerics})


def programs_of(config, notes: list[str]) -> list[Program]:
    """Every program a run of `config` compiles, at its largest shapes."""
    from pl_dpo import config_lib, sampler
    from pl_dpo.selfplay import modes

    data = config.data
    prompt = int(data.max_prompt_len)
    buckets = tuple(data.get("length_buckets") or ())
    length = int(max(buckets)) if buckets else prompt + int(data.max_response_len)
    packed = bool(data.get("pack_prompt", False))
    vocab = int(config.model.get("overrides", {}).get("vocab_size", 0) or 512)
    policy = model_section_config(config.model, vocab, notes, "config.model")
    rows = dict(length=length, prompt_len=prompt, packed=packed)  # every train / score program's row shape
    out: list[Program] = []
    arms = config_lib.modes_of(config)
    if int(config.sft.get("steps", 0)) > 0:
        optim = config_lib.optimizer(config.sft.optim)
        out.append(
            Program(
                "sft step",
                "train",
                policy,
                int(config.sft.batch_size),
                k=1,
                optim=optim,
                objective="sft",
                **rows,
                batch_field="sft.batch_size",
                accum_field="sft.optim.grad_accum_steps",
            )
        )
    ks = sorted({config_lib.list_size(config, m) for m in arms if m.objective is modes.Objective.PL_DPO})
    for k in ks:
        optim = config_lib.optimizer(config.rounds.optim)
        out.append(
            Program(
                f"pl-dpo step K={k}",
                "train",
                policy,
                int(config.rounds.batch_size),
                k=k,
                optim=optim,
                **rows,
                batch_field="rounds.batch_size",
                accum_field="rounds.optim.grad_accum_steps",
            )
        )
    for k in ks or [1]:
        batch = int(config.eval.batch_size)
        out.append(Program(f"scoring K={k}", "score", policy, batch, k=k, **rows, batch_field="eval.batch_size"))

    def sample(name: str, model, field: str, new_tokens: int) -> Program:
        """A sampler program at the shapes `sampler.generate` compiles for (its padded batch and prompt bucket)."""
        batch, prompt_len = sampler.bucket_shapes(
            int(config_lib.lookup(config, field)), prompt, sampler.SamplingConfig(max_new_tokens=new_tokens)
        )
        # sampling.decode_tp sets the sampler's tensor-parallel group (evaluation always takes the rule's).
        tp = int(config.sampling.get("decode_tp", 0) or 0) if field == "sampling.batch_size" else 0
        return Program(
            name, "sample", model, batch, prompt_len=prompt_len, new_tokens=new_tokens, batch_field=field, decode_tp=tp
        )

    new = int(config.sampling.max_new_tokens)
    out.append(sample("sampler", policy, "sampling.batch_size", new))
    out.append(sample("evaluation (greedy)", policy, "eval.batch_size", int(data.max_response_len)))
    # The assistants whose samples some arm ranks (the first ones; ladder: every one of them).
    ranked = max((m.assistants_ranked(config_lib.list_size(config, m)) for m in arms), default=0)
    for i, a in enumerate((config.get("assistants", []) or [])[:ranked]):
        assistant = model_section_config(a.model, vocab, notes, f"config.assistants[{i}].model")
        out.append(sample(f"assistant {i} sampler", assistant, "sampling.batch_size", new))
    return out


def decode_tp_bounds(p: Program, s: Slice, mesh_axes: tuple[int, int, int]) -> dict[int, float]:
    """The sampler's time bound per token for every tensor-parallel group it can take on `s` (the divisors of
    the fsdp size), without compiling: what `sampling.decode_tp` would give by bandwidth alone."""
    fsdp = _fsdp_size(s, mesh_axes)
    return {
        tp: time_bound(dataclasses.replace(p, decode_tp=tp), s, mesh_axes)[0]
        for tp in range(1, fsdp + 1)
        if fsdp % tp == 0
    }


def _decode_tp_note(p: Program, s: Slice, mesh_axes: tuple[int, int, int]) -> str | None:
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


# ----------------------------------------------------------------------------- advice


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


# ----------------------------------------------------------------------------- the plan


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
    """Compiles every program of `config` for `slice_name` (see the module doc)."""
    from pl_dpo import config_lib

    s = get_slice(slice_name)
    devices = abstract_devices(s)
    notes: list[str] = []
    mesh_axes = (int(config.mesh.data), int(config.mesh.fsdp), int(config.mesh.tensor))
    kw = dict(loss_cfg=config_lib.loss(config.loss), chunk_size=int(config.get("logprob_chunk", 256)))
    rows = []
    for p in programs_of(config, notes):
        if only and not p.name.startswith(only):
            continue
        if progress:
            progress(f"compiling {p.name} for {s.name}")
        row = compile_row(p, s, devices, mesh_axes, **kw)
        if not row.fits and advise:
            row.advice = _advise(p, s, devices, mesh_axes, kw, progress)
        elif row.fits and p.kind == "sample" and p.batch_field == "sampling.batch_size":
            note = _decode_tp_note(p, s, mesh_axes)
            if note:
                notes.append(note)
        rows.append(row)
    return Plan(s, rows, notes)


def _advise(p: Program, s: Slice, devices, mesh_axes, kw, progress) -> str:
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


def format_plan(result: Plan) -> str:
    s = result.slice
    head = (
        f"{s.name}: {s.num_chips} x {s.chip.device_kind}, {s.chip.hbm_bytes / GiB:.2f} GiB HBM per chip "
        f"(bounds at {s.chip.peak_flops / 1e12:.0f} TFLOP/s, {s.chip.hbm_bytes_per_s / 1e9:.0f} GB/s HBM, "
        f"{s.chip.ici_bytes_per_s / 1e9:.0f} GB/s ICI per chip)"
    )
    cols = ["program", "setting", "args", "temps", "total", "compiler total", "of HBM", "fits", "time bound"]
    table = [cols]
    gib = lambda x, ok: f"{x / GiB:.2f} GiB" if ok else "-"  # noqa: E731
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


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    from absl import flags
    from ml_collections import config_flags

    argv = list(sys.argv if argv is None else ["pl_dpo.plan", *argv])
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
            raise PlanError("usage: python -m pl_dpo.plan --config=configs/<name>.py[:arg] --topology=v5e-16 [--json]")
        get_slice(fv.topology)  # an unknown name fails before any compile
        from pl_dpo import config_lib

        try:
            config_lib.validate(fv.config)
        except config_lib.ConfigError as e:
            if "hf_path" not in str(e):  # a model folder the run needs: the plan takes the section's preset
                raise
        import jax

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


if __name__ == "__main__":
    sys.exit(main())
