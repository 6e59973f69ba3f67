"""The lm-evaluation-harness backend (`pl_dpo.harness`): its kernels against float64 numpy on a random model, and
on the real pretrained model (SmolLM2-135M-Instruct, pl_dpo/models/smollm2.py) against Hugging Face PyTorch and
against lm-eval's own `hf` backend on local task files of every output type."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from scipy import special

from pl_dpo import logprobs, sampler
from pl_dpo.harness import requests as harness_requests
from pl_dpo.models import create_model, positions_from_valid, preset_config

VOCAB = 40


@pytest.fixture(scope="module")
def tiny():
    cfg = preset_config(
        "tiny-llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, head_dim=8, max_position_embeddings=48
    )
    model = create_model(cfg, seed=0)
    model.final_norm.scale[...] = model.final_norm.scale[...] * 10.0  # peaked distributions: greedy is decided
    return model


def _reference_logps(model, tokens: list[int]) -> np.ndarray:
    """float64 log-softmax of one unpadded row's logits [T, V]."""
    x = np.asarray([tokens], np.int32)
    v = np.ones_like(x, bool)
    hidden = model(x, positions_from_valid(v), v)
    logits = np.asarray(model.logits(hidden), np.float64)[0]
    return logits - special.logsumexp(logits, axis=-1, keepdims=True)


def test_token_logprobs_and_greedy_match_float64():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(3, 10, 16)).astype(np.float32)
    unembed = rng.normal(size=(16, 50)).astype(np.float32)
    logits = hidden.astype(np.float64) @ unembed.astype(np.float64)
    targets = rng.integers(0, 50, (3, 10))
    targets[0, :4] = logits[0, :4].argmax(-1)  # some greedy tokens
    logps, greedy = logprobs.token_logprobs_and_greedy(hidden, unembed, targets, chunk_size=4)
    want = np.take_along_axis(logits - special.logsumexp(logits, -1, keepdims=True), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(logps), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(greedy), logits.argmax(-1) == targets)


def _requests_with_shared_contexts(rng, tiny) -> list[tuple[list[int], list[int]]]:
    requests = []
    for n_ctx, n_cont in [(1, 1), (5, 3), (12, 1), (30, 6), (45, 8), (3, 2), (7, 7)]:
        requests.append((rng.integers(1, VOCAB, n_ctx).tolist(), rng.integers(1, VOCAB, n_cont).tolist()))
    # Multiple choice: contexts with 2-4 continuations of different lengths (one near max_length: the choices
    # cut its start differently, so it packs as separate contexts).
    for n_ctx, choices in [(6, (1, 2, 1, 3)), (20, (4, 1)), (38, (1, 3, 5)), (2, (2, 2, 2))]:
        context = rng.integers(1, VOCAB, n_ctx).tolist()
        requests += [(context, rng.integers(1, VOCAB, n).tolist()) for n in choices]
    # A continuation that greedy decoding gives (each token the argmax after the ones before), as one choice of three.
    context = [5, 9, 2]
    cont = []
    for _ in range(3):
        cont.append(int(_reference_logps(tiny, context + cont)[-1].argmax()))
    requests += [(context, [7, 1]), (context, cont), (context, [4])]
    return requests


@pytest.mark.parametrize("share_contexts", [True, False])
def test_continuation_scores_match_each_row_scored_alone(tiny, share_contexts):
    requests = _requests_with_shared_contexts(np.random.default_rng(1), tiny)
    max_length = 40
    got = harness_requests.continuation_scores(
        tiny, requests, batch_size=3, max_length=max_length, share_contexts=share_contexts
    )
    for (context, continuation), (logp, greedy) in zip(requests, got, strict=True):
        whole = (context + continuation)[-(max_length + 1) :]  # left-truncated as lm-eval's hf backend does
        ref = _reference_logps(tiny, whole[:-1])
        n = len(continuation)
        rows = ref[-n:]
        targets = np.asarray(whole[-n:])
        assert logp == pytest.approx(rows[np.arange(n), targets].sum(), rel=1e-5, abs=1e-5)
        assert greedy == bool((rows.argmax(-1) == targets).all())
    assert got[-2][1] and not got[-1][1]  # the greedy continuation is said to be greedy, its neighbours not


