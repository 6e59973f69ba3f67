"""Hugging Face model folders <-> `Decoder`, with the `safetensors` numpy API (no torch at run time).

`from_pretrained` reads `config.json` and `model.safetensors` (or the shards listed in
`model.safetensors.index.json`), checks every tensor's presence and shape, stacks the per-layer tensors along the
layer axis, and places each parameter with an optional sharding. `save_pretrained` writes a folder that
`transformers.AutoModelForCausalLM.from_pretrained` (and vLLM / lm-evaluation-harness) loads.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from pl_dpo.models.config import DecoderConfig, from_hf_config, to_hf_config
from pl_dpo.models.decoder import Decoder

# our parameter path ('/'-joined) -> (Hugging Face name, "{i}" = layer index; transpose torch (out, in) -> (in, out))
_NAMES: dict[str, tuple[str, bool]] = {
    "embed/embedding": ("model.embed_tokens.weight", False),
    "final_norm/scale": ("model.norm.weight", False),
    "lm_head/kernel": ("lm_head.weight", True),
    "layers/input_norm/scale": ("model.layers.{i}.input_layernorm.weight", False),
    "layers/post_attn_norm/scale": ("model.layers.{i}.post_attention_layernorm.weight", False),
}
for _p in ("q_proj", "k_proj", "v_proj", "o_proj"):
    _NAMES[f"layers/attn/{_p}/kernel"] = (f"model.layers.{{i}}.self_attn.{_p}.weight", True)
    _NAMES[f"layers/attn/{_p}/bias"] = (f"model.layers.{{i}}.self_attn.{_p}.bias", False)
for _p in ("gate_proj", "up_proj", "down_proj"):
    _NAMES[f"layers/mlp/{_p}/kernel"] = (f"model.layers.{{i}}.mlp.{_p}.weight", True)


def hf_tensor(path: str) -> tuple[str, bool]:
    """(Hugging Face tensor name with "{i}" for the layer, whether it is stored transposed) of a parameter path."""
    return _NAMES[path]


def hf_module(path: str) -> str:
    """The Hugging Face module name of a projection's path ("layers/attn/q_proj" -> "model.layers.{i}.self_attn.q_proj")."""
    return _NAMES[f"{path}/kernel"][0].removesuffix(".weight")


_IGNORED = re.compile(r"(.*\.rotary_emb\.inv_freq)$")

Shardings = Callable[[str, tuple[int, ...]], jax.sharding.Sharding | None] | Any


def _path_str(path: tuple[Any, ...]) -> str:
    return "/".join(str(p) for p in path)


def _flat_params(state: nnx.State) -> list[tuple[str, Any]]:
    return [(_path_str(path), var) for path, var in nnx.to_flat_state(state)]


class ModelFolderError(ValueError):
    """A model folder a user gave cannot be read as a supported model; names the file and what is wrong."""


class TensorFileError(ModelFolderError):
    """A model folder's safetensors files are missing, damaged or incomplete; names the file."""


def read_hf_config(path: str, **numerics) -> DecoderConfig:
    """The DecoderConfig of the folder `path` (its config.json; `numerics` as `from_hf_config` takes them)."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise ModelFolderError(f"{cfg_file} does not exist")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            hf = json.load(f)
        return from_hf_config(hf, where=cfg_file, **numerics)
    except ValueError as e:  # not JSON; an unsupported model_type or field (from_hf_config names the file)
        message = str(e) if str(e).startswith(cfg_file) else f"{cfg_file}: {e}"
        raise ModelFolderError(message) from None


def _open(file: str):
    try:
        return safe_open(file, framework="numpy")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged headers
        raise TensorFileError(f"{file}: cannot read safetensors ({type(e).__name__}: {e})") from None


class TensorFiles:
    """Name -> file index over one or several safetensors files, read lazily one tensor at a time."""

    def __init__(self, folder: str):
        self.folder = folder
        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self.where = {name: os.path.join(folder, file) for name, file in weight_map.items()}
        elif os.path.exists(single):
            with _open(single) as f:
                self.where = {name: single for name in f.keys()}
        else:
            raise FileNotFoundError(f"{folder}: neither model.safetensors nor model.safetensors.index.json exists")
        self._open: dict[str, Any] = {}

    def get(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise TensorFileError(f"{self.folder}: tensor {name!r} is missing from the model's safetensors files")
        file = self.where[name]
        if file not in self._open:
            self._open[file] = _open(file).__enter__()
        try:
            return self._open[file].get_tensor(name)
        except Exception as e:  # noqa: BLE001 - a truncated file fails only when its tensor is read
            raise TensorFileError(f"{file}: cannot read tensor {name!r} ({type(e).__name__}: {e})") from None

    def close(self) -> None:
        for handle in self._open.values():
            handle.__exit__(None, None, None)


def _flat_shardings(tree: Any) -> dict[str, jax.sharding.Sharding]:
    """'/'-joined parameter path -> Sharding, from a pytree shaped like `nnx.state(model)` (Variables or not)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]
    out = {}
    for path, leaf in leaves:
        keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]
        out["/".join(str(k) for k in keys if k != "value")] = leaf
    return out


