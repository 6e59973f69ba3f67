"""The self-play job end to end, in real subprocesses: demo, resume after SIGKILL, reference identity."""

import json
import os
import signal
import subprocess

import jax
import numpy as np
import pytest
from helpers import wait_for

from configs import demo
from pl_dpo import config_lib, scoring, sharding
from pl_dpo.data import load_ranked_set
from pl_dpo.selfplay import rounds
from pl_dpo.training import checkpoint, train
from pl_dpo.workdir import plots
from pl_dpo.workdir.agreement import WorkdirConfigMismatch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Shortened demo: 2 rounds of SPIN and aSFT, 2 epochs = 24 steps a round, a checkpoint every 3 steps.
OVERRIDES = [
    "--config.rounds.num=2",
    "--config.rounds.epochs=2",
    "--config.rounds.max_steps=24",
    "--config.checkpoint.save_every_steps=3",
    # test_reference_logps_are_the_restored_round_policy reads the final train state of a round.
    "--config.checkpoint.keep_train_state=True",
]


def load_config(*overrides):
    config = demo.get_config("quick")
    return config_lib.apply_overrides(config, config_lib.parse_flag_overrides(config, OVERRIDES + list(overrides)))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, main_command):
    root = tmp_path_factory.mktemp("rounds")
    workdir = str(root / "reference")
    proc = main_command.run(workdir, *OVERRIDES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, workdir, proc.stdout


def restore_params(workdir, lineage, index, *overrides):
    config = load_config(*overrides)
    sp = rounds.SelfPlay(config, workdir)
    model = sp.policies.restore(lineage, config.model, index)
    return sp, model


@pytest.mark.slow
def test_demo_runs_end_to_end(reference_run):
    _, workdir, stdout = reference_run
    for row in ("| sft |", "| spin round 1 |", "| spin round 2 |", "| asft round 1 |", "| asft round 2 |"):
        assert row in stdout
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    phases = {r["phase"] for r in records}
    assert {"sft", "assistant_0", "spin/round_0", "spin/round_1", "asft/round_0", "eval/spin"} <= phases
    train = [r for r in records if r["phase"] == "asft/round_0"]
    assert len(train) == 24 and len(train[0]["scores_K"]) == 3 and "pairwise_accuracy" in train[0]
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert os.path.getsize(os.path.join(workdir, "results.png")) > 10_000


def test_arm_curves_start_at_the_sft_row():
    table = [
        {"policy": "sft", "arm": "sft", "round": 0, "exact_match": 0.1},
        {"policy": "spin round 1", "arm": "spin", "round": 1, "exact_match": 0.2},
        {"policy": "asft round 1", "arm": "asft", "round": 1, "exact_match": 0.3},
        {"policy": "spin round 2", "arm": "spin", "round": 2, "exact_match": 0.4},
    ]
    assert plots.arm_curves(table, "exact_match") == {
        "spin": ([0, 1, 2], [0.1, 0.2, 0.4]),
        "asft": ([0, 1], [0.1, 0.3]),
    }
    assert plots.arm_curves(table, "answer_logp") == {}


@pytest.mark.slow
def test_reference_logps_are_the_restored_round_policy(reference_run):
    """Round t's stored reference log-probs equal scoring its ranked set with the saved
    πθ(t) restored from disk, bit for bit; round 1 starts from exactly policy 1."""
    _, workdir, _ = reference_run
    sp, policy1 = restore_params(workdir, "spin", 1)
    arrays = load_ranked_set(os.path.join(workdir, "spin", "round_1", "ranked.npz"))
    again = scoring.score_ranked(policy1, arrays, sp.config.eval.batch_size, batch_type=sp.settings.batch_type)
    np.testing.assert_array_equal(again, arrays.ref_logps_NxK)
    # The saved policy 1 is bit-identical to the final train state of round 0.
    tx = config_lib.optimizer(sp.config.rounds.optim).build(24)
    _, state, state_sh = train.init_train_state(policy1, tx, sp.mesh, sp.rules)
    final = checkpoint.TrainCheckpoints(os.path.join(workdir, "spin", "round_0", "train"), 3)
    step, params, _, _ = final.restore_latest(
        sharding.with_shardings(state.params, state_sh.params),
        sharding.with_shardings(state.opt_state, state_sh.opt_state),
    )
    final.close()
    assert step == 24
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_sigkill_mid_round_then_resume_gives_same_parameters(reference_run, main_command):
    root, ref_workdir, _ = reference_run
    workdir = str(root / "killed")
    env = main_command.env()
    cmd = main_command.argv(workdir, *OVERRIDES, "--config.modes=spin")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(proc, os.path.join(workdir, "spin", "round_1", "train", "3"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # Killed mid-round: round 1's policy (πθ(2)) was not written yet.
    assert not os.path.exists(os.path.join(workdir, "spin", "policies", "2"))
    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, ref_policy = restore_params(ref_workdir, "spin", 2)
    _, got_policy = restore_params(workdir, "spin", 2, "--config.modes=spin")
    from flax import nnx

    for a, b in zip(jax.tree.leaves(nnx.state(ref_policy)), jax.tree.leaves(nnx.state(got_policy))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The steps trained again after the resume replaced their first records: one per step.
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    steps = [(r["phase"], r["step"]) for r in records if r["phase"].startswith("spin/round_")]
    assert len(steps) == len(set(steps)) == 48


@pytest.mark.slow
def test_incompatible_workdir_is_refused_before_compiling(reference_run):
    _, workdir, _ = reference_run
    config = load_config()
    config.loss.T = 0.5
    with pytest.raises(
        WorkdirConfigMismatch, match="'loss.T' was .*, now 0.5, and the saved work of the rounds stage depends on it"
    ):
        rounds.SelfPlay(config, workdir)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.loss.update(K=1), "K=1"),
        (lambda c: c.loss.update(T=0.0), "T=0.0 must be > 0"),
        (lambda c: c.update(modes="spin", loss=dict(c.loss.to_dict(), K=3)), "does not fit mode 'spin'"),
        (lambda c: c.update(modes="asft", loss=dict(c.loss.to_dict(), K=2)), "does not fit mode 'asft'"),
        (lambda c: c.update(modes="dpo"), "unknown \\['dpo'\\]"),
        (lambda c: c.loss.update(variant="ipo"), "valid variants"),
        (lambda c: c.sampling.update(max_new_tokens=99), "max_new_tokens=99 exceeds"),
    ],
)
def test_bad_config_is_refused(change, message):
    config = load_config()
    change(config)
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config)


