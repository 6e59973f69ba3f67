"""experiments/: sweep helpers, job naming and commands, aggregation, and the quick study end to end."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from configs import study, study2
from configs.sweeps import concat, product, zip_

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import collect  # noqa: E402
import report  # noqa: E402
import sweep  # noqa: E402


def test_product_zip_concat():
    jobs = product(seed=[0, 1], **{"loss.T": [0.1, 1.0]})
    assert jobs == [
        {"seed": 0, "loss.T": 0.1},
        {"seed": 0, "loss.T": 1.0},
        {"seed": 1, "loss.T": 0.1},
        {"seed": 1, "loss.T": 1.0},
    ]
    z = zip_(**{"data.num_train": [500, 1000], "sft.steps": [100, 200]})
    assert z == [{"data.num_train": 500, "sft.steps": 100}, {"data.num_train": 1000, "sft.steps": 200}]
    assert product(z, seed=[3]) == [{**z[0], "seed": 3}, {**z[1], "seed": 3}]
    assert concat(jobs[:2], jobs[1:3]) == jobs[:3]  # the duplicate kept once, order kept
    with pytest.raises(ValueError, match="different lengths"):
        zip_(a=[1, 2], b=[1])
    with pytest.raises(ValueError, match="set by two axes"):
        product([{"seed": 0}], seed=[1])
    with pytest.raises(TypeError, match="list of values"):
        product(modes="spin")
    with pytest.raises(ValueError, match="no values"):
        product(seed=[])


def test_study_sweep_covers_the_four_questions():
    jobs = study.sweep()
    base = study.get_config()
    resolved = [sweep.apply_overrides(base, j) for j in jobs]
    for seed in study.SEEDS:
        mine = [c for c in resolved if c.seed == seed]
        assert any(set(c.modes.split(",")) >= {"spin", "asft", "ladder", "sft"} and c.rounds.num >= 3 for c in mine)
        assert len({c.loss.T for c in mine if "asft" in c.modes}) >= 4  # K=2 and K=3 at >= 4 temperatures
        assert len({c.data.num_train or c.data.options.n_train for c in mine}) >= 3
    temps = sorted({c.loss.T for c in resolved})
    assert temps[-1] / temps[0] >= 100  # two orders of magnitude
    assert len(study.sweep("quick")) == 2


def test_study2_sweep_has_every_arm_at_equal_steps_and_a_T_sweep():
    resolved = [sweep.apply_overrides(study2.get_config(), j) for j in study2.sweep()]
    for seed in study2.SEEDS:
        mine = [c for c in resolved if c.seed == seed]
        temps: dict[tuple, set] = {}
        for c in mine:
            for m in c.modes.split(","):
                arm = (m, int(c.loss.K), c.loss.variant, int(c.rounds.mix_previous), float(c.loss.sft_weight))
                temps.setdefault(arm, set()).add(c.loss.T)
        arms = {arm for arm, ts in temps.items() if 5.0 in ts}
        assert {("sft", 0, "pl", 0, 0.0), ("spin", 0, "pl", 0, 0.0), ("triplet", 0, "pl", 0, 0.0)} <= arms
        assert {("asft", 0, "pl", 0, 0.0), ("spin", 0, "pl", 1, 0.0), ("spin", 0, "pl", 0, 1.0)} <= arms
        assert {("ranked_samples", k, "pl", 0, 0.0) for k in (2, 3, 4)} <= arms
        assert ("ranked_samples", 4, "lipo_lambda", 0, 0.0) in arms
        for arm in study2.T_ARMS:  # four temperatures over two orders of magnitude
            ts = sorted(temps[(arm["modes"], arm.get("loss.K", 0), "pl", 0, 0.0)])
            assert len(ts) == 4 and ts[-1] / ts[0] >= 100
    # Equal generation: verifier-ranked lists on 2000 // K prompts a round generate as many samples as SPIN.
    subset = [c for c in resolved if c.rounds.prompts_per_round]
    assert sorted({(c.loss.K, c.loss.K * c.rounds.prompts_per_round) for c in subset}) == [
        (2, 2000),
        (3, 1998),
        (4, 2000),
    ]
    assert len(subset) == 3 * len(study2.SEEDS) and all(c.rounds.max_steps == 124 for c in subset)
    # ... and enough epochs over the subset for the full 124 steps.
    assert all(c.rounds.epochs * (c.rounds.prompts_per_round // c.rounds.batch_size) >= 124 for c in subset)
    resolved = [c for c in resolved if not c.rounds.prompts_per_round]
    # Equal gradient steps: one step cap, three rounds, the converged (early-stopped) SFT start everywhere.
    assert {
        (c.rounds.max_steps, c.rounds.num, c.rounds.batch_size, c.sft.steps, c.sft.eval_every) for c in resolved
    } == {(study2.STEPS_PER_ROUND, 3, 32, 4000, 100)}
    assert len(study2.sweep("quick")) == 2


def test_arm_labels_name_the_method_switches():
    cell = collect.Cell("spin", 2, 5.0, 2000, 4000)
    assert report.arm_label(cell) == "spin (K=2)"
    assert report.arm_label(collect.Cell("spin", 2, 5.0, 2000, 4000, mix_previous=1)) == "spin (K=2; mix 1 previous)"
    assert report.arm_label(collect.Cell("spin", 2, 5.0, 2000, 4000, sft_weight=1.0)) == "spin (K=2; SFT anchor 1)"
    lipo = collect.Cell("ranked_samples", 4, 5.0, 2000, 4000, variant="lipo_lambda", answer_on_top=True)
    assert report.arm_label(lipo) == "ranked_samples (K=4; lipo_lambda; answer on top)"
    assert report.without_T(lipo) == report.without_T(collect.Cell(**{**lipo.__dict__, "T": 0.1}))
    order = sorted([lipo, cell, collect.Cell("sft", 1, None, 2000, 4000)], key=report.arm_key)
    assert [c.mode for c in order] == ["sft", "spin", "ranked_samples"]


def test_job_names_commands_and_bad_overrides(capsys):
    assert sweep.job_name({"seed": 1, "modes": "spin,asft", "loss.T": 0.1}) == "loss.T=0.1__modes=spin+asft__seed=1"
    assert sweep.job_name({}) == "base"
    base = study.get_config()
    with pytest.raises(KeyError, match="no field 'Tau'"):
        sweep.apply_overrides(base, {"loss.Tau": 1.0})
    with pytest.raises(KeyError, match="no field 'nope'"):
        sweep.apply_overrides(base, {"nope.x": 1})
    assert sweep.apply_overrides(base, {"loss.T": 0.1}).loss.T == 0.1 and base.loss.T == 5.0  # a copy
    assert sweep.main(["--config", os.path.join(REPO, "configs/study.py"), "--print", "--sweep_dir", "/fleet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(study.sweep())
    assert lines[1].startswith("python -m pl_dpo.main --config=")
    assert "--workdir=/fleet/loss.T=0.1__modes=spin+asft__rounds.num=2__seed=0" in lines[1]
    assert "--config.loss.T=0.1" in lines[1] and "--config.modes=spin,asft" in lines[1]


def _touch(path, text="x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_seed_from_donors_copies_only_stages_with_equal_settings(tmp_path):
    base = study.get_config()
    resolve = lambda o: sweep.plain(sweep.apply_overrides(base, o))
    donor = str(tmp_path / "donor")
    for rel in (
        "tokenizer/tokenizer.json",
        "tfds/ds/data",
        "sft/policies/0/params/x",
        "sft/policies/0/metadata/x",
        "sft/eval_0.json",
        "sft/policies/1/commit_success.txt",
        "assistant_0/samples.npz",
        "assistant_0/policies/0/params",
        "assistant_1/samples.npz",
        "spin/eval_1.json",
    ):
        _touch(os.path.join(donor, rel))
    _touch(os.path.join(donor, "sft/policies/0/_CHECKPOINT_METADATA"), json.dumps({"commit_timestamp_nsecs": 1}))
    _touch(os.path.join(donor, "metrics.jsonl"), json.dumps({"phase": "eval/sft", "step": 0, "exact_match": 0.5}))
    donors = [(donor, resolve({"seed": 0}))]

    same = str(tmp_path / "same")  # other T and modes: every deterministic stage is shared
    copied = sweep.seed_from_donors(same, resolve({"seed": 0, "loss.T": 0.1, "modes": "spin,asft"}), donors)
    assert copied == ["tokenizer", "tfds", "sft", "assistant_0", "assistant_1"]
    assert os.path.exists(os.path.join(same, "sft/policies/0/_CHECKPOINT_METADATA"))
    assert not os.path.exists(os.path.join(same, "sft/policies/1"))  # the control arm's rounds are not copied
    assert not os.path.exists(os.path.join(same, "spin"))
    assert json.loads(open(os.path.join(same, "metrics.jsonl")).read())["exact_match"] == 0.5

    other_seed = str(tmp_path / "seed1")
    assert sweep.seed_from_donors(other_seed, resolve({"seed": 1}), donors) == ["tokenizer", "tfds"]
    fewer = str(tmp_path / "fewer")  # a subset of the data: new SFT and assistants, same built dataset
    assert sweep.seed_from_donors(fewer, resolve({"data.num_train": 500}), donors) == ["tokenizer", "tfds"]
    longer = str(tmp_path / "longer")  # a longer SFT: the assistants do not depend on it
    assert sweep.seed_from_donors(longer, resolve({"sft.steps": 1200}), donors) == [
        "tokenizer",
        "tfds",
        "assistant_0",
        "assistant_1",
    ]
    other_assistant = sweep.apply_overrides(base, {})
    other_assistant.assistants[1].sft_steps = 99
    diff = str(tmp_path / "diff")
    assert sweep.seed_from_donors(diff, sweep.plain(other_assistant), donors) == [
        "tokenizer",
        "tfds",
        "sft",
        "assistant_0",
    ]
    assert base.assistants[1].sft_steps != 99  # apply_overrides copied the assistants too
    _touch(os.path.join(diff, "config.json"))  # a started job is never touched
    assert sweep.seed_from_donors(diff, resolve({}), donors) == []


def test_the_report_has_a_column_per_harness_metric_with_its_spread():
    import report_harness

    assert report_harness.stderr_name("harness/arc/acc") == "harness/arc/acc_stderr"
    assert report_harness.stderr_name("harness/gsm/exact_match/strict") == "harness/gsm/exact_match_stderr/strict"
    spin = collect.Cell(mode="spin", K=2, T=0.1, num_train=64, sft_steps=0)

    def record(seed, t, acc, em):
        metrics = {"exact_match": 0.1, "harness/mc/acc": acc, "harness/mc/acc_stderr": 0.05,
                   "harness/gen/exact_match/last": em, "harness/gen/exact_match_stderr/last": 0.04}  # fmt: skip
        return collect.Record(cell=spin, seed=seed, round=t, metrics=metrics, job=f"job{seed}")

    one_seed = [record(0, 0, 0.25, 0.1), record(0, 1, 0.5, 0.2)]
    text = report_harness.harness_section(one_seed, [spin], lambda c: [0, 1], report.arm_label)
    assert "| policy | gen/exact_match/last | mc/acc |" in text
    assert "| SFT start (round 0) | 0.100 ± 0.040 se | 0.250 ± 0.050 se |" in text
    assert "| spin (K=2) round 1 | 0.200 ± 0.040 se | 0.500 ± 0.050 se |" in text
    three_seeds = one_seed + [record(1, 1, 0.6, 0.2), record(2, 1, 0.7, 0.2), record(1, 0, 0.25, 0.1)]
    text = report_harness.harness_section(three_seeds, [spin], lambda c: [0, 1], report.arm_label)
    assert "| spin (K=2) round 1 | 0.200 ± 0.000 | 0.600 ± 0.100 |" in text  # over seeds, as the rest of the report
    assert "| SFT start (round 0) | 0.100 ± 0.000 (n=2) | 0.250 ± 0.000 (n=2) |" in text
    assert report_harness.harness_section([record(0, 0, 0.1, 0.1)] * 0, [spin], lambda c: [0], str) == ""


def test_stat_matches_numpy():
    values = [0.2, 0.25, 0.31]
    s = collect.stat(values)
    assert s.n == 3 and s.mean == pytest.approx(np.mean(values)) and s.std == pytest.approx(np.std(values, ddof=1))
    assert collect.stat([0.5]).std == 0.0 and collect.stat([]).n == 0
    assert collect.stat(values).fmt() == f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"
    assert collect.stat([0.5]).fmt().endswith("(n=1)")


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path):
    """Two tiny jobs: the second starts from the first's SFT; the report has its tables and plots."""
    sweep_dir, out = str(tmp_path / "runs"), str(tmp_path / "RESULTS.md")
    config = os.path.join(REPO, "configs/study.py")
    assert sweep.main(["--config", config, "--quick", "--sweep_dir", sweep_dir]) == 0
    with open(os.path.join(sweep_dir, "sweep_log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    assert [r["rc"] for r in log] == [0, 0]
    assert log[0]["copied"] == [] and {"tokenizer", "tfds", "sft"} <= set(log[1]["copied"])
    jobs = [os.path.join(sweep_dir, r["job"]) for r in log]
    evals = [json.load(open(os.path.join(j, "sft", "eval_0.json")))["metrics"] for j in jobs]
    assert evals[0] == evals[1]
    # A finished sweep reruns nothing.
    assert sweep.main(["--config", config, "--quick", "--sweep_dir", sweep_dir]) == 0
    with open(os.path.join(sweep_dir, "sweep_log.jsonl")) as f:
        assert len(f.readlines()) == 2

    records = collect.read_sweep(sweep_dir)
    assert sorted((r.cell.T, r.round) for r in records) == [(1.0, 0), (1.0, 1), (5.0, 0), (5.0, 1)]
    text = report.build(sweep_dir, out)
    assert "| spin (K=2) |" in text and "## Temperature T" in text and "## Appendix: every cell" in text
    for name in ("arms_vs_round.png", "T_vs_round_spin__K_2.png", "vs_T.png"):
        with open(tmp_path / "plots" / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # Hand-written findings survive regeneration.
    with open(out) as f:
        edited = f.read().replace("(no findings written yet)", "SPIN helps.")
    with open(out, "w") as f:
        f.write(edited)
    assert "SPIN helps." in report.build(sweep_dir, out)


def test_every_experiment_config_defines_a_sweep_that_resolves():
    configs = [
        p
        for p in sorted(os.listdir(os.path.join(REPO, "configs")))
        if p.endswith(".py") and p not in ("__init__.py", "sweeps.py", "common.py")
    ]
    assert "study.py" in configs and "demo.py" in configs
    for name in configs:
        module = sweep.load_module(os.path.join(REPO, "configs", name))
        jobs = sweep.sweep_jobs(module, None)
        assert jobs, name
        base = module.get_config()
        names = [sweep.job_name(j) for j in jobs]
        assert len(set(names)) == len(names), name
        for job in jobs:
            sweep.apply_overrides(base, job)  # every overridden field exists


@pytest.mark.slow
def test_quick_study2_end_to_end(tmp_path):
    """The second study's CI form: an early-stopped SFT start, continued SFT / SPIN / triplets in one job and
    verifier-ranked lists in a second; the report has the SFT start, compute and K sections."""
    sweep_dir, out = str(tmp_path / "runs"), str(tmp_path / "RESULTS.md")
    assert sweep.main(["--config", os.path.join(REPO, "configs/study2.py"), "--quick", "--sweep_dir", sweep_dir]) == 0
    records = collect.read_sweep(sweep_dir)
    cells = {r.cell for r in records}
    assert {(c.mode, c.K) for c in cells} == {("sft", 1), ("spin", 2), ("triplet", 3), ("ranked_samples", 3)}
    last = {r.cell.mode: r.metrics for r in records if r.round == 1}
    assert all(m["train_steps"] == 4 for m in last.values())  # rounds.max_steps of the quick form
    assert 0.0 <= last["ranked_samples"]["top_sample_correct"] <= 1.0 and "tied_lists" in last["ranked_samples"]
    assert "own_sample_correct" in last["spin"] and "rank1_correct" in last["triplet"]
    start = [r.metrics for r in records if r.round == 0 and "sft_steps_run" in r.metrics]
    assert start and all(m["sft_best_step"] <= m["sft_steps_run"] <= 40 for m in start)
    text = report.build(sweep_dir, out)
    for heading in ("## The SFT start", "## Compute per round", "## More than two ranks", "## Training diagnostics"):
        assert heading in text
    assert (
        "| ranked_samples (K=3) | 4 | 96 | 3 | 1200 | 0 |" in text
        and "| triplet (K=3) | 4 | 96 | 1 | 400 | 1 |" in text
    )
    assert "| triplet (K=3) − spin (K=2) |" in text
    assert "## Method switches" not in text  # the quick form has no switch
    with open(tmp_path / "plots" / "paired_vs_control.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
