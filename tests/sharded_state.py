"""Sharded-state helpers the tests use to build states the way the library's loaders do."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from pl_dpo.sharding import Rules, logical_to_shardings


def create_sharded(init_fn: Callable[[], Any], mesh: Mesh, rules: Rules, **rule_kwargs: Any) -> Any:
    """Run a pure `init_fn() -> pytree` so that its outputs are born sharded."""
    abstract = jax.eval_shape(init_fn)
    shardings = logical_to_shardings(abstract, mesh, rules, **rule_kwargs)
    return jax.jit(init_fn, out_shardings=shardings)()


def create_sharded_optimizer(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Rules,
    wrt: Any = nnx.Param,
) -> nnx.Optimizer:
    """An nnx.Optimizer whose state (moments, counters) is created sharded like its params.

    Optimizer-state leaves whose rank differs from the rule (scalar counters,
    factored moments) are replicated.
    """
    graphdef, params = nnx.split(model)

    def build(model_state):
        return nnx.Optimizer(nnx.merge(graphdef, model_state), tx, wrt=wrt)

    opt_graphdef, abstract_opt = nnx.split(nnx.eval_shape(build, params))
    shardings = logical_to_shardings(abstract_opt, mesh, rules, rank_mismatch="replicate")
    opt_state = jax.jit(lambda s: nnx.split(build(s))[1], out_shardings=shardings)(params)
    return nnx.merge(opt_graphdef, opt_state)
