"""Device mesh, regex partition rules and sharded creation of parameters.

One mesh with axes ("data", "fsdp", "tensor") (docs/ARCHITECTURE.md, "Scale-out"). Parameters are placed
by *rules as data*: a sequence of `(regex, PartitionSpec)` pairs matched with
`re.search` against the '/'-joined path of each parameter (e.g.
`layers/3/attn/q_proj/kernel`); the first match wins. The same rules place the
optimizer state, because optax moment paths end with the parameter path
(`opt_state/0/mu/layers/3/attn/q_proj/kernel`).

Parameters and optimizer state are created *already sharded*: shapes come from
`eval_shape` and the real initialisation runs under `jax.jit(out_shardings=...)`,
so no device ever holds a whole copy.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")
BATCH_AXES: tuple[str, str] = ("data", "fsdp")

Rules = Sequence[tuple[str, P]]

# Llama / Mistral / Qwen2-style decoder. Kernels are stored [in, out] (nnx.Linear).
# Column-parallel projections (D -> F) shard their output over "tensor",
# row-parallel ones (F -> D) their input, so the pair needs one all-reduce; "fsdp"
# shards the D side of every matrix. A stacked-layer axis in front is left unsharded.
DEFAULT_DECODER_RULES: tuple[tuple[str, P], ...] = (
    (r"embed[^/]*/embedding$", P("tensor", "fsdp")),  # [V, D]: vocab over tensor
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", P("fsdp", "tensor")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/bias$", P("tensor")),
    (r"(o_proj|down_proj)/kernel$", P("tensor", "fsdp")),
    (r"(o_proj|down_proj)/bias$", P("fsdp")),
    (r"norm[^/]*/(scale|bias)$", P()),
    (r"lm_head/kernel$", P("fsdp", "tensor")),  # [D, V]
    (r"lm_head/bias$", P("tensor")),
    # LoRA adapters (pl_dpo.models.lora): A [in, r] shards `in` as its kernel does, B [r, out] shards `out`.
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj|lm_head)/lora_a$", P("fsdp", None)),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj|lm_head)/lora_b$", P(None, "tensor")),
    (r"(o_proj|down_proj)/lora_a$", P("tensor", None)),
    (r"(o_proj|down_proj)/lora_b$", P(None, "fsdp")),
    # A frozen int8 kernel (models.quant.Int8Kernel, LoRA's frozen_int8): its values as the kernel, its scales [out].
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel/q$", P("fsdp", "tensor")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel/scale$", P("tensor")),
    (r"(o_proj|down_proj)/kernel/q$", P("tensor", "fsdp")),
    (r"(o_proj|down_proj)/kernel/scale$", P("fsdp")),
)


# ----------------------------------------------------------------------------- mesh


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """The (data, fsdp, tensor) sizes on `num_devices` devices, where at most one size may be -1 ("the rest").

    The one place a -1 axis is resolved (the run's mesh, the config's batch checks, the planner). Raises
    ValueError naming the sizes and the device count when they do not fit, before anything is compiled.
    """
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    desc = f"mesh data={data} fsdp={fsdp} tensor={tensor} with {num_devices} devices"
    for name, s in sizes.items():
        if not isinstance(s, (int, np.integer)) or (s < 1 and s != -1):
            raise ValueError(f"{desc}: axis {name!r} size must be a positive int or -1, got {s!r}")
    rest = [k for k, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise ValueError(f"{desc}: at most one axis may be -1, got {rest}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if rest:
        if num_devices % known:
            raise ValueError(f"{desc}: the fixed axes ({known} devices) do not divide the device count {num_devices}")
        sizes[rest[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"{desc}: sizes multiply to {math.prod(sizes.values())}, not to the device count {num_devices}"
        )
    return tuple(int(sizes[a]) for a in MESH_AXES)


def make_mesh(
    data: int = 1,
    fsdp: int = -1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh of `devices` (default: all), sizes as `mesh_shape` resolves them."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


# ----------------------------------------------------------------------------- rules


def path_to_str(path: Sequence[Any]) -> str:
    """'/'-joined path of a pytree key path; drops the `.value` of nnx Variables."""
    parts: list[str] = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts)


def match_rule(path: str, rules: Rules) -> P | None:
    """The spec of the first rule whose regex `re.search`-matches `path`, else None."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            return spec
    return None


def _axis_size(mesh: Mesh, entry: str | tuple[str, ...] | None) -> int:
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(mesh.shape[a] for a in names)


def spec_for(
    path: str,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Rules,
    *,
    error_on_unmatched: bool = False,
    rank_mismatch: str = "error",
) -> P:
    """PartitionSpec for one array, fitted to its shape and to the mesh.

    The rule's spec applies to the trailing dims (leading dims, e.g. a stacked
    layer axis, get None). A dim not divisible by its mesh axis size is replicated
    (and logged) instead of failing. `rank_mismatch` says what to do when the spec
    has more entries than the array has dims: "error" or "replicate" (used for
    optimizer states whose shapes differ from their parameter's, e.g. factored).
    """
    spec = match_rule(path, rules)
    if spec is None:
        if error_on_unmatched:
            raise ValueError(f"parameter {path!r} (shape {tuple(shape)}) matches no partition rule")
        return P()
    entries = tuple(spec)
    if len(entries) > len(shape):
        if rank_mismatch == "replicate":
            return P()
        raise ValueError(
            f"parameter {path!r}: rule spec {spec} has {len(entries)} dims but the array has shape {tuple(shape)}"
        )
    for entry in entries:
        for name in (entry,) if isinstance(entry, str) else (entry or ()):
            if name not in mesh.shape:
                raise ValueError(f"parameter {path!r}: spec {spec} names axis {name!r} not in mesh {dict(mesh.shape)}")
    entries = (None,) * (len(shape) - len(entries)) + entries
    fitted = []
    for dim, (size, entry) in enumerate(zip(shape, entries)):
        n = _axis_size(mesh, entry)
        if n > 1 and size % n:
            log.warning("replicating dim %d (size %d) of %s: not divisible by %s=%d", dim, size, path, entry, n)
            entry = None
        fitted.append(entry)
    while fitted and fitted[-1] is None:  # P("x", None) == P("x"); keep specs canonical
        fitted.pop()
    return P(*fitted)


