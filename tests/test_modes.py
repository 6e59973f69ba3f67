"""Offline, ladder and continued-SFT modes end to end, HF export, and the paper configs."""

import json
import os

import numpy as np
import pytest

from configs import asft, demo, offline, spin
from pl_dpo import config_lib
from pl_dpo.data import SyntheticConfig, generate_examples, load_arrays, load_ranked_set, load_split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_paper_configs_are_valid(tmp_path):
    from pl_dpo.models import preset_config
    from pl_dpo.models.config import to_hf_config

    for module in (spin, offline, demo):
        config_lib.validate(module.get_config())
    c = asft.get_config()
    c.assistants[0].model.hf_path = str(tmp_path / "absent")
    with pytest.raises(config_lib.ConfigError, match=r"config.assistants\[0\].model.hf_path='.*absent'"):
        config_lib.validate(c)
    (tmp_path / "assistant").mkdir()  # an assistant's folder: validate reads its config.json
    (tmp_path / "assistant" / "config.json").write_text(json.dumps(to_hf_config(preset_config("tiny-llama"))))
    c.assistants[0].model.hf_path = str(tmp_path / "assistant")
    config_lib.validate(c)
    assert config_lib.list_size(c, "asft") == 3 and spin.get_config().rounds.lr_per_round == (5e-7, 5e-7, 1e-7)
    with pytest.raises(config_lib.ConfigError, match="needs sft_steps >= 1 or a model.hf_path"):
        config_lib.validate(asft.get_config())
    for module in (spin, asft, offline, demo):
        assert module.sweep() and all(isinstance(job, dict) for job in module.sweep())


def write_ranked_jsonl(path, examples, rng):
    """Synthetic prompts with [answer, one-digit-off answer, reversed answer]: a ranking by correctness."""
    with open(path, "w") as f:
        for e in examples:
            answer = e.responses[0]
            chars = list(answer)
            i = int(rng.integers(len(chars)))
            chars[i] = "7" if chars[i] != "7" else "3"
            f.write(json.dumps({"prompt": e.prompt, "responses": [answer, "".join(chars), answer[::-1] + "0"]}) + "\n")


