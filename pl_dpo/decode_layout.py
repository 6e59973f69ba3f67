"""The decode-time weight layout: where a model's weights go while it samples (`pl_dpo.sampler`).

The decode mesh re-reads the training mesh ("data", "fsdp", "tensor"), same devices in the same order, with
"fsdp" split in two: ("data", "fsdp", "tp", "tensor"), "tp" being the inner `tp` chips of each fsdp group.
Decoding runs tensor parallel over ("tp", "tensor") and splits the batch (prompts, KV cache, sampled tokens)
over ("data", "fsdp"). Weights move there once per `sampler.generate_responses` (`decode_weights`): cast to the
compute dtype, gathered over the outer "fsdp" only (one all-gather per weight, then an all-to-all into the
Megatron column/row layout of `sharding.DEFAULT_DECODER_RULES` with "tensor" -> ("tp", "tensor")), never inside
the loop. With `int8` the layers' projections are quantized where they lie, before the gathers (`models.quant`).
A `ModelFolder` (an assistant used as shipped) is read from its files straight into this layout: one copy.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pl_dpo import sharding
from pl_dpo.models import hf_io
from pl_dpo.models.decoder import Decoder
from pl_dpo.models.quant import Int8Kernel, quantize_int8, scale_sharding

DECODE_AXES = ("data", "fsdp", "tp", "tensor")
DECODE_BATCH = ("data", "fsdp")
DECODE_TENSOR = ("tp", "tensor")
# Share of a chip's memory the decode weights and KV cache may take (the rest: the training state that stays
# resident, temporaries, the compiler's reserve).
DECODE_MEMORY_SHARE = 0.5


def decode_tp_split(
    cfg, mesh_shape: tuple[int, int, int], batch: int, max_len: int, hbm_bytes: float | None, int8: bool = False
) -> int:
    """How many chips of each "fsdp" group join tensor parallelism while decoding (the size of "tp").

    The rule: the fewest chips that hold the weights. `tp` is the smallest divisor of the fsdp size for which
    (compute-dtype weights) / (tp x tensor) + (KV cache of the batch) / (all chips) <= DECODE_MEMORY_SHARE of a
    chip's memory, and the batch groups (data x fsdp / tp) are no more than the rows (no group without a real
    row). With no memory figure (CPU) the weights are taken to fit: tp = 1, every chip decodes its own rows with
    the whole model (on "tensor" only, as trained). When no split fits: tp = fsdp, i.e. every chip in the tensor
    group and the batch replicated (the layout of plain FSDP weights)."""
    d, f, t = mesh_shape
    cdt = jnp.dtype(cfg.compute_dtype).itemsize
    weights = cfg.num_params() * cdt
    if int8:  # the layers' projections at one byte a weight (the embedding and head stay in the compute dtype)
        weights -= cfg.num_layer_params() * (cdt - 1)
    kv = 2 * cfg.num_layers * batch * max_len * cfg.num_kv_heads * cfg.head_dim * cdt
    for tp in (x for x in range(1, f + 1) if f % x == 0):
        if d * f // tp > batch:
            continue
        if hbm_bytes is None or weights / (tp * t) + kv / (d * f * t) <= DECODE_MEMORY_SHARE * hbm_bytes:
            return tp
    return f


@dataclasses.dataclass(frozen=True)
class DecodeLayout:
    """The decode mesh (axes DECODE_AXES); hashable, a static argument of the jitted sampler."""

    mesh: Mesh

    @property
    def groups(self) -> int:
        """Batch shards: the rows are split this many ways."""
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    @property
    def tensor(self) -> int:
        return self.mesh.shape["tp"] * self.mesh.shape["tensor"]

    def batch(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(DECODE_BATCH))

    def cache(self, num_kv_heads: int) -> NamedSharding:
        """KV cache [B, K, S, H]: rows over the batch axes, kv heads over the tensor axes when they divide."""
        heads = DECODE_TENSOR if num_kv_heads % self.tensor == 0 and self.tensor > 1 else None
        return NamedSharding(self.mesh, P(DECODE_BATCH, heads))

    def weight_rules(self) -> tuple[tuple[str, P], ...]:
        """The training rules with "fsdp" dropped and "tensor" widened to ("tp", "tensor")."""

        def one(entry):
            if entry == "fsdp":
                return None
            return DECODE_TENSOR if entry == "tensor" else entry

        return tuple((pattern, P(*(one(e) for e in spec))) for pattern, spec in sharding.DEFAULT_DECODER_RULES)


def training_mesh_shape(state) -> tuple[tuple[int, int, int], np.ndarray]:
    """(data, fsdp, tensor) sizes and devices of the weights' mesh; one device -> (1, 1, 1)."""
    leaf = jax.tree.leaves(state)[0]
    sh = getattr(leaf, "sharding", None)
    if isinstance(sh, NamedSharding) and tuple(sh.mesh.axis_names) == sharding.MESH_AXES:
        return tuple(int(sh.mesh.shape[a]) for a in sharding.MESH_AXES), np.asarray(sh.mesh.devices)
    devices = sorted(leaf.devices(), key=lambda d: d.id) if hasattr(leaf, "devices") else jax.devices()[:1]
    return (1, len(devices), 1), np.asarray(devices)


