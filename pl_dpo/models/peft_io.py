"""LoRA adapters <-> PEFT adapter folders (`adapter_config.json`, `adapter_model.safetensors`), without torch.

PEFT's names and layouts, which `peft.PeftModel.from_pretrained` and vLLM's LoRA loader read:

    base_model.model.model.layers.<i>.self_attn.q_proj.lora_A.weight    [r, in]
    base_model.model.model.layers.<i>.self_attn.q_proj.lora_B.weight    [out, r]

pl_dpo holds them stacked and transposed (`lora_a` [L, in, r], `lora_b` [L, r, out]; `pl_dpo.models.lora`).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from pl_dpo.models import lora as lora_lib
from pl_dpo.models.hf_io import hf_module, to_host

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."
_TENSOR = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


def adapter_tensors(model) -> dict[str, np.ndarray]:
    """The model's adapters by PEFT name, on the host (float32). Every process must call it: gathering sharded
    adapters is collective."""
    tensors: dict[str, np.ndarray] = {}
    for path, (a, b, _) in lora_lib.adapters(model).items():
        a, b = to_host(a).astype(np.float32), to_host(b).astype(np.float32)
        stacked = path.startswith("layers/")
        for i, (a_i, b_i) in enumerate(zip(a, b) if stacked else [(a, b)]):
            name = _PREFIX + hf_module(path).format(i=i)
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a_i.T)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b_i.T)
    return tensors


def write_peft_adapter(folder: str, tensors: dict[str, np.ndarray], lora: lora_lib.LoraConfig, base_model: str) -> None:
    """Writes `adapter_tensors` as a PEFT folder; `base_model` names the weights they adapt."""
    modules = sorted({_TENSOR.match(name)["module"].rsplit(".", 1)[-1] for name in tensors})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "use_rslora": lora.rslora,
        "target_modules": modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def save_peft_adapter(model, folder: str, lora: lora_lib.LoraConfig, base_model: str) -> None:
    """`adapter_tensors` + `write_peft_adapter` (process 0 writes). Every process must call it."""
    tensors = adapter_tensors(model)
    if jax.process_index() == 0:
        write_peft_adapter(folder, tensors, lora, base_model)


def read_peft_config(folder: str) -> lora_lib.LoraConfig:
    """The LoraConfig of a PEFT folder (its rank, alpha, rsLoRA; targets: the modules it adapts)."""
    file = os.path.join(folder, CONFIG_FILE)
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise lora_lib.LoraError(f"{file}: cannot read a PEFT adapter config ({type(e).__name__}: {e})") from None
    if config.get("peft_type") != "LORA":
        raise lora_lib.LoraError(f"{file}: peft_type={config.get('peft_type')!r}, only LORA adapters load")
    modules = config.get("target_modules") or []
    modules = [modules] if isinstance(modules, str) else modules
    return lora_lib.LoraConfig(
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        rslora=bool(config.get("use_rslora", False)),
        targets="(" + "|".join(re.escape(m) for m in modules) + ")$",
    )


def load_peft_adapter(model, folder: str, shardings=None) -> lora_lib.LoraConfig:
    """Puts a PEFT folder's adapters on the model (in place, placed by `shardings(path, shape)`); returns its
    LoraConfig. Every tensor must name a projection of the model with the model's shapes: a mismatch names it."""
    lora = read_peft_config(folder)
    file = os.path.join(folder, WEIGHTS_FILE)
    by_name = {hf_module(p): (p, m) for p, m in lora_lib.projections(model).items()}
    found: dict[str, dict[str, Any]] = {}
    try:
        handle = safe_open(file, framework="numpy")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise lora_lib.LoraError(f"{file}: cannot read safetensors ({type(e).__name__}: {e})") from None
    with handle as f:
        for name in f.keys():
            match = _TENSOR.match(name)
            module = match and re.sub(r"\.layers\.(\d+)\.", ".layers.{i}.", match["module"])
            if not match or module not in by_name:
                raise lora_lib.LoraError(f"{file}: tensor {name!r} names no projection of the model")
            layer = re.search(r"\.layers\.(\d+)\.", match["module"])
            found.setdefault(module, {})[(match["which"], int(layer[1]) if layer else 0)] = (name, f.get_tensor(name))
    for module, tensors in sorted(found.items()):
        path, linear = by_name[module]
        *stack, d_in, d_out = linear.kernel.shape
        num_layers = stack[0] if stack else 1
        parts = {"A": [], "B": []}
        for which, want in (("A", (lora.rank, d_in)), ("B", (d_out, lora.rank))):
            for i in range(num_layers):
                if (which, i) not in tensors:
                    raise lora_lib.LoraError(
                        f"{file}: tensor {_PREFIX}{module.format(i=i)}.lora_{which}.weight is missing"
                    )
                name, value = tensors[(which, i)]
                if tuple(value.shape) != want:
                    raise lora_lib.LoraError(
                        f"{file}: tensor {name!r} has shape {tuple(value.shape)}, the model needs {want} (rank {lora.rank})"
                    )
                parts[which].append(np.asarray(value, np.float32).T)
        a, b = (np.stack(parts[w]) if stack else parts[w][0] for w in ("A", "B"))
        lora_lib.set_adapter(linear, a, b, lora.scale, path, shardings)
    if not found:
        raise lora_lib.LoraError(f"{file}: holds no LoRA tensors")
    return lora