def _config(workdir):
    """The config of `offline_run`, as the main job resolves it from its flags."""
    config = offline.get_config("tiny")
    config.modes = "offline,ladder,sft,triplet"
    config.loss.variant = "lipo_lambda"
    config.loss.sft_weight = 0.1
    config.rounds.update(num=2, max_steps=6, mix_previous=1)
    config.export_hf = True
    config.data.files = dict(train=str(workdir.parent / "train.jsonl"), test=str(workdir.parent / "test.jsonl"))
    return config


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory, main_command):
    root = tmp_path_factory.mktemp("modes")
    splits = generate_examples(SyntheticConfig(seed=3, n_train=96, n_test=32))
    rng = np.random.default_rng(0)
    for split, examples in splits.items():
        write_ranked_jsonl(root / f"{split}.jsonl", examples, rng)
    workdir = root / "run"
    proc = main_command.run(
        workdir,
        f"--config.data.files.train={root / 'train.jsonl'}",
        f"--config.data.files.test={root / 'test.jsonl'}",
        "--config.modes=offline,ladder,sft,triplet",
        "--config.loss.variant=lipo_lambda",
        "--config.loss.sft_weight=0.1",
        "--config.rounds.mix_previous=1",
        "--config.rounds.num=2",
        "--config.export_hf=True",
        "--config.rounds.max_steps=6",
        config="configs/offline.py:tiny",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc.stdout


@pytest.mark.slow
def test_offline_ladder_and_sft_modes(offline_run):
    workdir, stdout = offline_run
    for row in ("| sft |", "| offline round 1 |", "| offline round 2 |", "| ladder round 2 |", "| sft round 2 |"):
        assert row in stdout
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    ladder = [r for r in records if r["phase"] == "ladder/round_0"]
    offline_ = [r for r in records if r["phase"] == "offline/round_1"]
    assert len(ladder[0]["scores_K"]) == 4 and len(offline_[0]["scores_K"]) == 3
    # Offline: one ranked set for every round, its reference the fixed SFT policy.
    assert os.path.exists(workdir / "offline" / "ranked.npz")
    assert not os.path.exists(workdir / "offline" / "round_1" / "ranked.npz")
    # The continued-SFT arm trains the NLL on the answers: no ranking metrics.
    sft_train = [r for r in records if r["phase"] == "sft/round_0"]
    assert sft_train and "pairwise_accuracy" not in sft_train[0]
    # No dead state: every phase's mid-phase train states went once its policy was committed.
    assert not list(workdir.glob("**/train")) and (workdir / "triplet" / "policies" / "2").is_dir()
    # Both assistants were trained and sampled once.
    for i in (0, 1):
        assert os.path.exists(workdir / f"assistant_{i}" / "samples.npz")
    # Triplets [answer, πθ(0) sample, πθ(t) sample]: πθ(0)'s samples generated once, for both rounds.
    triplet = [r for r in records if r["phase"] == "triplet/round_1"]
    assert "| triplet round 2 |" in stdout and len(triplet[0]["scores_K"]) == 3
    assert os.path.exists(workdir / "sft" / "samples.npz")
    ranked = load_ranked_set(workdir / "triplet" / "round_1" / "ranked.npz")
    samples = load_arrays(workdir / "sft" / "samples.npz")
    n = int(samples["lengths"][0])
    assert ranked.tokens_NxKxL[0, 1][ranked.loss_mask_NxKxL[0, 1]].tolist() == samples["tokens"][0, :n].tolist()
    # Round mixing: round 1 trains on round 0's set (re-scored with πθ(1)) followed by its own.
    mixed = load_ranked_set(workdir / "triplet" / "round_1" / "mixed.npz")
    round0 = load_ranked_set(workdir / "triplet" / "round_0" / "ranked.npz")
    n = len(ranked.tokens_NxKxL)
    assert len(mixed.tokens_NxKxL) == 2 * n and not os.path.exists(workdir / "triplet" / "round_0" / "mixed.npz")
    np.testing.assert_array_equal(mixed.tokens_NxKxL[:n], round0.tokens_NxKxL)
    np.testing.assert_array_equal(mixed.ref_logps_NxK[n:], ranked.ref_logps_NxK)
    from pl_dpo import scoring
    from pl_dpo.selfplay import rounds

    sp = rounds.SelfPlay(_config(workdir), str(workdir))
    policy1 = sp.policies.restore("triplet", sp.config.model, 1)
    np.testing.assert_array_equal(
        mixed.ref_logps_NxK[:n],
        scoring.score_ranked(policy1, round0, sp.config.eval.batch_size, batch_type=sp.settings.batch_type),
    )
    assert not np.array_equal(mixed.ref_logps_NxK[:n], round0.ref_logps_NxK)
    # The SFT anchor and the LiPO-lambda loss reached the preference arms' metrics.
    assert all("sft_nll" in r and "preference_loss" in r for r in triplet + ladder + offline_)


@pytest.mark.slow
def test_exported_policy_loads_in_transformers(offline_run):
    """The last policy, exported as a Hugging Face folder, gives the same logits in torch."""
    torch = pytest.importorskip("torch")
    import transformers

    workdir, _ = offline_run
    assert os.path.exists(workdir / "offline" / "hf_export" / "round_1" / "config.json")
    export = workdir / "sft" / "hf_export" / "round_2"
    hf = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(export)
    ids = tok("What is 2 + 3?")["input_ids"]
    with torch.no_grad():
        torch_logits = hf(torch.tensor([ids])).logits[0].numpy()

    import jax.numpy as jnp

    from pl_dpo.selfplay import rounds

    config = _config(workdir)
    sp = rounds.SelfPlay(config, str(workdir))
    policy = sp.policies.restore("sft", config.model, 2)
    tokens = jnp.asarray([ids])
    positions = jnp.arange(len(ids))[None]
    ours = policy.logits(policy(tokens, positions, jnp.ones_like(tokens, bool)))[0]
    np.testing.assert_allclose(np.asarray(ours), torch_logits, atol=1e-4)


@pytest.mark.slow
def test_verifier_ranked_samples_end_to_end(tmp_path, main_command):
    """Mode ranked_samples on the synthetic task: the answer on top of K-1 samples of πθ(t) sorted by
    the verifier's graded score, which the ranked set keeps as labels for LiPO-lambda."""
    workdir = tmp_path / "ranked_samples"
    flags = [
        "--config.modes=ranked_samples",
        "--config.loss.K=3",
        "--config.loss.variant=lipo_lambda",
        "--config.rounds.answer_on_top=True",
        "--config.rounds.max_steps=4",
    ]
    proc = main_command.run(workdir, *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| ranked_samples round 1 |" in proc.stdout
    ranked = load_ranked_set(workdir / "ranked_samples" / "round_0" / "ranked.npz")
    labels = ranked.labels_NxK
    assert labels.shape[1] == 3 and (labels[:, 0] == 2.0).all() and (np.diff(labels, axis=1) <= 0).all()
    from pl_dpo.tokenizer import load_tokenizer

    tok = load_tokenizer(workdir / "tokenizer")
    sp_examples = demo_examples(workdir)
    for n in range(0, len(labels), 37):
        for k in (1, 2):
            assert_label_is_the_grade(ranked, tok, n, k, sp_examples[n])
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert len([r for r in records if r["phase"] == "ranked_samples/round_0"]) == 4


def assert_label_is_the_grade(ranked, tok, n: int, k: int, example) -> None:
    """Response k of row n of a verifier-ranked set carries the verifier's grade of it as its label."""
    from pl_dpo.data import grade_answer

    ids = ranked.tokens_NxKxL[n, k][ranked.loss_mask_NxKxL[n, k]].tolist()
    text = tok.decode(ids, skip_special_tokens=True)
    assert grade_answer(example.task, example.meta, text) == pytest.approx(ranked.labels_NxK[n, k])


def demo_examples(workdir):
    """The training examples of configs/demo.py:quick as the run read them (its built dataset)."""
    options = dict(demo.get_config("quick").data.options)
    return load_split("synthetic", "train", data_dir=str(workdir / "tfds"), **options)


@pytest.mark.slow
def test_prompts_per_round_ranks_a_new_subset_each_round(tmp_path, main_command):
    """`rounds.prompts_per_round`: each round samples and ranks that many training prompts (a different random
    subset per round), the generation budget the second study matches between arms."""
    workdir = tmp_path / "subset"
    flags = [
        "--config.modes=ranked_samples",
        "--config.loss.K=3",
        "--config.rounds.prompts_per_round=48",
        "--config.rounds.num=2",
        "--config.rounds.max_steps=2",
    ]
    proc = main_command.run(workdir, *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from pl_dpo.tokenizer import load_tokenizer

    tok = load_tokenizer(workdir / "tokenizer")
    examples = demo_examples(workdir)
    chosen = []
    for t in (0, 1):
        ranked = load_ranked_set(workdir / "ranked_samples" / f"round_{t}" / "ranked.npz")
        tokens, mask = ranked.tokens_NxKxL, ranked.loss_mask_NxKxL
        assert tokens.shape[:2] == (48, 3)
        rows = []
        for n in range(48):  # which training prompt each row is: the one whose question its prompt holds
            in_prompt = ranked.attn_valid_NxKxL[n, 0] & ~mask[n, 0]
            prompt = tok.decode(tokens[n, 0][in_prompt].tolist(), skip_special_tokens=True)
            (index,) = [i for i, e in enumerate(examples) if e.prompt == prompt]
            rows.append(index)
            for k in range(3):  # the labels are the verifier's grades of that prompt's samples
                assert_label_is_the_grade(ranked, tok, n, k, examples[index])
        assert rows == sorted(set(rows))  # 48 distinct prompts, in data order
        chosen.append(set(rows))
    assert chosen[0] != chosen[1]
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert len([r for r in records if r["phase"] == "timing/generation" and "round_0" in r["stage"]]) == 3