def decode_layout(devices: np.ndarray, mesh_shape: tuple[int, int, int], tp: int) -> DecodeLayout:
    d, f, t = mesh_shape
    if tp < 1 or f % tp:  # a group size set by hand (config.sampling.decode_tp); decode_tp_split's always divide
        raise ValueError(f"config.sampling.decode_tp={tp} must divide the mesh's fsdp size {f}")
    mesh = Mesh(np.asarray(devices).reshape(d, f // tp, tp, t), DECODE_AXES, axis_types=(AxisType.Auto,) * 4)
    return DecodeLayout(mesh)


def _chip_memory(devices: np.ndarray) -> float | None:
    """A chip's memory as this process's first device of the mesh reports it (None on CPU)."""
    mine = [d for d in np.asarray(devices).flat if d.process_index == jax.process_index()]
    try:
        stats = mine[0].memory_stats() if mine else None
    except Exception:  # noqa: BLE001 -- a backend without memory figures
        stats = None
    return float(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


@dataclasses.dataclass(frozen=True)
class DecodeWeights:
    """A model's weights in the decode layout: the compute dtype, and the stacked layer weights as one array per
    layer (no second stacked copy during decoding: the loop reads these arrays directly)."""

    graphdef: nnx.GraphDef
    rest: nnx.State  # everything but the layers (embedding, final norm, output head)
    layers: tuple[nnx.State, ...]  # one per layer, the same tree as the stacked layers' state
    layout: DecodeLayout
    num_kv_heads: int


def _weight_shardings(tree, layout: DecodeLayout, stacked: bool):
    """(gathered over the outer fsdp, final) shardings per leaf of `tree`, as a static tuple in leaf order."""
    rules = layout.weight_rules()
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape = np.shape(leaf)[1:] if stacked else np.shape(leaf)
        src = getattr(leaf, "sharding", None)
        spec = tuple(src.spec) if isinstance(src, NamedSharding) else ()
        spec = spec[1:] if stacked else spec
        inner = P(*(("tp" if e == "fsdp" else e) for e in spec[: len(shape)]))
        # Drop what the training mesh could not shard evenly (it replicated those dims too).
        inner = P(*(e if e is None or shape[i] % _size(layout.mesh, e) == 0 else None for i, e in enumerate(inner)))
        final = sharding.spec_for(sharding.path_to_str(path), shape, layout.mesh, rules)
        out.append((NamedSharding(layout.mesh, inner), NamedSharding(layout.mesh, final)))
    return tuple(out)


def _size(mesh: Mesh, entry) -> int:
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    return int(np.prod([mesh.shape[n] for n in names]))


@functools.partial(jax.jit, static_argnames=("num_layers", "cdt", "rest_sh", "layer_sh", "int8_leaves"))
def _relayout(layers_state, rest_state, *, num_layers, cdt, rest_sh, layer_sh, int8_leaves=()):
    def move(x, shardings):
        x = x.astype(cdt) if jnp.issubdtype(x.dtype, jnp.floating) else x
        for sh in shardings:
            x = jax.lax.with_sharding_constraint(x, sh)
        return x

    def move_int8(x, shardings):
        # Quantized where the weight is (its training layout), so the gathers move int8, not the compute dtype.
        kernel = quantize_int8(x)
        q, scale = kernel.q, kernel.scale
        for sh in shardings:
            q = jax.lax.with_sharding_constraint(q, sh)
            scale = jax.lax.with_sharding_constraint(scale, scale_sharding(sh, x.ndim))
        return Int8Kernel(q, scale)

    leaves, treedef = jax.tree.flatten(rest_state)
    rest = treedef.unflatten([move(x, s) for x, s in zip(leaves, rest_sh)])
    leaves, treedef = jax.tree.flatten(layers_state)
    layers = tuple(
        treedef.unflatten(
            [(move_int8 if j in int8_leaves else move)(x[i], s) for j, (x, s) in enumerate(zip(leaves, layer_sh))]
        )
        for i in range(num_layers)
    )
    return rest, layers


def abstract_decode_weights(layers_state, rest_state, static: dict[str, Any]):
    """(rest, layers) as `_relayout` returns them, as ShapeDtypeStructs with their decode shardings: the arguments
    of a sampler whose weights were read straight into the decode layout (`ModelFolder`; the planner)."""

    def one(leaf, shardings, stacked: bool, int8: bool):
        shape, final = tuple(leaf.shape[1:] if stacked else leaf.shape), shardings[-1]
        if int8:
            return Int8Kernel(
                jax.ShapeDtypeStruct(shape, jnp.int8, sharding=final),
                jax.ShapeDtypeStruct(shape[:-2] + shape[-1:], jnp.float32, sharding=scale_sharding(final, len(shape))),
            )
        dtype = static["cdt"] if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf.dtype
        return jax.ShapeDtypeStruct(shape, dtype, sharding=final)

    leaves, treedef = jax.tree.flatten(rest_state)
    rest = treedef.unflatten([one(x, s, False, False) for x, s in zip(leaves, static["rest_sh"])])
    leaves, treedef = jax.tree.flatten(layers_state)
    layer = treedef.unflatten(
        [one(x, s, True, j in static["int8_leaves"]) for j, (x, s) in enumerate(zip(leaves, static["layer_sh"]))]
    )
    return rest, (layer,) * static["num_layers"]


@dataclasses.dataclass(frozen=True)
class ModelFolder:
    """A model that is only sampled (an assistant used as shipped), read from its Hugging Face folder straight into
    the decode layout by `decode_weights`: no training-layout copy of its weights is ever made, so a chip holds
    one copy (int8 with `int8`), not two. The sampler takes it where it takes a `Decoder`."""

    path: str
    config: Any  # DecoderConfig, numerics included (param dtype: what the file's tensors are cast to first)
    mesh: Mesh  # the run's mesh: the decode layout re-reads its shape and devices


def decode_weights(
    model: Decoder | ModelFolder,
    batch: int,
    max_len: int,
    *,
    tp: int | None = None,
    hbm_bytes=None,
    int8: bool = False,
) -> DecodeWeights:
    """The model's weights moved once into the decode layout for batches of up to `batch` rows of `max_len` slots
    (prompt + new tokens). `tp`: override `decode_tp_split`'s choice; `hbm_bytes`: a chip's memory (default: what
    the device reports; none on CPU); `int8`: the layers' projections as weight-only int8 (`models.quant`)."""
    if isinstance(model, ModelFolder):
        return _folder_weights(model, batch, max_len, tp, hbm_bytes, int8)
    cfg = model.config
    graphdef, layers_state, rest_state = nnx.split(model, nnx.PathContains("layers"), ...)
    mesh_shape, devices = training_mesh_shape(rest_state)
    if tp is None:
        hbm = hbm_bytes if hbm_bytes is not None else _chip_memory(devices)
        tp = decode_tp_split(cfg, mesh_shape, batch, max_len, hbm, int8)
    layout = decode_layout(devices, mesh_shape, tp)
    settings = relayout_settings(cfg, layers_state, rest_state, layout, int8)
    rest, layers = _relayout(layers_state, rest_state, **settings)
    return DecodeWeights(graphdef, rest, layers, layout, cfg.num_kv_heads)


def relayout_settings(cfg, layers_state, rest_state, layout: DecodeLayout, int8: bool = False) -> dict[str, Any]:
    """The static arguments of `_relayout` that move this model's weights into `layout` (also what the
    planner compiles: `pl_dpo.plan.lower`); with `int8`, which layer leaves (the projections' kernels) quantize."""
    paths = [sharding.path_to_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(layers_state)]
    return dict(
        num_layers=cfg.num_layers,
        cdt=jnp.dtype(cfg.compute_dtype),
        rest_sh=_weight_shardings(rest_state, layout, stacked=False),
        layer_sh=_weight_shardings(layers_state, layout, stacked=True),
        int8_leaves=tuple(j for j, path in enumerate(paths) if int8 and path.endswith("_proj/kernel")),
    )


def _folder_weights(folder: ModelFolder, batch: int, max_len: int, tp, hbm_bytes, int8: bool) -> DecodeWeights:
    """`decode_weights` of a ModelFolder: each tensor read, cast to the param dtype (as `from_pretrained` does),
    placed on its decode sharding (each device takes its slice) and quantized or cast to the compute dtype there.
    The same weights, bit for bit, as `decode_weights(from_pretrained(...))`."""
    cfg = folder.config
    mesh_shape = tuple(int(folder.mesh.shape[a]) for a in sharding.MESH_AXES)
    devices = np.asarray(folder.mesh.devices)
    if tp is None:
        hbm = hbm_bytes if hbm_bytes is not None else _chip_memory(devices)
        tp = decode_tp_split(cfg, mesh_shape, batch, max_len, hbm, int8)
    layout = decode_layout(devices, mesh_shape, tp)
    rules, cdt, pdt = layout.weight_rules(), jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
    graphdef, layers_state, rest_state = nnx.split(
        nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), nnx.PathContains("layers"), ...
    )
    files = hf_io.TensorFiles(folder.path)

    def load(path: str, layer: int | None):
        name, transpose = hf_io.hf_tensor(path)
        value = files.get(name.format(i=layer))
        value = (value.T if transpose else value).astype(pdt)
        final = NamedSharding(layout.mesh, sharding.spec_for(path, value.shape, layout.mesh, rules))
        placed = jax.make_array_from_callback(value.shape, final, lambda idx: value[idx])
        if int8 and layer is not None and path.endswith("_proj/kernel"):
            out = Int8Kernel(final, scale_sharding(final, placed.ndim))
            return jax.jit(quantize_int8, out_shardings=out)(placed)
        return jax.jit(lambda x: x.astype(cdt) if jnp.issubdtype(x.dtype, jnp.floating) else x)(placed)

    def loaded(state, layer: int | None) -> nnx.State:
        flat = nnx.to_flat_state(state)
        return nnx.from_flat_state([(p, var.replace(value=load(sharding.path_to_str(p), layer))) for p, var in flat])

    try:
        rest = loaded(rest_state, None)
        layers = tuple(loaded(layers_state, i) for i in range(cfg.num_layers))
    finally:
        files.close()
    return DecodeWeights(graphdef, rest, layers, layout, cfg.num_kv_heads)
