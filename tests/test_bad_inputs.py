"""User mistakes caught before any compute, each named where it is; a workdir that keeps no dead state."""

import json

import pytest

from configs import demo
from pl_dpo import config_lib
from pl_dpo.selfplay import run_data
from pl_dpo.training.phase import epochs_for_steps
from pl_dpo.workdir import agreement
from pl_dpo.workdir.metric_log import MetricLog


def _config(**overrides):
    return config_lib.apply_overrides(demo.get_config("quick"), overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"sampling.temperature": 0.0}, r"config.sampling.temperature=0.0 must be > 0"),
        ({"sampling.top_p": 1.5}, r"config.sampling.top_p=1.5 must be in \(0, 1\]"),
        ({"sampling.top_k": -1}, r"config.sampling.top_k=-1 must be >= 0"),
        ({"sampling.decode_tp": -2}, r"config.sampling.decode_tp=-2 must be >= 0"),
        ({"rounds.prompts_per_round": -1}, r"config.rounds.prompts_per_round=-1 must be >= 0"),
        ({"data.max_truncated_fraction": 0.0}, r"max_truncated_fraction=0.0 must be in \(0, 1\]"),
        ({"sft.patience": 0}, r"sft.patience=0 >= 1"),
        ({"loss.sft_weight": -0.5}, r"sft_weight=-0.5 must be >= 0"),
        ({"modes": "spin,spinn"}, r"config.modes='spin,spinn': unknown \['spinn'\]; choose from"),
        ({"modes": "asft", "assistants": []}, r"mode 'asft' needs one assistant model \(config.assistants\)"),
        ({"modes": "ladder", "assistants": []}, r"mode 'ladder' needs one assistant model"),
        ({"modes": "spin", "loss.K": 5}, r"config.loss.K=5 does not fit mode 'spin', which ranks K=2 responses"),
        ({"loss.T": 0.0}, r"config.loss.T=0.0 must be > 0"),
        ({"loss.variant": "pll"}, r"config.loss.variant='pll'; valid variants: pl, "),
        ({"modes": "asft", "loss.variant": "hinge"}, r"'hinge' is defined for K=2 only"),
        ({"rounds.num": 0}, r"config.rounds.num=0 and rounds.epochs=2 must be >= 1"),
        ({"rounds.mix_previous": -1}, r"config.rounds.mix_previous=-1 must be >= 0"),
        ({"rounds.num": 3, "rounds.lr_per_round": (1e-4,)}, r"lr_per_round has 1 values for 3 rounds"),
        ({"sampling.max_new_tokens": 99}, r"max_new_tokens=99 exceeds config.data.max_response_len=16"),
        ({"modes": "offline"}, r"mode 'offline' needs config.loss.K >= 2, got 0"),
        ({"modes": "offline", "loss.K": 3}, r"mode 'offline' needs ranked lists from data .* not the synthetic source"),
        (
            {"modes": "ranked_samples", "loss.K": 3, "data.source": "ranked_jsonl"},
            r"mode 'ranked_samples' ranks samples with the task's verifier, which only data.source='synthetic' has",
        ),
        ({"sft.batch_size": 0}, r"config.sft.batch_size=0 must be >= 1"),
        # Every optimizer field of every phase (issue 23: a negative lr trained uphill and exited 0).
        ({"rounds.optim.lr": -1e-4}, r"config.rounds.optim.lr=-0.0001 must be > 0"),
        ({"sft.optim.lr": 0.0}, r"config.sft.optim.lr=0.0 must be > 0"),
        ({"rounds.lr_per_round": (1e-4, -1e-4)}, r"lr_per_round=\[0.0001, -0.0001\] must all be > 0"),
        ({"rounds.optim.warmup_steps": -1}, r"config.rounds.optim.warmup_steps=-1 must be >= 0"),
        ({"rounds.optim.decay": "exp"}, r"config.rounds.optim.decay='exp' choose one of"),
        ({"rounds.optim.final_lr_fraction": 1.5}, r"final_lr_fraction=1.5 must be in \[0, 1\]"),
        ({"sft.optim.b2": 1.0}, r"config.sft.optim.b2=1.0 must be in \[0, 1\)"),
        ({"sft.optim.eps": 0.0}, r"config.sft.optim.eps=0.0 must be > 0"),
        ({"rounds.optim.weight_decay": -0.1}, r"weight_decay=-0.1 must be >= 0"),
        ({"rounds.optim.clip_norm": -1.0}, r"clip_norm=-1.0 must be >= 0"),
        ({"rounds.optim.grad_accum_steps": 0}, r"grad_accum_steps=0 must be an integer >= 1"),
        ({"sft.optim.name": "sgd"}, r"config.sft.optim.name='sgd' choose 'adamw' or 'rmsprop'"),
        ({"model.lora.enabled": True, "model.lora.rank": 0}, r"config.model.lora.rank=0 must be an integer >= 1"),
        ({"model.lora.enabled": True, "model.lora.rank": -4}, r"config.model.lora.rank=-4 must be an integer >= 1"),
        ({"model.lora.enabled": True, "model.lora.alpha": 0.0}, r"config.model.lora.alpha=0.0 must be > 0"),
        (
            {"model.lora.enabled": True, "model.lora.targets": "qkv_proj"},
            r"config.model.lora: targets='qkv_proj' matches no projection of the model; its projections: "
            r"layers/attn/k_proj, .*layers/mlp/up_proj",
        ),
    ],
)
def test_settings_refused_before_anything_trains(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(_config(**overrides))


def test_an_assistants_optimizer_is_checked_too():
    config = _config()
    config.assistants[0].optim.lr = -1.0
    with pytest.raises(config_lib.ConfigError, match=r"config.assistants\[0\].optim.lr=-1.0 must be > 0"):
        config_lib.validate(config)


def test_an_assistants_lora_is_checked_and_named():
    config = _config()
    config.assistants[0].model.lora.update(enabled=True, targets="attention")
    with pytest.raises(config_lib.ConfigError, match=r"config.assistants\[0\].model.lora: targets='attention' matches"):
        config_lib.validate(config)


def test_a_peft_adapter_of_another_shape_is_named_before_anything_trains(tmp_path):
    """A PEFT folder made for a wider model: the tensor, its shape and the model's, from validate."""
    import jax

    from pl_dpo.models import create_model, lora, peft_io

    hidden = config_lib.model_config(_config().model, 384).hidden_size
    overrides = {**_config().model.overrides.to_dict(), "hidden_size": 2 * hidden}
    wide = config_lib.model_config(_config(**{"model.overrides": overrides}).model, 384)
    model = create_model(wide, seed=0)
    settings = lora.LoraConfig(rank=2, alpha=4.0, rslora=False, targets="q_proj$")
    lora.add_adapters(model, settings, jax.random.key(0))
    peft_io.save_peft_adapter(model, str(tmp_path / "adapter"), settings, base_model="wide")
    config = _config(**{"model.lora.enabled": True, "model.lora.init_adapter": str(tmp_path / "adapter")})
    with pytest.raises(
        config_lib.ConfigError,
        match=r"config.model.lora: .*adapter_model.safetensors: tensor 'base_model.model.model.layers.0.self_attn."
        rf"q_proj.lora_A.weight' has shape \(2, {2 * hidden}\), the model needs \(2, {hidden}\)",
    ):
        config_lib.validate(config)


def test_an_assistant_with_nothing_to_train_from_is_named():
    config = _config()
    config.assistants[1].sft_steps = 0
    with pytest.raises(config_lib.ConfigError, match=r"config.assistants\[1\] needs sft_steps >= 1 or a model.hf_path"):
        config_lib.validate(config)


def test_a_missing_model_folder_is_named(tmp_path):
    config = _config(**{"model.hf_path": str(tmp_path / "zephyr")})
    with pytest.raises(config_lib.ConfigError, match=f"{tmp_path / 'zephyr' / 'config.json'} does not exist"):
        config_lib.model_config(config.model, 384)


def test_model_vocabulary_smaller_than_the_tokenizer_is_named():
    config = _config(**{"model.overrides": {"max_position_embeddings": 128, "vocab_size": 100}})
    with pytest.raises(
        config_lib.ConfigError, match=r"config.model: vocab_size=100 is smaller than the tokenizer's 328"
    ):
        config_lib.check_vocab(config, 328)
    config.assistants[1].model.overrides.vocab_size = 200
    config.model.overrides.vocab_size = 328
    with pytest.raises(config_lib.ConfigError, match=r"config.assistants\[1\].model: vocab_size=200"):
        config_lib.check_vocab(config, 328)
    config.assistants[1].model.overrides.vocab_size = 400  # larger is fine (padded vocabularies)
    config_lib.check_vocab(config, 328)


def test_truncating_most_prompts_is_refused_with_the_counts(tmp_path):
    config = _config(**{"data.max_prompt_len": 4})
    tokenizer = run_data.run_tokenizer(config, str(tmp_path))
    log = MetricLog(str(tmp_path))
    with pytest.raises(
        config_lib.ConfigError, match=r"train: 400 of 400 prompts \(100%\) are longer than config.data.max_prompt_len=4"
    ):
        run_data.prepare_data(config, tokenizer, str(tmp_path), log)
    # Accepting it is one setting away.
    config = config_lib.apply_overrides(config, {"data.max_truncated_fraction": 1.0})
    data = run_data.prepare_data(config, tokenizer, str(tmp_path), log)
    assert data.sft_set.prompt_tokens_NxP.shape[1] == 4
    log.close()


def test_steps_the_data_provides():
    assert epochs_for_steps(150, 400, 32) == 13  # 12 full batches an epoch: 13 epochs hold 150 steps
    assert epochs_for_steps(300, 2000, 32) == 5 and epochs_for_steps(250, 2000, 32) == 5
    with pytest.raises(ValueError, match="batch_size=64 exceeds the 40 examples"):
        epochs_for_steps(10, 40, 64)


def test_metric_log_drops_the_steps_a_resumed_phase_logs_again(tmp_path):
    log = MetricLog(str(tmp_path))
    for step in range(6):
        log.write("spin/round_0", step, {"loss": float(step)})
        log.write("sft", step, {"loss": 0.0})
    log.drop({"spin/round_0": 3})
    log.write("spin/round_0", 3, {"loss": 30.0})
    log.close()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    spin = [(r["step"], r["loss"]) for r in records if r["phase"] == "spin/round_0"]
    assert spin == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]
    assert len([r for r in records if r["phase"] == "sft"]) == 6  # other phases untouched