def test_shared_contexts_pack_each_context_once():
    from pl_dpo.harness import shared_context

    groups = [([1, 2, 3], [(0, [4]), (1, [5, 6]), (2, [7])]), ([9] * 10, [(3, [1, 2, 3]), (4, [4, 5, 6])])]
    rows = shared_context.pack_rows(groups, max_slots=14)
    assert rows == [
        ([1, 2, 3], [(0, [4]), (1, [5, 6]), (2, [7])]),
        ([9] * 10, [(3, [1, 2, 3])]),
        ([9] * 10, [(4, [4, 5, 6])]),
    ]


def test_continuation_scores_on_a_mesh_equal_one_device(tiny):
    from flax import nnx

    from pl_dpo import sharding

    mesh = sharding.make_mesh(2, 2, 2)
    graphdef, state = nnx.split(tiny)
    shardings = sharding.logical_to_shardings(state, mesh, sharding.DEFAULT_DECODER_RULES)
    sharded = nnx.merge(graphdef, jax.device_put(state, shardings))
    requests = _requests_with_shared_contexts(np.random.default_rng(2), tiny)
    one = harness_requests.continuation_scores(tiny, requests, batch_size=2, max_length=40)
    many = harness_requests.continuation_scores(sharded, requests, batch_size=2, max_length=40)
    np.testing.assert_allclose([s for s, _ in many], [s for s, _ in one], rtol=1e-5)
    assert [g for _, g in many] == [g for _, g in one]


def test_generate_gives_each_prompt_what_the_sampler_gives_it_alone(tiny):
    settings = sampler.SamplingConfig(max_new_tokens=5, greedy=True, eos_ids=(3,))
    prompts = [[4, 5, 6], [7, 8], [9, 10, 11, 12, 13], [14]]
    got = harness_requests.generate(tiny, prompts, settings, batch_size=2)
    for prompt, new in zip(prompts, got, strict=True):
        alone = sampler.generate(tiny, np.asarray([prompt]), np.ones((1, len(prompt)), bool), 0, settings)
        assert new == np.asarray(alone.tokens_BxT)[0, : int(alone.lengths_B[0])].tolist()
        assert 1 <= len(new) <= 5 and (len(new) == 5 or new[-1] == 3)


