"""LoRA runs of `python -m pl_dpo.main` end to end: SIGKILL and resume, the train state, the PEFT folders, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import wait_for
from safetensors.numpy import load_file

from configs import demo
from pl_dpo import config_lib
from pl_dpo.models import peft_io
from pl_dpo.selfplay import rounds

LORA = ["--config.model.lora.enabled=True", "--config.model.lora.rank=4", "--config.rounds.optim.lr=0.001"]
# One SPIN round of 24 steps with LoRA in SFT and the round, a train state every 3 steps (kept: read below).
OVERRIDES = LORA + [
    "--config.modes=spin",
    "--config.rounds.epochs=2",
    "--config.rounds.max_steps=24",
    "--config.checkpoint.save_every_steps=3",
    "--config.checkpoint.keep_train_state=True",
]


def _policy(workdir: str, lineage: str, index: int):
    config = demo.get_config("quick")
    config = config_lib.apply_overrides(config, config_lib.parse_flag_overrides(config, OVERRIDES))
    return rounds.SelfPlay(config, workdir).policies.restore(lineage, config.model, index)


def _bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


@pytest.mark.slow
def test_a_lora_run_killed_mid_round_resumes_to_the_uninterrupted_policy(tmp_path, main_command):
    reference = main_command.run(str(tmp_path / "reference"), *OVERRIDES)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert "| spin round 1 |" in reference.stdout

    workdir = str(tmp_path / "killed")
    cmd = main_command.argv(workdir, *OVERRIDES)
    proc = subprocess.Popen(cmd, cwd=main_command.cwd, env=main_command.env(), stderr=subprocess.DEVNULL)
    wait_for(proc, os.path.join(workdir, "spin", "round_0", "train", "3"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(workdir, "spin", "policies", "1"))
    resumed = subprocess.run(cmd, cwd=main_command.cwd, env=main_command.env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    for a, b in zip(
        jax.tree.leaves(nnx.state(_policy(str(tmp_path / "reference"), "spin", 1))),
        jax.tree.leaves(nnx.state(_policy(workdir, "spin", 1))),
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for phase in ("sft", "spin/round_0"):  # each LoRA phase left its adapters as a PEFT folder
        ref = load_file(os.path.join(tmp_path, "reference", phase, "adapter", peft_io.WEIGHTS_FILE))
        got = load_file(os.path.join(workdir, phase, "adapter", peft_io.WEIGHTS_FILE))
        assert ref.keys() == got.keys() and len(ref) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
        for name in ref:
            np.testing.assert_array_equal(ref[name], got[name])
    config = json.loads(open(os.path.join(workdir, "spin", "round_0", "adapter", peft_io.CONFIG_FILE)).read())
    assert config["r"] == 4 and config["base_model_name_or_path"].endswith(os.path.join("sft", "policies", "0"))

    # The mid-round train state holds the adapters and their moments only: a small part of one policy.
    train_state = _bytes(os.path.join(workdir, "spin", "round_0", "train", "24"))
    policy = _bytes(os.path.join(workdir, "spin", "policies", "1"))
    assert train_state < 0.5 * policy, (train_state, policy)


@pytest.mark.slow
def test_a_lora_setting_the_model_cannot_take_is_one_line_and_exit_2(tmp_path, main_command):
    proc = main_command.run(str(tmp_path / "run"), *LORA, "--config.model.lora.targets=qkv")
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: config.model.lora: targets='qkv' matches no projection of the model; its projections: ")
    )
    assert not os.path.exists(tmp_path / "run" / "sft")


@pytest.mark.slow
def test_a_lora_run_on_int8_frozen_weights_merges_into_the_full_precision_policy(tmp_path, main_command):
    """frozen_int8 (SPIN and aSFT): the round trains on int8 kernels; πθ(1) is πθ(0) in full precision plus its PEFT
    adapters. And a PEFT folder as the start of another run."""
    flags = LORA + ["--config.model.lora.frozen_int8=True"]
    run = main_command.run(str(tmp_path), *flags)
    assert run.returncode == 0, run.stderr[-3000:]
    config = demo.get_config("quick")
    config = config_lib.apply_overrides(config, config_lib.parse_flag_overrides(config, flags))
    store = rounds.SelfPlay(config, str(tmp_path)).policies
    start, policy = (store.restore(*where, config.model, t) for where, t in ((("sft",), 0), (("spin",), 1)))
    adapter = load_file(os.path.join(tmp_path, "spin", "round_0", "adapter", peft_io.WEIGHTS_FILE))
    name = "base_model.model.model.layers.1.mlp.down_proj.lora_{}.weight"
    a, b = (adapter[name.format(x)].astype(np.float64) for x in "AB")  # PEFT: A [r, in], B [out, r]
    peft_config = json.loads(open(os.path.join(tmp_path, "spin", "round_0", "adapter", peft_io.CONFIG_FILE)).read())
    scale = peft_config["lora_alpha"] / peft_config["r"]
    want = np.asarray(start.layers.mlp.down_proj.kernel[...], np.float64)[1] + scale * (b @ a).T
    np.testing.assert_allclose(np.asarray(policy.layers.mlp.down_proj.kernel[...])[1], want, rtol=1e-5, atol=1e-6)

    # That run's SFT adapters as the start of another run (model.lora.init_adapter, no SFT steps): its πθ(0) is the
    # same model, the adapter merged onto the same initial weights.
    again = tmp_path / "from_adapter"
    more = ["--config.sft.steps=0", f"--config.model.lora.init_adapter={tmp_path / 'sft' / 'adapter'}"]
    run = main_command.run(str(again), *flags, *more)
    assert run.returncode == 0, run.stderr[-3000:]
    config = config_lib.apply_overrides(config, config_lib.parse_flag_overrides(config, more))
    restored = rounds.SelfPlay(config, str(again)).policies.restore("sft", config.model, 0)
    for x, y in zip(jax.tree.leaves(nnx.state(start)), jax.tree.leaves(nnx.state(restored))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