def test_a_metric_log_cut_mid_record_goes_on_from_its_last_whole_record(tmp_path):
    """A run that died while writing (out of disk) left half a record; the resumed run's records each parse
    (issue 23)."""
    (tmp_path / "metrics.jsonl").write_text('{"phase": "sft", "step": 0}\n{"phase": "sft", "st')
    with MetricLog(str(tmp_path)) as log:
        log.write("sft", 1, {"loss": 1.0})
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["phase"], r["step"]) for r in records] == [("sft", 0), ("sft", 1)]


def test_the_error_that_ends_a_run_is_not_hidden_by_closing_its_metric_log(tmp_path):
    """On a full disk, closing the metric log fails too; the run's own error is the one raised (issue 23)."""
    import errno

    class FullDisk:
        name = str(tmp_path / "metrics.jsonl")

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device", self.name)

        flush = close = lambda self: self.write("")

    log = MetricLog(str(tmp_path))
    log._jsonl.close()
    log._jsonl = FullDisk()
    with pytest.raises(OSError, match="No space left") as raised:
        with log:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "checkpoint"))
    assert raised.value.filename == str(tmp_path / "checkpoint")


@pytest.mark.slow
def test_user_errors_are_one_line_and_exit_2(tmp_path, main_command):
    proc = main_command.run(tmp_path / "run", "--config.sampling.temperature=0.0", timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "error: config.sampling.temperature=0.0 must be > 0 (or set greedy=True)"
    assert "Traceback" not in proc.stderr
    # A second run on a workdir in use is refused the same way, before any work.
    from pl_dpo.workdir.lock import WorkdirLock

    (tmp_path / "busy").mkdir()
    with WorkdirLock(tmp_path / "busy"):
        proc = main_command.run(tmp_path / "busy", timeout=300)
    assert proc.returncode == 2 and "is in use by pid" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "busy" / "sft").exists()