@pytest.mark.parametrize(
    "harness, message",
    [
        pytest.param(  # ~15 s: lm-eval indexes its own thousands of task files to say a name is in none of them
            {"tasks": "pl_dpo_nope", "include_path": "TASKS"},
            r"config.eval.harness.tasks: unknown task\(s\) pl_dpo_nope \(lm-eval's, or YAMLs in include_path\); "
            r"tasks in .*: pl_dpo_gen, pl_dpo_hub, pl_dpo_ll, pl_dpo_mc, pl_dpo_rolling$",
            marks=pytest.mark.slow,
        ),
        ({"tasks": "pl_dpo_mc", "include_path": "/no/such/folder"}, r"include_path=/no/such/folder: no such folder"),
        (
            {"tasks": "pl_dpo_hub", "include_path": "TASKS"},
            r"config.eval.harness.tasks: task pl_dpo_hub: its dataset is not on this machine and nothing is "
            r"downloaded \(ConnectionError: .*\); write a task YAML with dataset_path: json",
        ),
        (
            {"tasks": "pl_dpo_mc", "include_path": "TASKS", "num_fewshot": 5},
            r"config.eval.harness.tasks: task pl_dpo_mc: num_fewshot=5, but its few-shot split has 4 examples",
        ),
        ({"tasks": "pl_dpo_mc", "include_path": "TASKS", "max_length": -1}, r"max_length=-1 must be >= 2"),
    ],
)
def test_harness_settings_a_run_cannot_use_are_named_before_it_starts(tmp_path, harness, message):
    pytest.importorskip("lm_eval")
    from configs import demo
    from pl_dpo import config_lib

    _write_tasks(tmp_path, 0)
    # A task whose dataset is on the Hugging Face Hub: lm-eval would download it.
    (tmp_path / "pl_dpo_hub.yaml").write_text(
        "task: pl_dpo_hub\ndataset_path: pl-dpo-nobody/no-such-dataset\noutput_type: loglikelihood\n"
        "test_split: test\ndoc_to_text: q\ndoc_to_target: a\n"
    )
    config = demo.get_config("quick")
    config.eval.harness.update({k: str(tmp_path) if v == "TASKS" else v for k, v in harness.items()})
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config)
    config.eval.harness.update(
        tasks="pl_dpo_mc,pl_dpo_gen", include_path=str(tmp_path), num_fewshot=1, limit=3, max_length=0
    )
    config_lib.validate(config)  # known tasks: accepted, and read as typed settings
    settings = config_lib.run_settings(config)
    assert settings.harness.tasks == ("pl_dpo_mc", "pl_dpo_gen") and settings.harness.num_fewshot == 1
    assert settings.harness.limit == 3 and settings.harness.batch_size == config.eval.batch_size
    assert "harness" in settings.eval_record["eval"]
    config.eval.harness.tasks = ""
    assert config_lib.run_settings(config).harness is None
    assert "harness" not in config_lib.run_settings(config).eval_record["eval"]  # as runs made before it


def test_the_results_plot_has_a_panel_per_harness_metric(tmp_path):
    from pl_dpo.workdir import plots

    table = [
        {"arm": "sft", "round": 0, "harness/arc_easy/acc": 0.40, "harness/arc_easy/acc_stderr": 0.02},
        {"arm": "spin", "round": 1, "harness/arc_easy/acc": 0.45, "harness/arc_easy/acc_stderr": 0.02},
    ]
    assert plots.arm_curves(table, "harness/arc_easy/acc") == {"spin": ([0, 1], [0.40, 0.45])}
    assert plots.plot_rounds(table, str(tmp_path / "results.png"))  # no held-out metric: the harness panel alone
    assert (tmp_path / "results.png").stat().st_size > 10_000


# ----------------------------------------------------------------------------- the real pretrained model


