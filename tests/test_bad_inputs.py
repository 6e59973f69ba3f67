"""User mistakes caught before any compute, each named where it is; a workdir that keeps no dead state."""

import json

import pytest

from configs import demo
from pl_dpo import config_lib, run_data
from pl_dpo.metric_log import MetricLog
from pl_dpo.phase import epochs_for_steps


def _config(**overrides):
    return config_lib.apply_overrides(demo.get_config("quick"), overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"sampling.temperature": 0.0}, r"config.sampling.temperature=0.0 must be > 0"),
        ({"sampling.top_p": 1.5}, r"config.sampling.top_p=1.5 must be in \(0, 1\]"),
        ({"sampling.top_k": -1}, r"config.sampling.top_k=-1 must be >= 0"),
        ({"data.max_truncated_fraction": 0.0}, r"max_truncated_fraction=0.0 must be in \(0, 1\]"),
        ({"sft.patience": 0}, r"sft.patience=0 >= 1"),
        ({"loss.sft_weight": -0.5}, r"sft_weight=-0.5 must be >= 0"),
    ],
)
def test_settings_refused_before_anything_trains(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(_config(**overrides))


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
    assert data.sft_arrays["prompt_tokens_NxP"].shape[1] == 4
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
    log.drop("spin/round_0", from_step=3)
    log.write("spin/round_0", 3, {"loss": 30.0})
    log.close()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    spin = [(r["step"], r["loss"]) for r in records if r["phase"] == "spin/round_0"]
    assert spin == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]
    assert len([r for r in records if r["phase"] == "sft"]) == 6  # other phases untouched
