"""A run's data prepared once (run_data) and the held-out evaluation of one policy (evaluate)."""

import numpy as np
import pytest

from configs import demo
from pl_dpo import config_lib, evaluate, scoring
from pl_dpo.data import RankedBatch, check_answer
from pl_dpo.models import create_model
from pl_dpo.selfplay import run_data
from pl_dpo.workdir.metric_log import MetricLog


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    config = demo.get_config("quick")
    config = config_lib.apply_overrides(
        config, {"data.options": dict(config.data.options.to_dict(), n_train=24, n_test=12), "data.num_train": 20}
    )
    tokenizer = run_data.run_tokenizer(config, workdir)
    log = MetricLog(workdir)
    data = run_data.prepare_data(config, tokenizer, workdir, log)
    log.close()
    model = create_model(config_lib.model_config(config.model, len(tokenizer)), seed=0)
    return config, tokenizer, data, model, workdir


def test_prepare_data_tokenises_both_splits_once_in_the_round_layout(prepared):
    config, tokenizer, data, _, workdir = prepared
    L = config.data.max_prompt_len + config.data.max_response_len
    assert len(data.train_examples) == 20  # data.num_train
    assert data.sft_set.tokens_NxKxL.shape == (20, 1, L)
    assert data.heldout.answers.tokens_NxKxL.shape == (12, 1, L) and data.heldout.checkable
    for example, answer in zip(data.train_examples, data.train_answer_ids):
        assert tokenizer.decode(answer, skip_special_tokens=True).strip() == example.responses[0]
        assert answer[-1] == tokenizer.eos_token_id
    # Every response token of the layout is the answer (mask), every prompt token precedes it.
    row, mask = data.sft_set.tokens_NxKxL[3, 0], data.sft_set.loss_mask_NxKxL[3, 0]
    assert row[mask].tolist() == data.train_answer_ids[3]
    records = [line for line in open(f"{workdir}/metrics.jsonl")]
    assert any('"data/train"' in r for r in records) and any('"data/test"' in r for r in records)


def test_evaluate_policy_metrics(prepared):
    config, tokenizer, data, model, _ = prepared

    def evaluated(baseline):
        return evaluate.evaluate_policy(
            model, data.heldout, tokenizer, batch_size=8, max_new_tokens=config.sampling.max_new_tokens,
            baseline=baseline, batch_type=RankedBatch,
        )  # fmt: skip

    metrics, responses, correct = evaluated(baseline=None)
    logps_N = scoring.score_ranked(model, data.heldout.answers, 8, batch_type=RankedBatch)[:, 0]
    np.testing.assert_allclose(metrics["answer_logp"], logps_N.mean(), rtol=1e-6)
    tokens = data.heldout.answers.loss_mask_NxKxL.sum()
    np.testing.assert_allclose(metrics["answer_logp_per_token"], logps_N.sum() / tokens, rtol=1e-6)
    # Exact match is the task checker on the decoded greedy answers, overall and per task.
    want = [
        check_answer(e.task, e.meta, tokenizer.decode(r, skip_special_tokens=True))
        for e, r in zip(data.heldout.examples, responses)
    ]
    assert correct.tolist() == want and metrics["exact_match"] == pytest.approx(np.mean(want))
    assert {k for k in metrics if k.startswith("exact_match/")} == {
        f"exact_match/{e.task}" for e in data.heldout.examples
    }
    assert "win_rate_vs_sft" not in metrics and "reward_accuracy" not in metrics

    # Against itself as the SFT baseline: every prompt ties (win rate 0.5) and every implicit
    # reward is 0, so no list is ranked right (ties are not wins).
    baseline = evaluate.sft_baseline(
        model, data.heldout, responses, correct, pad_id=tokenizer.pad_token_id, batch_size=8, batch_type=RankedBatch
    )
    again, _, _ = evaluated(baseline)
    assert baseline.lists is not None  # a random policy's greedy answers differ from the dataset's
    assert again["win_rate_vs_sft"] == 0.5 and again["reward_accuracy"] == 0.0


def test_format_table():
    rows = [{"policy": "sft", "exact_match": 0.1234}, {"policy": "spin round 1", "exact_match": None}]
    assert evaluate.format_table(rows, ["policy", "exact_match"]).splitlines() == [
        "| policy | exact_match |",
        "|---|---|",
        "| sft | 0.123 |",
        "| spin round 1 | - |",
    ]