def _chat_ids(tokenizer, question: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.slow  # ~60 s: SmolLM2-135M in both frameworks
def test_real_model_logits_and_greedy_generation_match_transformers(smollm2):
    torch = pytest.importorskip("torch")
    import transformers

    from pl_dpo.models.hf_io import from_pretrained

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2)
    reference = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    model = from_pretrained(smollm2)
    questions = ["What is 12 + 35?", "Name a colour of the sky."]
    prompts = [_chat_ids(tokenizer, q) for q in questions]
    x = np.asarray([prompts[0]], np.int32)
    v = np.ones_like(x, bool)
    logits = np.asarray(model.logits(model(x, positions_from_valid(v), v)))
    with torch.no_grad():
        want = reference(torch.tensor(x, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(logits, want, atol=2e-3, rtol=1e-4)
    # Greedy decoding through the chat template until <|im_end|>, token for token.
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    settings = sampler.SamplingConfig(max_new_tokens=24, greedy=True, eos_ids=(eos,), pad_id=eos)
    ours = harness_requests.generate(model, prompts, settings, batch_size=2)
    for prompt, new in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = reference.generate(
                torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=eos
            )
        assert new == out[0, len(prompt) :].tolist()
    assert "12 + 35" in tokenizer.decode(ours[0])


def _write_tasks(folder, fewshot: int) -> list[str]:
    """Local lm-eval tasks of every output type over a small arithmetic set (JSON lines, no download)."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(12):
        a, b = (int(x) for x in rng.integers(1, 20, 2))
        wrong = sorted({a + b + 1, a + b - 1, a + b + 10} - {a + b})[:3]
        choices = [str(c) for c in [a + b, *wrong]]
        rng.shuffle(choices)
        rows.append({"question": f"What is {a} + {b}?", "answer": str(a + b), "choices": choices,
                     "label": choices.index(str(a + b)), "text": f"The sum of {a} and {b} is {a + b}."})  # fmt: skip
    for split, part in (("train", rows[:4]), ("test", rows[4:])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    data = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    train: {folder}/train.jsonl\n    test: {folder}/test.jsonl\n"
    data += "training_split: train\nfewshot_split: train\ntest_split: test\n"
    tasks = {
        "pl_dpo_mc": "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n",
        "pl_dpo_ll": "output_type: loglikelihood\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_target: \" {{answer}}\"\nmetric_list:\n  - metric: acc\n  - metric: perplexity\n",
        "pl_dpo_rolling": "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
        "pl_dpo_gen": "output_type: generate_until\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_target: \" {{answer}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n  do_sample: false\n"
        "  max_gen_toks: 12\nmetric_list:\n  - metric: exact_match\n",
    }  # fmt: skip
    for name, body in tasks.items():
        shots = 0 if name == "pl_dpo_rolling" else fewshot
        (folder / f"{name}.yaml").write_text(f"task: {name}\n{data}{body}num_fewshot: {shots}\n")
    return list(tasks)


@pytest.mark.slow  # ~2 min: four tasks through both backends
@pytest.mark.parametrize("chat, fewshot", [(False, 0), (True, 2)])
def test_scores_equal_lm_evals_own_hf_backend(smollm2, tmp_path, chat, fewshot):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from pl_dpo.harness.lm import PlDpoLM

    names = _write_tasks(tmp_path, fewshot)
    manager = TaskManager(include_path=str(tmp_path))

    def evaluate(lm):
        return lm_eval.simple_evaluate(
            model=lm, tasks=names, task_manager=manager, log_samples=True, apply_chat_template=chat,
            fewshot_as_multiturn=chat and fewshot > 0, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
        )  # fmt: skip

    ours = evaluate(PlDpoLM(path=smollm2, batch_size=4))
    theirs = evaluate(HFLM(pretrained=smollm2, dtype="float32", batch_size=4, device="cpu"))
    for name in names:
        mine, ref = ours["samples"][name], theirs["samples"][name]
        assert [s["doc_id"] for s in mine] == [s["doc_id"] for s in ref] and len(mine) == 8
        for a, b in zip(mine, ref, strict=True):
            assert a["arguments"] == b["arguments"]  # the same prompts, chat template and shots included
            for x, y in zip(a["resps"], b["resps"], strict=True):
                if name == "pl_dpo_gen":
                    assert x == y
                elif name == "pl_dpo_rolling":
                    assert x[0] == pytest.approx(y[0], rel=1e-4)
                else:
                    assert x[0][0] == pytest.approx(y[0][0], rel=1e-4) and x[0][1] == y[0][1]
        for metric, value in theirs["results"][name].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert ours["results"][name][metric] == pytest.approx(value, rel=1e-4), (name, metric)


@pytest.mark.slow  # ~45 s: lm-eval's own command line with the pl_dpo backend, in a subprocess
def test_lm_evals_own_command_line_evaluates_a_model_folder(smollm2, tmp_path, main_command):
    import glob
    import site
    import subprocess
    import sys

    pytest.importorskip("lm_eval")
    # The install's one-line .pth (setup.py) is what lets the bare `lm_eval` find the backend.
    assert any(os.path.exists(os.path.join(d, "pl_dpo_lm_eval.pth")) for d in site.getsitepackages()), (
        "pl_dpo_lm_eval.pth is not in site-packages: reinstall pl_dpo (pip install -e .)"
    )
    _write_tasks(tmp_path, 0)
    argv = [os.path.join(os.path.dirname(sys.executable), "lm_eval"), "--model", "pl_dpo", "--model_args", f"path={smollm2}",
            "--batch_size", "4", "--tasks", "pl_dpo_mc", "--include_path", str(tmp_path), "--limit", "2",
            "--output_path", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(argv, cwd=tmp_path, env=main_command.env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pl_dpo_mc" in done.stdout and "acc" in done.stdout
    (results,) = glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)
    scores = json.loads(open(results).read())["results"]["pl_dpo_mc"]
    assert 0.0 <= scores["acc,none"] <= 1.0


@pytest.mark.slow  # ~90 s: the quick demo with two harness tasks, then the same command again
def test_harness_scores_every_policy_in_the_run_and_a_resume_does_not_score_again(tmp_path, main_command):
    pytest.importorskip("lm_eval")
    from pl_dpo.workdir import layout

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_tasks(tasks, 0)
    flags = ("--config.modes=spin", "--config.sft.steps=8", "--config.rounds.max_steps=4",
             "--config.eval.harness.tasks=pl_dpo_mc,pl_dpo_gen", f"--config.eval.harness.include_path={tasks}",
             "--config.eval.harness.limit=4")  # fmt: skip
    workdir = tmp_path / "run"
    first = main_command.run(workdir, *flags)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stderr.count("harness tasks pl_dpo_mc,pl_dpo_gen on") == 2  # πθ(0) and πθ(1)
    for lineage, index in (("sft", 0), ("spin", 1)):
        metrics = json.loads(open(layout.eval_path(str(workdir), lineage, index)).read())["metrics"]
        assert 0.0 <= metrics["harness/pl_dpo_mc/acc"] <= 1.0 and "harness/pl_dpo_mc/acc_stderr" in metrics
        assert 0.0 <= metrics["harness/pl_dpo_gen/exact_match"] <= 1.0
    assert "harness/pl_dpo_mc/acc" in (workdir / "results.md").read_text().splitlines()[0]
    logged = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert sum("harness/pl_dpo_mc/acc" in record for record in logged) == 2
    # The standalone backend on the run's saved πθ(1) (path=<workdir>/spin/policies/1) scores what the run scored.
    import ml_collections

    from pl_dpo import config_lib
    from pl_dpo.harness import run as harness_run
    from pl_dpo.harness.lm import PlDpoLM

    saved = PlDpoLM(path=layout.policy_dir(str(workdir), "spin", 1))
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))  # the run's own
    again_scores = harness_run.scores(saved.model, saved.tokenizer, config_lib.run_settings(config).harness, seed=0)
    spin_1 = json.loads(open(layout.eval_path(str(workdir), "spin", 1)).read())["metrics"]
    assert again_scores == {name[len("harness/") :]: v for name, v in spin_1.items() if name.startswith("harness/")}
    table = (workdir / "results.md").read_text()
    again = main_command.run(workdir, *flags)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "harness tasks" not in again.stderr  # every policy's scores come from its eval_<t>.json
    assert (workdir / "results.md").read_text() == table


def test_a_run_policy_that_is_not_there_is_one_line_naming_what_is(tmp_path, main_command):
    import subprocess
    import sys

    pytest.importorskip("lm_eval")
    _write_tasks(tmp_path, 0)
    workdir = tmp_path / "run"
    (workdir / "spin" / "policies").mkdir(parents=True)
    (workdir / "config.json").write_text("{}")
    missing = workdir / "spin" / "policies" / "3"
    argv = [sys.executable, "-m", "pl_dpo.harness", "--model", "pl_dpo", "--model_args", f"path={missing}",
            "--tasks", "pl_dpo_mc", "--include_path", str(tmp_path)]  # fmt: skip
    done = subprocess.run(argv, cwd=tmp_path, env=main_command.env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == f"error: {missing}: no saved policy 3 of spin (saved: none)"
    assert "Traceback" not in done.stderr


def test_a_chat_template_asked_of_a_tokenizer_without_one_is_named(tiny, tmp_path):
    pytest.importorskip("lm_eval")
    from pl_dpo.harness.lm import NoChatTemplate, PlDpoLM
    from pl_dpo.tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(str(tmp_path / "tok"), vocab_size=384)  # only its template is used
    lm = PlDpoLM(model=tiny, tokenizer=tokenizer)
    assert "What is 2 + 2?" in lm.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}])
    tokenizer.chat_template = None
    with pytest.raises(NoChatTemplate, match="--apply_chat_template: the tokenizer .* has no chat template"):
        lm.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}])


@pytest.mark.slow  # ~2 min: configs/smollm2.py:quick, one SPIN step on SmolLM2-135M-Instruct with two harness tasks
def test_a_spin_round_of_the_real_model_in_the_command(smollm2, tmp_path, main_command):
    pytest.importorskip("lm_eval")
    from pl_dpo.workdir import layout

    done = main_command.run(tmp_path / "run", config="configs/smollm2.py:quick,lora", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "run" / "results.md").read_text()
    assert "harness/pl_dpo_arith_mc/acc" in table and "harness/pl_dpo_arith_gen/exact_match/last_number" in table
    start, after = (
        json.loads(open(layout.eval_path(str(tmp_path / "run"), lineage, t)).read())["metrics"]
        for lineage, t in (("sft", 0), ("spin", 1))
    )
    # One LoRA step towards the dataset's bare answers ("82", not "37 + 45 = 82 ...") raises their likelihood.
    assert after["answer_logp"] > start["answer_logp"] + 0.5, (start["answer_logp"], after["answer_logp"])

    # The round's adapters as PEFT wrote them: peft on the shipped model (πθ(0)) gives πθ(1)'s logits.
    torch, peft, transformers = (pytest.importorskip(m) for m in ("torch", "peft", "transformers"))
    from pl_dpo.selfplay.policies import saved_policy

    policy, tokenizer = saved_policy(str(tmp_path / "run" / "spin" / "policies" / "1"))
    ids = np.asarray([tokenizer("What is 37 + 45? The answer is 82.")["input_ids"]], np.int32)
    valid = np.ones_like(ids, bool)
    ours = np.asarray(policy.logits(policy(ids, np.arange(ids.shape[1])[None], valid)))[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, str(tmp_path / "run" / "spin" / "round_0" / "adapter")).eval()
    with torch.no_grad():
        theirs = hf(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits[0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-3)


def test_a_run_that_asks_for_a_chat_template_its_tokenizer_lacks_is_refused(tmp_path):
    from pl_dpo.harness import run as harness_run
    from pl_dpo.settings import HarnessSettings
    from pl_dpo.tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(str(tmp_path / "tok"), vocab_size=384)
    settings = HarnessSettings(("pl_dpo_mc",), None, None, None, 8, apply_chat_template=True, max_length=None)
    harness_run.check_chat_template(settings, tokenizer)  # the tiny tokenizer has one
    harness_run.check_chat_template(None, tokenizer)  # no harness: nothing to check
    tokenizer.chat_template = None
    with pytest.raises(harness_run.TaskError, match=r"apply_chat_template=True, but the run's tokenizer .* has no"):
        harness_run.check_chat_template(settings, tokenizer)


def test_lm_evals_catalogue_lists_pl_dpo_without_importing_it():
    """The install's .pth hook: lm-eval's registry names `pl_dpo`, and nothing of pl_dpo's backend or jax is imported
    until lm-eval asks for it (then it is the backend class)."""
    import subprocess
    import sys

    pytest.importorskip("lm_eval")
    probe = (
        "import sys; import lm_eval.models; from lm_eval.api.registry import model_registry, get_model; "
        "print('pl_dpo' in model_registry, 'jax' in sys.modules, 'pl_dpo.harness.lm' in sys.modules); "
        "print(get_model('pl_dpo').__name__)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "False", "False", "PlDpoLM"]


def test_the_hook_registers_pl_dpo_in_a_process_that_imported_lm_eval_first():
    pytest.importorskip("lm_eval")
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import model_registry

    from pl_dpo.harness import lm_eval_hook

    lm_eval_hook.install()
    assert "pl_dpo" in model_registry
