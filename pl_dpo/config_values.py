"""Plain values of a config: ConfigDicts as dicts, dotted lookups and overrides (what `--config.a.b=v` does).

No jax and no pl_dpo imports, so that the workdir check and the experiments' scripts can use them cheaply;
`pl_dpo.config_lib` re-exports them.
"""

from __future__ import annotations

import ast
import copy
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections


def plain(value: Any) -> Any:
    """ConfigDicts (also inside lists, which `to_dict()` leaves alone) as plain dicts and lists."""
    if isinstance(value, (ml_collections.ConfigDict, Mapping)):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


MISSING = "<missing>"


def lookup(cfg: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted key (`loss.K`) of a config or plain dict; MISSING if absent."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, (Mapping, ml_collections.ConfigDict)) or part not in node:
            return MISSING
        node = node[part]
    return node


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of `config` with dotted fields set (what `--config.a.b=v` does), checking each exists."""
    config = copy.deepcopy(config)  # to_dict() would share the ConfigDicts inside lists (assistants)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            if p not in node:
                raise KeyError(f"override {key!r}: the config has no field {p!r}")
            node = node[p]
        if leaf not in node:
            raise KeyError(f"override {key!r}: the config has no field {leaf!r}")
        node[leaf] = value
    return config


def parse_flag_overrides(config: ml_collections.ConfigDict, flags: Sequence[str]) -> dict[str, Any]:
    """`["--config.rounds.num=2", ...]` as {dotted key: value}, each value parsed like the field's
    current value (as ml_collections' config flags do: ints, floats, bools, tuples, strings)."""
    out = {}
    for flag in flags:
        key, eq, text = flag.removeprefix("--config.").partition("=")
        current = lookup(config, key)
        if not eq or current is MISSING:
            raise KeyError(f"{flag!r}: expected --config.<existing field>=<value>")
        if isinstance(current, str):
            out[key] = text
        elif isinstance(current, bool):
            if text.lower() not in ("true", "false"):
                raise ValueError(f"{flag!r}: expected True or False")
            out[key] = text.lower() == "true"
        else:
            value = ast.literal_eval(text)
            if isinstance(current, float) and isinstance(value, int):
                value = float(value)
            elif isinstance(current, int) and not isinstance(value, int):
                raise ValueError(f"{flag!r}: expected an integer")
            out[key] = value
    return out
