"""The modes table and the config boundary: list builders, K rules, typed sections, overrides, config arguments."""

import dataclasses

import numpy as np
import pytest

from configs import common, demo, offline, spin
from pl_dpo import config_lib, losses
from pl_dpo.selfplay import modes
from pl_dpo.training import train


def _sources(n=3, calls=None, **fields):
    calls = [] if calls is None else calls

    def assistant(i):
        calls.append(f"assistant_{i}")
        return [[100 + i, p] for p in range(n)]

    def policy(i):
        calls.append("own" if i == 0 else f"own_{i}")
        return [[200 + i, p] for p in range(n)]

    def sft():
        calls.append("sft")
        return [[300, p] for p in range(n)]

    return modes.ListSources(
        answers=[[1, p] for p in range(n)],
        dataset_responses=[[[1, p], [2, p], [3, p], [4, p]] for p in range(n)],
        assistant_samples=assistant,
        sft_samples=sft,
        policy_samples=policy,
        **fields,
    )


def test_self_play_lists_rank_answer_then_assistants_then_own_sample():
    calls = []
    lists, labels = modes.self_play_lists(_sources(calls=calls), K=4)
    assert labels is None and lists[2] == [[1, 2], [100, 2], [101, 2], [200, 2]]
    # Assistants first (strongest first), then the policy: the order the stages run in.
    assert calls == ["assistant_0", "assistant_1", "own"]
    calls.clear()
    assert modes.self_play_lists(_sources(calls=calls), K=2).lists[0] == [[1, 0], [200, 0]] and calls == ["own"]


def test_triplet_lists_rank_answer_then_sft_sample_then_own_sample():
    calls = []
    assert modes.triplet_lists(_sources(calls=calls), K=3).lists[1] == [[1, 1], [300, 1], [200, 1]]
    assert calls == ["sft", "own"]
    with pytest.raises(ValueError, match="K=3"):
        modes.triplet_lists(_sources(), K=4)


def test_dataset_lists_keep_the_first_K_with_their_ratings():
    lists, labels = modes.dataset_lists(_sources(), K=2)
    assert lists[1] == [[1, 1], [2, 1]] and labels is None
    rated = _sources(dataset_scores=[(9.0, 7.0, 1.0), (5.0,), (4.0, 3.0, 2.0, 1.0)])
    lists, labels = modes.dataset_lists(rated, K=2)
    np.testing.assert_array_equal(labels, [[9.0, 7.0], [5.0, 0.0], [4.0, 3.0]])


def test_verifier_ranked_lists_sort_by_grade_and_draw_tie_orders_from_the_seed():
    n, K = 40, 4
    # Sample i of prompt p is [200 + i, p]; the verifier likes sample 2, then 0; 1 and 3 tie at 0.
    grade = lambda p, ids: {200: 0.5, 201: 0.0, 202: 1.0, 203: 0.0}[ids[0]]
    calls = []
    lists, labels = modes.verifier_ranked_lists(_sources(n, calls, grade=grade, seed=3), K)
    assert calls == ["own", "own_1", "own_2", "own_3"]
    assert all([r[0] for r in lst[:2]] == [202, 200] for lst in lists)
    np.testing.assert_array_equal(labels, np.tile([1.0, 0.5, 0.0, 0.0], (n, 1)))
    tail_orders = {tuple(r[0] for r in lst[2:]) for lst in lists}
    assert tail_orders == {(201, 203), (203, 201)}  # ties in a random order, both seen over 40 prompts
    again = modes.verifier_ranked_lists(_sources(n, grade=grade, seed=3), K)
    assert again.lists == lists  # ... drawn from the seed
    # The answer on top, then K-1 samples; its label is above any grade.
    lists, labels = modes.verifier_ranked_lists(_sources(n, grade=grade, answer_on_top=True), K)
    assert [r[0] for r in lists[5][:3]] == [1, 202, 200] and labels[5].tolist() == [2.0, 1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="need a verifier"):
        modes.verifier_ranked_lists(_sources(n), K)


@pytest.mark.parametrize(
    "name, n_assistants, loss_K, K, ranked, reference, objective",
    [
        ("spin", 2, 0, 2, 0, modes.Reference.ROUND_POLICY, modes.Objective.PL_DPO),
        ("asft", 2, 0, 3, 1, modes.Reference.ROUND_POLICY, modes.Objective.PL_DPO),
        ("ladder", 2, 0, 4, 2, modes.Reference.ROUND_POLICY, modes.Objective.PL_DPO),
        ("triplet", 2, 0, 3, 0, modes.Reference.ROUND_POLICY, modes.Objective.PL_DPO),
        ("ranked_samples", 2, 4, 4, 0, modes.Reference.ROUND_POLICY, modes.Objective.PL_DPO),
        ("offline", 2, 3, 3, 0, modes.Reference.SFT, modes.Objective.PL_DPO),
        ("sft", 2, 0, 1, 0, modes.Reference.NONE, modes.Objective.SFT),
    ],
)
def test_mode_table(name, n_assistants, loss_K, K, ranked, reference, objective):
    mode = modes.get(name)
    assert mode.list_size(n_assistants, loss_K) == K
    assert mode.assistants_ranked(K) == ranked
    assert mode.reference is reference and mode.objective is objective
    assert mode.one_set == (name == "offline") and mode.ranks_own_sample == (
        name in ("spin", "asft", "ladder", "triplet")
    )


