"""The self-play job as 2 real JAX processes (2 CPU devices each) against 1 process with 4 devices."""

import json
import os
import subprocess

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import free_port

from configs import demo
from pl_dpo import scoring
from pl_dpo.data import load_ranked_set
from pl_dpo.selfplay import rounds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# With two lm-evaluation-harness tasks of the repository (configs/harness_tasks), 4 documents each.
HARNESS = ["--config.eval.harness.tasks=pl_dpo_arith_mc,pl_dpo_arith_gen", "--config.eval.harness.limit=4",
           "--config.eval.harness.include_path=configs/harness_tasks"]  # fmt: skip
OVERRIDES = ["--config.modes=spin", "--config.mesh.num_devices=0", "--config.rounds.max_steps=4", *HARNESS]


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory, main_command):
    root = tmp_path_factory.mktemp("multihost")
    port = free_port()
    two = [
        subprocess.Popen(
            main_command.argv(
                root / "two",
                *OVERRIDES,
                "--distributed",
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            cwd=REPO,
            env=main_command.env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    one = main_command.run(root / "one", *OVERRIDES, devices=4)
    outs = [p.communicate(timeout=600) for p in two]
    for p, (_, err) in zip(two, outs):
        assert p.returncode == 0, err[-3000:]
    assert one.returncode == 0, one.stderr[-3000:]
    return root, outs[0][0], one.stdout


def _params(workdir, lineage, index):
    config = demo.get_config("quick")
    config.modes, config.mesh.num_devices, config.rounds.max_steps = "spin", 1, 4
    sp = rounds.SelfPlay(config, str(workdir))
    return sp, sp.policies.restore(lineage, config.model, index)


def test_two_processes_match_one_process(runs):
    root, stdout_two, stdout_one = runs
    assert "| spin round 1 |" in stdout_two and "| spin round 1 |" in stdout_one
    # Only process 0 writes results and metrics.
    assert os.path.exists(root / "two" / "results.md")
    # SFT: the same global batches, split over processes or not, give the same policy.
    _, sft_two = _params(root / "two", "sft", 0)
    _, sft_one = _params(root / "one", "sft", 0)
    for a, b in zip(jax.tree.leaves(nnx.state(sft_two)), jax.tree.leaves(nnx.state(sft_one))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # The round's ranked set (samples of πθ(0), reference log-probs) agrees too.
    two = load_ranked_set(root / "two" / "spin" / "round_0" / "ranked.npz")
    one = load_ranked_set(root / "one" / "spin" / "round_0" / "ranked.npz")
    same_samples = (two.tokens_NxKxL == one.tokens_NxKxL).all(axis=(1, 2))
    assert same_samples.mean() > 0.99
    np.testing.assert_allclose(two.ref_logps_NxK[same_samples], one.ref_logps_NxK[same_samples], rtol=1e-4, atol=1e-3)
    # The harness: every process scores every request on the mesh of all of them; process 0 writes the scores.
    for lineage, index in (("sft", 0), ("spin", 1)):
        scores = [
            {k: v for k, v in json.loads((root / run / lineage / f"eval_{index}.json").read_text())["metrics"].items()
             if k.startswith("harness/")}
            for run in ("two", "one")
        ]  # fmt: skip
        assert "harness/pl_dpo_arith_mc/acc" in scores[0] and scores[0] == pytest.approx(scores[1], rel=1e-6)
    sp, policy = _params(root / "two", "spin", 1)
    again = scoring.score_ranked(policy, two, sp.config.eval.batch_size, batch_type=sp.settings.batch_type)
    assert np.isfinite(again).all()