def test_workdir_lock_refuses_a_second_run_and_takes_over_a_dead_ones(tmp_path):
    import os
    import subprocess
    import sys

    from pl_dpo.workdir.lock import WorkdirLock, WorkdirLocked

    with WorkdirLock(tmp_path):
        with pytest.raises(WorkdirLocked, match=f"is in use by pid {os.getpid()} on .* since"):
            WorkdirLock(tmp_path).acquire()
    assert not (tmp_path / ".lock").exists()  # released
    # A run killed without releasing: its process is gone, the next run takes the lock over.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".lock").write_text(json.dumps({"pid": int(gone.stdout), "host": os.uname().nodename, "since": "x"}))
    with WorkdirLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    # A lock of another host cannot be checked: refused, and the message says how to clear it.
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "tpu-worker-7", "since": "x"}))
    with pytest.raises(WorkdirLocked, match="on tpu-worker-7 .* or delete .*.lock if it is gone"):
        WorkdirLock(tmp_path).acquire()


def test_workdir_lock_is_never_seen_empty_and_an_empty_one_is_held(tmp_path):
    """Two runs cannot both hold a workdir: a lock file is whole the moment it exists, and an empty one (a
    creator between its create and its write, or an older version killed there) is held until it is old (issue 23)."""
    import os
    import time

    from pl_dpo.workdir import lock as lock_lib

    (tmp_path / ".lock").write_text("")  # what a racing creator leaves for an instant
    with pytest.raises(lock_lib.WorkdirLocked, match="another run is starting"):
        lock_lib.WorkdirLock(tmp_path).acquire()
    assert (tmp_path / ".lock").read_text() == ""  # not taken over
    # Long empty: whoever made it is gone; taken over.
    old = time.time() - 2 * lock_lib.EMPTY_LOCK_STALE_S
    os.utime(tmp_path / ".lock", (old, old))
    with lock_lib.WorkdirLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()
    # The lock appears with its content: os.open(O_CREAT | O_EXCL) is not how it is made.
    opened = []
    real_open = os.open
    monkey = pytest.MonkeyPatch()
    monkey.setattr(os, "open", lambda path, flags, *a: opened.append(flags) or real_open(path, flags, *a))
    try:
        with lock_lib.WorkdirLock(tmp_path):
            assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
            assert sorted(os.listdir(tmp_path)) == [".lock"]  # no temporary file left beside it
    finally:
        monkey.undo()
    assert not any(flags & os.O_EXCL for flags in opened)


