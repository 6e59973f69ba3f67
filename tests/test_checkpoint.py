"""Round policies, mid-round train state, atomicity, SIGKILL/SIGTERM, 2-process Orbax, workdir config."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import free_port, jax_env
from jax.sharding import PartitionSpec as P
from sharded_state import create_sharded_optimizer

from pl_dpo import sharding as shd
from pl_dpo.training import checkpoint as ck
from pl_dpo.workdir import agreement

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multiprocess_ckpt_worker.py"
pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


class Small(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(32, 8, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(8, 16, rngs=rngs) for _ in range(2)])
        self.lm_head = nnx.Linear(8, 32, use_bias=False, rngs=rngs)


RULES = [(r"layers/\d+/kernel$", P("fsdp", "tensor")), *shd.DEFAULT_DECODER_RULES]


def _bits(tree):
    """Every leaf as raw bytes: equality means bit-identical."""
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _abstract(state, mesh):
    return shd.with_shardings(state, shd.logical_to_shardings(state, mesh, RULES))


# ----------------------------------------------------------------------------- rounds


def test_round_policy_restores_bit_identically_onto_new_shardings(tmp_path):
    mesh8 = shd.make_mesh(2, 2, 2)
    model = shd.create_sharded_module(lambda: Small(nnx.Rngs(1)), mesh8, RULES)
    params = nnx.state(model, nnx.Param)
    rounds = ck.PolicyCheckpoints(tmp_path / "policies")
    assert rounds.latest_round() is None and rounds.all_rounds() == []
    rounds.save(0, params, {"round": 0, "mode": "spin", "T": 0.1})
    bumped = jax.tree.map(lambda x: x + 1, params)
    rounds.save(1, bumped, {"round": 1})
    assert rounds.all_rounds() == [0, 1] and rounds.latest_round() == 1
    with pytest.raises(FileExistsError, match="round 1"):
        rounds.save(1, bumped, {})

    # A fresh manager (a new run on the same workdir) restores onto another mesh.
    again = ck.PolicyCheckpoints(tmp_path / "policies")
    mesh4 = shd.make_mesh(1, 4, 1, devices=jax.devices()[:4])
    target = _abstract(nnx.state(nnx.eval_shape(lambda: Small(nnx.Rngs(1))), nnx.Param), mesh4)
    r0 = again.restore(0, target)
    assert isinstance(r0, nnx.State)
    assert _bits(r0) == _bits(params)
    assert _bits(again.restore(1, target)) == _bits(bumped)
    k = r0["layers"][0]["kernel"].get_value()
    assert k.sharding.mesh.devices.size == 4 and k.addressable_shards[0].data.shape == (2, 16)
    assert again.metadata(0) == {"round": 0, "mode": "spin", "T": 0.1}
    with pytest.raises(FileNotFoundError, match="round 5.*have \\[0, 1\\]"):
        again.restore(5, target)
    # Plain pytrees (not nnx.State) work the same way.
    pure = nnx.to_pure_dict(params)
    again.save(2, pure, {})
    assert _bits(again.restore(2, _abstract(pure, mesh8))) == _bits(pure)


def test_restore_target_without_sharding_is_a_clear_error(tmp_path):
    rounds = ck.PolicyCheckpoints(tmp_path / "policies")
    rounds.save(0, {"w": jnp.ones((4, 4))}, {})
    with pytest.raises(ValueError, match="round 0.*'w' has no sharding"):
        rounds.restore(0, {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32)})


# ----------------------------------------------------------------------------- train state


def _train_state(mesh):
    model = shd.create_sharded_module(lambda: Small(nnx.Rngs(0)), mesh, RULES)
    opt = create_sharded_optimizer(model, optax.adamw(1e-3), mesh, RULES)
    return nnx.state(model), nnx.state(opt)


def test_train_checkpoints_interval_keep_and_restore(tmp_path):
    mesh = shd.make_mesh(2, 2, 2)
    params, opt_state = _train_state(mesh)
    tc = ck.TrainCheckpoints(tmp_path / "train", save_every_steps=2, max_to_keep=2)
    assert tc.restore_latest(params, opt_state) is None
    saved = [tc.maybe_save(s, params, opt_state, {"data_pos": s, "rng": [0, s]}) for s in range(1, 7)]
    assert saved == [False, True, False, True, False, True]
    assert tc.maybe_save(7, params, opt_state, {"data_pos": 7, "rng": [0, 7]}, force=True)
    tc.wait_until_finished()
    assert sorted(p.name for p in (tmp_path / "train").iterdir() if p.name.isdigit()) == ["6", "7"]
    tc.close()

    step, p2, o2, extra = ck.TrainCheckpoints(tmp_path / "train", 2).restore_latest(params, opt_state)
    assert step == 7 and extra == {"data_pos": 7, "rng": [0, 7]}
    assert _bits(p2) == _bits(params) and _bits(o2) == _bits(opt_state)
    mu = o2["opt_state"][0]["mu"]["layers"][1]["kernel"].get_value()
    assert mu.sharding.spec == P("fsdp", "tensor")


def test_sigterm_flag_in_process_and_handler_restored(tmp_path):
    mesh = shd.make_mesh(2, 2, 2)
    params, opt_state = _train_state(mesh)
    before = signal.getsignal(signal.SIGTERM)
    tc = ck.TrainCheckpoints(tmp_path / "train", save_every_steps=100)
    tc.install_sigterm_handler()
    assert not tc.should_save(1) and not tc.maybe_save(1, params, opt_state, {})
    os.kill(os.getpid(), signal.SIGTERM)  # handled: sets the flag, the process lives on
    time.sleep(0.05)
    assert tc.preemption.requested and not tc.preemption.should_exit
    assert signal.getsignal(signal.SIGTERM) is before  # a second SIGTERM would act as before
    assert tc.should_save(2)
    assert tc.maybe_save(2, params, opt_state, {"data_pos": 2})
    assert tc.preemption.should_exit and tc.preemption.saved_step == 2 and tc.latest_step() == 2
    tc.install_sigterm_handler()
    tc.close()
    assert signal.getsignal(signal.SIGTERM) is before


def test_half_written_checkpoints_are_never_latest(tmp_path):
    mesh = shd.make_mesh(2, 2, 2)
    params, opt_state = _train_state(mesh)
    d = tmp_path / "train"
    tc = ck.TrainCheckpoints(d, save_every_steps=1, max_to_keep=5)
    tc.maybe_save(2, params, opt_state, {"data_pos": 2})
    tc.close()
    # (a) an Orbax tmp dir left by a killed save, with some files in it
    (d / "4.orbax-checkpoint-tmp" / "params").mkdir(parents=True)
    (d / "5.orbax-checkpoint-tmp-1795673467" / "params").mkdir(parents=True)
    # (b) a step dir with data but no commit metadata (a non-atomic filesystem)
    (d / "6" / "params").mkdir(parents=True)
    # (c) a step dir whose metadata has no commit timestamp
    (d / "8" / "params").mkdir(parents=True)
    (d / "8" / "_CHECKPOINT_METADATA").write_text(json.dumps({"commit_timestamp_nsecs": None}))

    tc = ck.TrainCheckpoints(d, save_every_steps=1, max_to_keep=5)
    assert tc.latest_step() == 2
    step, *_, extra = tc.restore_latest(params, opt_state)
    assert step == 2 and extra == {"data_pos": 2}
    names = {p.name for p in d.iterdir()}
    assert "6" not in names and "8" not in names and not any("orbax-checkpoint-tmp" in n for n in names)
    assert any(n.startswith("6.incomplete-") for n in names)  # moved aside, not deleted
    # Later saves are not blocked by the stale higher-numbered dirs.
    assert tc.maybe_save(3, params, opt_state, {"data_pos": 3})
    tc.wait_until_finished()
    assert tc.latest_step() == 3
    tc.close()


# ----------------------------------------------------------------------------- real subprocesses


def _env(n_devices: int) -> dict:
    return jax_env(n_devices, PYTHONPATH=str(REPO))  # the worker runs as a script, from tests/


def _worker(*args, n_devices=2):
    return [sys.executable, str(WORKER), *map(str, args)]


def _run(cmd, timeout=120):
    res = subprocess.run(cmd, env=_env(2), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    return res.stdout


def _wait_for_line(proc, prefix: str, timeout: float = 60.0) -> list[str]:
    seen, t0 = [], time.time()
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line.strip())
        if line.startswith(prefix):
            return seen
    raise AssertionError(f"never saw {prefix!r}; got {seen}")


@pytest.mark.slow  # subprocesses killed and resumed (~9 s)
def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path):
    steps, every = 12, 2
    proc = subprocess.Popen(
        _worker(
            "train",
            "--dir",
            tmp_path / "killed",
            "--steps",
            steps,
            "--save-every",
            every,
            "--sleep",
            0.05,
            "--out",
            tmp_path / "killed.npz",
        ),
        env=_env(2),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    # Killed right after step 6's async save started: its Orbax tmp dir is (almost always)
    # still being written, which is the case this test is about.
    seen = _wait_for_line(proc, "step 6")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and "done" not in seen
    in_flight = (tmp_path / "killed" / "6.orbax-checkpoint-tmp").exists()

    # What a restart finds: the last committed step, never a partial one.
    tc = ck.TrainCheckpoints(tmp_path / "killed", save_every_steps=every)
    latest = tc.latest_step()
    assert latest == (4 if in_flight else 6), (latest, in_flight)
    tc.close()

    resumed = _run(
        _worker(
            "train",
            "--dir",
            tmp_path / "killed",
            "--steps",
            steps,
            "--save-every",
            every,
            "--out",
            tmp_path / "killed.npz",
        )
    )
    assert f"resumed {latest}" in resumed
    _run(
        _worker(
            "train",
            "--dir",
            tmp_path / "clean",
            "--steps",
            steps,
            "--save-every",
            every,
            "--out",
            tmp_path / "clean.npz",
        )
    )
    a, b = np.load(tmp_path / "killed.npz"), np.load(tmp_path / "clean.npz")
    assert sorted(a.files) == sorted(b.files) and len(a.files) > 0
    for name in a.files:  # same seed, same data positions: bit-identical
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_sigterm_saves_at_next_step_and_exits_cleanly(tmp_path):
    proc = subprocess.Popen(
        _worker(
            "train",
            "--dir",
            tmp_path / "t",
            "--steps",
            1000,
            "--save-every",
            1000,
            "--sleep",
            0.05,
            "--out",
            tmp_path / "t.npz",
        ),
        env=_env(2),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    _wait_for_line(proc, "step 3")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    saved = int(next(l for l in out.splitlines() if l.startswith("preempted")).split()[1])
    assert 3 < saved < 1000
    tc = ck.TrainCheckpoints(tmp_path / "t", save_every_steps=1000)
    assert tc.latest_step() == saved  # not on the 1000-step interval: saved because of SIGTERM
    tc.close()


@pytest.mark.slow  # two JAX processes (~7 s)
def test_two_jax_processes_save_and_restore_sharded_state(tmp_path):
    port = free_port()
    procs = [
        subprocess.Popen(
            _worker("dist", "--dir", tmp_path, "--port", port, "--process-id", i),
            env=_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"OK {i}" in out, f"process {i}:\n{out}\n{err[-3000:]}"
    # Both processes wrote their shards into the one shared checkpoint.
    assert {q.name for q in (tmp_path / "policies" / "0" / "params").glob("ocdbt.process_*")} == {
        "ocdbt.process_0",
        "ocdbt.process_1",
    }


# ----------------------------------------------------------------------------- workdir config


def test_check_workdir_config(tmp_path):
    cfg = {"mode": "spin", "loss": {"K": 2, "T": 0.1}, "model": "tiny", "lr": 1e-3, "mesh": (1, -1, 1)}
    keys = ["mode", "loss.K", "model", "mesh"]
    agreement.check_workdir_config(tmp_path, cfg, keys)
    assert json.loads((tmp_path / "config.json").read_text())["loss"]["K"] == 2
    agreement.check_workdir_config(tmp_path, {**cfg, "lr": 5e-4, "mesh": [1, -1, 1]}, keys)  # lr may change
    with pytest.raises(agreement.WorkdirConfigMismatch, match="'loss.K' was 2, now 3"):
        agreement.check_workdir_config(tmp_path, {**cfg, "loss": {"K": 3, "T": 0.1}}, keys)
    with pytest.raises(agreement.WorkdirConfigMismatch, match="'mode' was 'spin', now 'asft'"):
        agreement.check_workdir_config(tmp_path, {**cfg, "mode": "asft"}, keys)
    with pytest.raises(agreement.WorkdirConfigMismatch, match="'model' was 'tiny', now '<missing>'"):
        agreement.check_workdir_config(tmp_path, {k: v for k, v in cfg.items() if k != "model"}, keys)


def _largest_file(folder):
    files = [p for p in folder.rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def _damage(step_dir, damage: str) -> None:
    if damage == "delete_extra":
        (step_dir / "extra" / "metadata").unlink()
        return
    target = _largest_file(step_dir / "params" / "d")  # the arrays' data (the merged OCDBT store)
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "zero":
        target.write_bytes(bytes(len(data)))
    elif damage == "flip":
        target.write_bytes(data[:64] + bytes(b ^ 0xFF for b in data[64:128]) + data[128:])
    else:
        target.unlink()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    _run(_worker("train", "--dir", root / "train", "--steps", 6, "--save-every", 2, "--out", root / "final.npz"))
    return np.load(root / "final.npz")


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "zero", "flip", "delete", "delete_extra"])
def test_damaged_latest_train_state_falls_back_and_ends_as_uninterrupted(tmp_path, damage, uninterrupted):
    """Real files written by another process (no in-process cache can hide the damage)."""
    d = tmp_path / "train"
    _run(_worker("train", "--dir", d, "--steps", 6, "--save-every", 2, "--out", tmp_path / "first.npz"))
    _damage(d / "6", damage)
    resumed = _run(_worker("train", "--dir", d, "--steps", 6, "--save-every", 2, "--out", tmp_path / "final.npz"))
    assert "resumed 4" in resumed  # step 6 does not restore: the step before it does
    names = {p.name for p in d.iterdir()}
    assert any(n.startswith("6.damaged-") for n in names) and "6" in names  # kept aside; 6 saved anew
    final = np.load(tmp_path / "final.npz")
    assert sorted(final.files) == sorted(uninterrupted.files)
    for k in final.files:
        np.testing.assert_array_equal(final[k], uninterrupted[k])