def test_list_size_reads_the_table_and_names_what_is_missing():
    c = demo.get_config("quick")  # two assistants
    assert [config_lib.list_size(c, m) for m in ("spin", "asft", "ladder", "triplet", "sft")] == [2, 3, 4, 3, 1]
    c.assistants = []
    with pytest.raises(config_lib.ConfigError, match="mode 'asft' needs one assistant model"):
        config_lib.list_size(c, "asft")
    with pytest.raises(KeyError, match="unknown mode 'dpo'"):
        modes.get("dpo")


def test_typed_sections_from_the_config():
    c = demo.get_config("quick")
    optim = config_lib.optimizer(c.rounds.optim)
    assert isinstance(optim, train.OptimizerConfig) and optim.lr == 5e-4 and optim.decay == "linear"
    assert config_lib.loss(c.loss) == losses.LossConfig(T=5.0, variant="pl", top_m=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        optim.lr = 1.0
    section = common.optimizer(1e-3)
    section.momentum = 0.9
    with pytest.raises(TypeError, match="momentum"):  # an unknown field is refused, not ignored
        config_lib.optimizer(section)


def test_overrides_plain_and_lookup():
    c = demo.get_config("quick")
    parsed = config_lib.parse_flag_overrides(
        c, ["--config.rounds.num=2", "--config.loss.T=0.5", "--config.modes=spin", "--config.export_hf=True"]
    )
    assert parsed == {"rounds.num": 2, "loss.T": 0.5, "modes": "spin", "export_hf": True}
    assert isinstance(parsed["loss.T"], float)
    new = config_lib.apply_overrides(c, parsed)
    assert new.rounds.num == 2 and c.rounds.num == 1  # a copy
    plain = config_lib.plain(new)
    assert isinstance(plain["assistants"][0], dict) and plain["assistants"][0]["sft_steps"] == 30
    assert config_lib.lookup(plain, "loss.T") == 0.5 and config_lib.lookup(plain, "loss.Tau") is config_lib.MISSING
    with pytest.raises(ValueError, match="expected an integer"):
        config_lib.parse_flag_overrides(c, ["--config.rounds.num=0.5"])
    with pytest.raises(KeyError, match="existing field"):
        config_lib.parse_flag_overrides(c, ["--config.loss.Tau=1"])
    with pytest.raises(KeyError, match="no field 'Tau'"):
        config_lib.apply_overrides(c, {"loss.Tau": 1.0})


def test_config_arguments():
    arg = common.parse_arg("quick,rounds=4", quick=False, rounds=3, source="x")
    assert (arg.quick, arg.rounds, arg.source) == (True, 4, "x")
    assert common.parse_arg(None, quick=False).quick is False
    with pytest.raises(ValueError, match="unknown key 'rnds'"):
        common.parse_arg("rnds=4", rounds=3)
    with pytest.raises(ValueError, match="rounds needs a value"):
        common.parse_arg("rounds", rounds=3)
    assert spin.get_config("rounds=4").rounds.num == 4 and spin.get_config().rounds.num == 3
    assert offline.get_config("source=ranked_jsonl").data.source == "ranked_jsonl"
    assert (
        offline.get_config("tiny").data.source == "ranked_jsonl" and offline.get_config().data.source == "ultrafeedback"
    )


def test_modes_that_need_data_features_are_refused_without_them():
    c = offline.get_config("tiny")
    c.modes = "ranked_samples"
    with pytest.raises(config_lib.ConfigError, match="ranks samples with the task's verifier"):
        config_lib.validate(c)
    c = demo.get_config("quick")
    c.modes = "ranked_samples"
    with pytest.raises(config_lib.ConfigError, match="needs config.loss.K >= 2"):
        config_lib.validate(c)
    c.loss.K = 4
    config_lib.validate(c)
    for field, value in (("loss.sft_weight", -1.0), ("rounds.mix_previous", -1)):
        with pytest.raises(config_lib.ConfigError, match=field.split(".")[1]):
            config_lib.validate(config_lib.apply_overrides(c, {field: value}))


@pytest.mark.parametrize(
    "name, K, answer_on_top",
    [
        ("spin", 2, False),
        ("asft", 3, False),
        ("ladder", 4, False),
        ("triplet", 3, False),
        ("ranked_samples", 4, False),
        ("ranked_samples", 3, True),
    ],
)
def test_generation_budget_is_what_the_list_builder_asks_for(name, K, answer_on_top):
    """The study's generation-budget column (policy samples per prompt per round, cached ones once)
    counted from the calls the list builder actually makes."""
    calls = []
    mode = modes.get(name)
    mode.build_lists(_sources(calls=calls, grade=lambda p, ids: 0.0, answer_on_top=answer_on_top), K)
    own = sum(c.startswith("own") for c in calls)
    assert mode.policy_samples_per_prompt(K, answer_on_top) == own
    assert mode.cached_samples_per_prompt(K) == len(calls) - own
    assert modes.get("sft").policy_samples_per_prompt(1) == 0 == modes.get("sft").cached_samples_per_prompt(1)