def test_resume_refuses_other_training_settings_and_edited_inputs(tmp_path):
    from configs import offline

    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    for f in (train, test):
        f.write_text('{"prompt": "1 + 1?", "responses": ["2", "3"]}\n')
    config = offline.get_config("tiny")
    config.data.files = dict(train=str(train), test=str(test))
    workdir = tmp_path / "run"
    agreement.check_workdir_config(workdir, config, agreement.WORKDIR_KEYS)
    agreement.check_workdir_config(workdir, config, agreement.WORKDIR_KEYS)  # same again: fine
    # Packing changes the last bits only: a resumed run may switch it (data's other fields may not).
    unpacked = config_lib.apply_overrides(config, {"data.pack_prompt": False})
    agreement.check_workdir_config(workdir, unpacked, agreement.WORKDIR_KEYS)
    with pytest.raises(
        agreement.WorkdirConfigMismatch,
        match="'data.max_response_len' was 16, now 9, and the saved work of the sft and assistant stages depends",
    ):
        agreement.check_workdir_config(
            workdir, config_lib.apply_overrides(unpacked, {"data.max_response_len": 9}), agreement.WORKDIR_KEYS
        )
    # Training settings the saved work depends on, rounds.optim among them.
    changed = config_lib.apply_overrides(config, {"rounds.optim.lr": 0.1})
    with pytest.raises(
        agreement.WorkdirConfigMismatch,
        match="'rounds.optim.lr' was .*, now 0.1, and the saved work of the rounds stage depends on it .*use a new --workdir",
    ):
        agreement.check_workdir_config(workdir, changed, agreement.WORKDIR_KEYS)
    # A field added after a workdir was written: absent from its config.json, it ran with the default.
    saved = json.loads((workdir / "config.json").read_text())
    del saved["rounds"]["prompts_per_round"]
    (workdir / "config.json").write_text(json.dumps(saved))
    agreement.check_workdir_config(workdir, config, agreement.WORKDIR_KEYS)
    with pytest.raises(agreement.WorkdirConfigMismatch, match="'rounds.prompts_per_round' was 0, now 8"):
        agreement.check_workdir_config(
            workdir, config_lib.apply_overrides(config, {"rounds.prompts_per_round": 8}), agreement.WORKDIR_KEYS
        )
    # A data file rewritten with the same content (a new mtime) is the same input ...
    train.write_text(train.read_text())
    agreement.check_workdir_config(workdir, config, agreement.WORKDIR_KEYS)
    # ... one edited in place is refused, naming the file and the field.
    train.write_text('{"prompt": "1 + 1?", "responses": ["2", "11"]}\n')
    with pytest.raises(
        agreement.WorkdirConfigMismatch,
        match=f"{train} \\(config.data.files.train\\) changed since .* \\(the tfds, sft and assistant stages\\)",
    ):
        agreement.check_workdir_config(workdir, config, agreement.WORKDIR_KEYS)
    train.unlink()
    with pytest.raises(agreement.WorkdirConfigMismatch, match="is gone"):
        agreement.check_workdir_config(workdir, config, agreement.WORKDIR_KEYS)


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--config.loss.TT=1"], "error: the config has no field 'TT' in --config.loss.TT=1"),
        (["--config.rounds.num=x"], "error: flag --config.rounds.num=x: invalid literal for int()"),
        (["--config=configs/demo.py:quik"], "unknown key 'quik'; known: ['quick']"),
        (["--config=configs/nope.py"], "error: --config=configs/nope.py: Failed loading config file"),
    ],
)
def test_flag_mistakes_are_one_line_and_exit_2(tmp_path, main_command, flags, message):
    proc = main_command.run(tmp_path / "run", *flags, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1] and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_file_as_workdir_is_refused(tmp_path, main_command):
    # URL workdirs: tests/test_bucket_workdir.py (gs:// runs, other schemes are refused).
    workdir = tmp_path / "notes.txt"
    workdir.write_text("not a workdir")
    proc = main_command.run(workdir, timeout=300)
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert "is a file, not a folder" in proc.stderr.strip().splitlines()[-1]


def test_more_steps_than_the_data_gives_says_how_many_run(tmp_path, caplog):
    from test_train import LOSS, ranked_arrays, train_tiny_phase

    from pl_dpo.training import train

    objective = train.pl_dpo_objective(LOSS, chunk_size=8)
    with caplog.at_level("WARNING"):
        train_tiny_phase(
            tmp_path, ranked_arrays(n=16), objective, name="short", num_epochs=1, save_every_steps=100, max_steps=50
        )
    assert "short: max_steps=50, but 1 epochs of 2 full batches give 2 steps: 2 will run" in caplog.text