def _sharding_for(shardings: Shardings, path: str, shape: tuple[int, ...], flat: dict[str, Any]):
    if shardings is None:
        return None
    if callable(shardings):
        return shardings(path, shape)
    return flat.get(path)


def from_pretrained(
    path: str,
    *,
    param_dtype: str = "float32",
    compute_dtype: str = "float32",
    remat: str = "none",
    attention_impl: str = "einsum",
    shardings: Shardings = None,
) -> Decoder:
    """Loads a local Hugging Face folder. `shardings`: None (default device), a callable
    `(param_path, shape) -> Sharding`, or a pytree like `nnx.state(model)` whose leaves are Shardings."""
    config = read_hf_config(
        path, param_dtype=param_dtype, compute_dtype=compute_dtype, remat=remat, attention_impl=attention_impl
    )
    abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat_shardings = {} if shardings is None or callable(shardings) else _flat_shardings(shardings)
    files = TensorFiles(path)
    used: set[str] = set()
    try:
        values = {}
        for pth, var in _flat_params(state):
            hf_name, transpose = _NAMES[pth]
            stacked = pth.startswith("layers/")
            names = [hf_name.format(i=i) for i in range(config.num_layers)] if stacked else [hf_name]
            want = var.shape[1:] if stacked else var.shape
            tensors = []
            want_raw = tuple(want[::-1]) if transpose else tuple(want)
            for name in names:
                t = files.get(name)
                if tuple(t.shape) != want_raw:
                    raise ValueError(
                        f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected {want_raw} from config.json"
                    )
                tensors.append((t.T if transpose else t).astype(jnp.dtype(param_dtype)))
                used.add(name)
            value = np.stack(tensors) if stacked else tensors[0]
            sharding = _sharding_for(shardings, pth, value.shape, flat_shardings)
            if sharding is None:
                values[pth] = jax.device_put(value)
            else:  # each device (and each host) takes only its own slice
                values[pth] = jax.make_array_from_callback(value.shape, sharding, lambda idx, v=value: v[idx])
    finally:
        files.close()
    unexpected = sorted(
        n
        for n in files.where
        if n not in used and not _IGNORED.match(n) and not (n == "lm_head.weight" and config.tie_word_embeddings)
    )
    if unexpected:
        raise ValueError(
            f"{path}: tensors not used by a {config.model_type} model with this config.json "
            f"(wrong architecture or config?): {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    for pth, var in _flat_params(state):
        var.set_value(values[pth])
    return nnx.merge(graphdef, state)


def to_host(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def save_pretrained(model: Decoder, path: str, *, dtype: str | None = None) -> None:
    """Writes `config.json`, `generation_config.json` and `model.safetensors` (parameter dtype unless `dtype`).
    Every process must call it (gathering sharded arrays is collective); only process 0 writes."""
    config: DecoderConfig = model.config
    dtype = dtype or config.param_dtype
    tensors: dict[str, np.ndarray] = {}
    for pth, var in _flat_params(nnx.state(model, nnx.Param)):
        hf_name, transpose = _NAMES[pth]
        value = to_host(var[...]).astype(jnp.dtype(dtype))
        parts = list(value) if pth.startswith("layers/") else [value]
        for i, part in enumerate(parts):
            tensors[hf_name.format(i=i)] = np.ascontiguousarray(part.T if transpose else part)
    if jax.process_index() != 0:
        return
    os.makedirs(path, exist_ok=True)
    hf = to_hf_config(config.replace(param_dtype=dtype))
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": hf["eos_token_id"]}
    # Each file is written under a temporary name and renamed, so a crash never leaves a half-written file behind.
    for name, write in (
        ("model.safetensors", lambda f: save_file(tensors, f, metadata={"format": "pt"})),
        ("config.json", lambda f: _write_json(hf, f)),
        ("generation_config.json", lambda f: _write_json(generation, f)),
    ):
        tmp = os.path.join(path, f".{name}.tmp")
        write(tmp)
        os.replace(tmp, os.path.join(path, name))


def _write_json(obj: dict[str, Any], file: str) -> None:
    with open(file, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