def logical_to_shardings(
    state: Any,
    mesh: Mesh,
    rules: Rules,
    *,
    error_on_unmatched: bool = False,
    rank_mismatch: str = "error",
) -> Any:
    """Same pytree as `state` (nnx.State, dict, optax state...) with NamedSharding leaves.

    Leaves may be arrays or ShapeDtypeStructs. nnx Variables are kept as wrappers,
    so the result can be passed directly as `jax.jit(out_shardings=...)`.
    """

    def one(path, leaf):
        spec = spec_for(
            path_to_str(path),
            np.shape(leaf),
            mesh,
            rules,
            error_on_unmatched=error_on_unmatched,
            rank_mismatch=rank_mismatch,
        )
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, state)


def with_shardings(abstract_state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying their target sharding (a restore target for Orbax)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=s), abstract_state, shardings)


def placement(mesh: Mesh, rules: Rules) -> Callable[[str, tuple[int, ...]], NamedSharding]:
    """`(parameter path, shape) -> NamedSharding` by the rules: where a parameter made later goes (an adapter)."""
    return lambda path, shape: NamedSharding(mesh, spec_for(path, shape, mesh, rules))


# ----------------------------------------------------------------------------- creation


def create_sharded_module(
    constructor: Callable[[], nnx.Module], mesh: Mesh, rules: Rules, **rule_kwargs: Any
) -> nnx.Module:
    """Build an nnx module whose variables are created directly with their shardings.

    `constructor` must build the module deterministically (e.g. with nnx.Rngs(seed)).
    """
    abstract = nnx.eval_shape(constructor)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = logical_to_shardings(abstract_state, mesh, rules, **rule_kwargs)

    state = jax.jit(lambda: nnx.split(constructor())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- batches


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim over ("data", "fsdp"), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Global jax.Arrays from each process's local rows (numpy), batch dim sharded.

    Every process passes its own slice; the global batch is the concatenation over
    processes in process order. Works unchanged on a single process.
    """
    sharding = batch_sharding(mesh)
    n_batch_shards = _axis_size(mesh, BATCH_AXES)
    n_proc = jax.process_count()

    def one(path, x):
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError(f"batch field {path_to_str(path)!r} is a scalar; every field needs a batch dim")
        global_rows = x.shape[0] * n_proc
        if global_rows % n_batch_shards:
            raise ValueError(
                f"batch field {path_to_str(path)!r}: global batch {global_rows} "
                f"({x.shape[0]} rows x {n_proc} processes) is not divisible by data*fsdp={n_batch_shards}"
            )
        return jax.make_array_from_process_local_data(sharding, x, (global_rows, *x.shape[1:]))

    return jax.tree_util.tree_map_with_path(one, batch)


# ----------------------------------------------------------------------------- multi-host helpers
#
# Generation and scoring run the same prompts on every process (their inputs are
# identical host values), while the weights span every device of every process.


def replicated_like(tree: Any) -> NamedSharding | None:
    """A replicated sharding on the mesh of `tree`'s first leaf, or None if it has none."""
    leaf = jax.tree.leaves(tree)[0]
    sharding = getattr(leaf, "sharding", None)
    return NamedSharding(sharding.mesh, P()) if isinstance(sharding, NamedSharding) else None


def put_replicated(x: np.ndarray, sharding: NamedSharding | None) -> Any:
    """A host value that every process holds, as a global replicated array.

    On one process (or without a mesh) the value is returned as is and jit places it."""
    if sharding is None or sharding.is_fully_addressable:
        return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def batch_shards(mesh: Mesh) -> int:
    """How many ways `batch_sharding(mesh)` splits the rows (data x fsdp)."""
    return _axis_size(mesh, BATCH_AXES)


def row_placement(params: Any) -> tuple[Mesh | None, NamedSharding | None, int]:
    """Where a batch for these weights goes: their mesh, its rows split over ("data", "fsdp") as in training, and
    how many row shards that makes (None, None, 1 for weights on one device)."""
    replicated = replicated_like(params)
    if replicated is None:
        return None, None, 1
    return replicated.mesh, batch_sharding(replicated.mesh), batch_shards(replicated.mesh)


def call_on_rows(fn, mesh: Mesh | None, rows: NamedSharding | None, *arrays):
    """fn(*arrays), the host arrays (pytrees of them) split by rows as `row_placement` says and the call under the
    weights' mesh (splash attention runs inside shard_map over it); on one device, as they are."""
    placed = arrays if rows is None else jax.tree.map(lambda x: put_rows(x, rows), arrays)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        return fn(*placed)


def put_rows(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host value that every process holds, as a global array split by `sharding` (e.g. by rows): each
    process keeps only the part its devices hold."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) array on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def sync_processes(name: str) -> None:
    """Barrier across processes (e.g. after process 0 wrote a file the others read)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
