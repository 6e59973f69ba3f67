"""Subprocess worker for tests/test_checkpoint.py (run as a script, never imported by pytest).

Modes:
  train  one process; trains a tiny model with TrainCheckpoints, resumable; prints
         `step N` after each step, `preempted N` on SIGTERM, writes final params (npz).
  dist   one of 2 JAX processes (jax.distributed on localhost, CPU, gloo); saves and
         restores sharded state with Orbax to a shared dir and checks the values.
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from sharded_state import create_sharded_optimizer

from pl_dpo import sharding as shd
from pl_dpo.training import checkpoint as ckpt_lib

D, F = 8, 16


class TinyMlp(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up_proj = nnx.Linear(D, F, rngs=rngs)
        self.down_proj = nnx.Linear(F, D, rngs=rngs)
        self.final_norm = nnx.RMSNorm(D, rngs=rngs)

    def __call__(self, x):
        return self.final_norm(self.down_proj(jax.nn.gelu(self.up_proj(x))))


def batch_for(step: int, seed: int) -> np.ndarray:
    """The data position is the step: resuming at step s reads exactly batch s."""
    return np.random.default_rng([seed, step]).normal(size=(4, D)).astype(np.float32)


def make_train_step(gdef, odef):
    def loss_fn(model, x):
        return jnp.mean((model(x) - jnp.roll(x, 1, axis=-1)) ** 2)

    def step(mstate, ostate, x):
        model, opt = nnx.merge(gdef, mstate), nnx.merge(odef, ostate)
        loss, grads = nnx.value_and_grad(loss_fn)(model, x)
        opt.update(model, grads)
        return nnx.state(model), nnx.state(opt), loss

    return jax.jit(step, donate_argnums=(0, 1))


def run_train(args) -> None:
    mesh = shd.make_mesh()
    rules = shd.DEFAULT_DECODER_RULES
    model = shd.create_sharded_module(lambda: TinyMlp(nnx.Rngs(0)), mesh, rules)
    opt = create_sharded_optimizer(model, optax.adam(1e-2), mesh, rules)
    gdef, mstate = nnx.split(model)
    odef, ostate = nnx.split(opt)
    ckpt = ckpt_lib.TrainCheckpoints(args.dir, save_every_steps=args.save_every, max_to_keep=2)
    ckpt.install_sigterm_handler()
    start = 0
    restored = ckpt.restore_latest(mstate, ostate)
    if restored is not None:
        start, mstate, ostate, extra = restored
        assert extra == {"data_pos": start, "seed": args.seed}, extra
        print(f"resumed {start}", flush=True)
    step_fn = make_train_step(gdef, odef)
    for step in range(start, args.steps):
        mstate, ostate, _ = step_fn(mstate, ostate, batch_for(step, args.seed))
        ckpt.maybe_save(step + 1, mstate, ostate, {"data_pos": step + 1, "seed": args.seed})
        print(f"step {step + 1}", flush=True)
        if ckpt.preemption.should_exit:
            ckpt.close()
            print(f"preempted {ckpt.preemption.saved_step}", flush=True)
            return
        time.sleep(args.sleep)
    ckpt.maybe_save(args.steps, mstate, ostate, {"data_pos": args.steps, "seed": args.seed}, force=True)
    ckpt.close()
    flat = {shd.path_to_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(mstate)[0]}
    np.savez(args.out, **flat)
    print("done", flush=True)


def _check_local_shards(arr: jax.Array, full: np.ndarray, what: str) -> None:
    for s in arr.addressable_shards:
        np.testing.assert_array_equal(np.asarray(s.data), full[s.index], err_msg=what)


def run_dist(args) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{args.port}", num_processes=2, process_id=args.process_id
    )
    assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.device_count())
    rules = shd.DEFAULT_DECODER_RULES
    mesh = shd.make_mesh(1, 2, 2)
    model = shd.create_sharded_module(lambda: TinyMlp(nnx.Rngs(0)), mesh, rules)
    params = nnx.state(model, nnx.Param)
    up = params["up_proj"]["kernel"].get_value()
    assert up.sharding.spec == P("fsdp", "tensor") and not up.is_fully_addressable
    # The reference: the same deterministic init, unsharded, on this process's CPU.
    with jax.default_device(jax.local_devices()[0]):
        ref = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(TinyMlp(nnx.Rngs(0)), nnx.Param)))

    # Round policy: save from all processes, restore onto a different layout.
    rounds = ckpt_lib.PolicyCheckpoints(os.path.join(args.dir, "policies"))
    rounds.save(0, params, {"round": 0, "mode": "spin"})
    other_mesh = shd.make_mesh(1, 4, 1)
    target = shd.with_shardings(params, shd.logical_to_shardings(params, other_mesh, rules))
    restored = rounds.restore(0, target)
    r_up = restored["up_proj"]["kernel"].get_value()
    assert r_up.sharding.mesh.shape["fsdp"] == 4 and r_up.sharding.spec == P("fsdp", "tensor"), r_up.sharding
    assert r_up.addressable_shards[0].data.shape == (D // 4, F)
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(restored))[0]:
        name = shd.path_to_str(path)
        full = ref[name.split("/")[0]][name.split("/")[1]]
        _check_local_shards(leaf, full, name)
    assert rounds.metadata(0) == {"round": 0, "mode": "spin"}
    assert rounds.latest_round() == 0

    # Train state with optimizer, plus a batch built from per-process rows.
    opt = create_sharded_optimizer(model, optax.adam(1e-2), mesh, rules)
    ostate = nnx.state(opt)
    train = ckpt_lib.TrainCheckpoints(os.path.join(args.dir, "train"), save_every_steps=1)
    train.maybe_save(1, params, ostate, {"data_pos": 1})
    train.wait_until_finished()
    step, p2, o2, extra = train.restore_latest(params, ostate)
    assert step == 1 and extra == {"data_pos": 1}, (step, extra)
    mu = o2["opt_state"][0]["mu"]["up_proj"]["kernel"].get_value()
    assert mu.sharding.spec == P("fsdp", "tensor")
    _check_local_shards(p2["up_proj"]["kernel"].get_value(), ref["up_proj"]["kernel"], "train params")
    train.close()

    rows = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    local = rows[4 * args.process_id : 4 * (args.process_id + 1)]
    batch = shd.shard_batch({"x": local}, mesh)["x"]
    assert batch.shape == (8, 3)
    total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))(batch)  # cross-process
    assert float(total) == float(rows.sum()), (float(total), rows.sum())
    print(f"OK {args.process_id}", flush=True)
    jax.distributed.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["train", "dist"])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--save-every", type=int, default=2)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--process-id", type=int, default=0)
    args = ap.parse_args()
    (run_train if args.mode == "train" else run_dist)(args)


if __name__ == "__main__":
    sys.exit(main())