def test_mesh_that_does_not_divide_devices_is_refused(tmp_path):
    config = load_config()
    config.mesh.update(data=3, fsdp=1, tensor=1, num_devices=0)
    with pytest.raises(ValueError, match="3"):
        rounds.SelfPlay(config, str(tmp_path))


@pytest.mark.slow
def test_sigterm_mid_round_saves_and_exits_143(reference_run, main_command):
    root, _, _ = reference_run
    workdir = str(root / "terminated")
    cmd = main_command.argv(workdir, *OVERRIDES, "--config.modes=spin")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=main_command.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_for(proc, os.path.join(workdir, "spin", "round_0", "train", "3"))
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-2000:]
    assert "SIGTERM, state saved at step" in stderr
    step = int(stderr.split("state saved at step ")[1].split()[0])
    assert 3 <= step < 24 and os.path.isdir(os.path.join(workdir, "spin", "round_0", "train", str(step)))


@pytest.mark.slow
def test_other_evaluation_settings_evaluate_again(reference_run, main_command):
    """eval.* is not part of the saved work: a finished run resumed with another eval.num_prompts
    evaluates every policy again on the new held-out set (before, it crashed on a shape mismatch)."""
    import shutil

    root, ref_workdir, _ = reference_run
    workdir = str(root / "re_evaluated")
    shutil.copytree(ref_workdir, workdir)
    proc = main_command.run(workdir, *OVERRIDES, "--config.eval.num_prompts=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for lineage, index in (("sft", 0), ("spin", 1), ("asft", 2)):
        result = json.load(open(os.path.join(workdir, lineage, f"eval_{index}.json")))
        assert len(result["responses"]) == 32 and result["settings"]["eval"]["num_prompts"] == 32
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = [(r["phase"], r["step"]) for r in records if r["phase"].startswith("eval/")]
    assert len(evals) == len(set(evals)) == 5  # the new evaluations replaced the old records
    assert len([r for r in records if r["phase"] == "spin/round_0"]) == 24  # nothing trained again
