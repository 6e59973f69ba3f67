"""TFDS builders build from handwritten fixtures (real schemas, bad rows included),
offline, without TensorFlow, and read back exactly what was written."""

import json
import os
import socket
import sys

import pytest

from pl_dpo.data import DataError, load_split, make_builder, read_split, skipped_rows
from pl_dpo.data.schemas import rank_with_ties
from pl_dpo.data.stats import main as stats_main
from pl_dpo.data.synthetic import SyntheticConfig, check_answer, generate_examples, grade_answer

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
UC, UF, RJ = (os.path.join(FIX, f) for f in ("ultrachat.jsonl", "ultrafeedback.jsonl", "ranked.jsonl"))


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No test here may reach the network; TFDS writes under tmp_path only."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in data tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    yield
    assert "tensorflow" not in sys.modules


def test_synthetic_builds_and_reads_back_exactly(tmp_path):
    opts = dict(seed=3, n_train=60, n_test=20, max_difficulty=4)
    expected = generate_examples(SyntheticConfig(**opts))
    b = make_builder("synthetic", data_dir=str(tmp_path / "d"), **opts)
    assert os.path.basename(b.data_path.parent.parent) == "pl_dpo_synthetic"
    assert any(f.name.endswith("array_record-00000-of-00001") for f in b.data_path.iterdir())
    for split in ("train", "test"):
        got = read_split(b, split)
        assert got == sorted(expected[split], key=lambda e: e.example_id)
    train, test = expected["train"], expected["test"]
    assert len(train) == 60 and len(test) == 20
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert len({e.prompt for e in train}) == 60  # Deduplicated.
    assert {e.task for e in train} == {"add", "sort", "reverse"}
    for e in train + test:
        assert check_answer(e.task, e.meta, e.responses[0])
        assert check_answer(e.task, e.meta_dict, "  " + e.responses[0] + " \n")
        assert not check_answer(e.task, e.meta, e.responses[0] + "1")
    # Deterministic, and the seed matters.
    assert generate_examples(SyntheticConfig(**opts)) == expected
    assert generate_examples(SyntheticConfig(**{**opts, "seed": 4}))["train"] != train


def test_synthetic_checker_examples_and_errors():
    assert check_answer("add", {"a": 37, "b": 5}, "42")
    assert not check_answer("add", {"a": 37, "b": 5}, "43")
    assert check_answer("sort", '{"digits": "3140"}', "0134")
    assert check_answer("reverse", {"letters": "abcd"}, "d  c b a")
    assert not check_answer("reverse", {"letters": "abcd"}, "dcba")
    with pytest.raises(ValueError, match="unknown synthetic task"):
        check_answer("mul", {}, "1")
    with pytest.raises(ValueError, match="tasks"):
        SyntheticConfig(tasks=("mul",)).validate()
    with pytest.raises(ValueError, match="distinct prompts"):  # 1-digit addition has 100 prompts.
        generate_examples(SyntheticConfig(tasks=("add",), n_train=150, n_test=10, max_difficulty=1))


def test_synthetic_grader_is_graded_and_agrees_with_the_checker():
    assert grade_answer("add", {"a": 37, "b": 5}, " 42 ") == 1.0
    assert grade_answer("add", {"a": 37, "b": 5}, "43") == 0.5  # one of two characters right
    assert grade_answer("add", {"a": 37, "b": 5}, "421") == 2 / 3  # an extra character costs
    assert grade_answer("sort", '{"digits": "3140"}', "01") == 0.5  # so does a missing one
    assert grade_answer("reverse", {"letters": "abcd"}, "") == 0.0
    for e in generate_examples(SyntheticConfig(n_train=60, n_test=10))["train"]:
        for text in (e.responses[0], e.responses[0][::-1] + "x", e.responses[0][:-1]):
            assert (grade_answer(e.task, e.meta, text) == 1.0) == check_answer(e.task, e.meta, text)


UC_GOOD = [
    ("uc-001", "How do I boil an egg?", "Put it in boiling water for 9 minutes."),
    ("uc-002", "Name a prime number.", "7 is prime."),
    ("uc-003", "Say hi in French.", "Bonjour !"),
    ("uc-004", "Grüße aus Köln — 世界", "Hallo! 👋"),
]


def test_ultrachat_jsonl_and_parquet(tmp_path):
    with pytest.raises(DataError) as e:
        make_builder("ultrachat", files={"train_sft": UC})
    assert e.value.file == UC and e.value.row == 3 and e.value.field == "messages"
    assert "no assistant turn" in str(e.value) and "ultrachat.jsonl: row 4" in str(e.value)  # numbered from 1

    b = make_builder("ultrachat", files={"train_sft": UC}, skip_bad_rows=True)
    got = [(x.example_id, x.prompt, x.responses) for x in read_split(b, "train_sft")]
    assert got == [(i, p, (a,)) for i, p, a in UC_GOOD]
    skipped = skipped_rows(b)["skipped_train_sft"]
    assert sum(skipped.values()) == 3
    assert skipped["messages[1].content: empty"] == 1 and skipped["messages: missing"] == 1

    # The same schema as parquet (binary, so written here from the handwritten rows).
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in open(UC, encoding="utf-8")]
    good = [r for r in rows if r["prompt_id"].startswith("uc-0")]
    pq.write_table(pa.Table.from_pylist(good), tmp_path / "uc.parquet")
    got_pq = load_split("ultrachat", "train", files={"train": str(tmp_path / "uc.parquet")})
    assert [(x.example_id, x.prompt, x.responses) for x in got_pq] == got
    # Size knob: first N good rows in file order.
    two = load_split("ultrachat", "train", files={"train": str(tmp_path / "uc.parquet")}, max_rows=2)
    assert [x.example_id for x in two] == ["uc-001", "uc-002"]


def test_ultrafeedback_ranking_and_tie_rules():
    b = make_builder("ultrafeedback", files={"train": UF}, skip_bad_rows=True)
    got = read_split(b, "train")
    assert [x.prompt for x in got] == ["Write a haiku about rain.", "What is 2+2?", "Translate 'cat' to Spanish."]
    haiku, four, cat = got
    assert haiku.responses == (
        "Soft rain, quiet street, grey sky.",
        "Drops fall, puddles grow, frogs sing.",
        "Rain taps on the roof.",
        "It is raining.",
    )
    assert haiku.scores == (8.0, 7.0, 6.5, 3.0)
    assert four.responses == ("4", "Four.", "5", "22") and four.scores == (9.0, 9.0, 2.0, 2.0)  # stable
    assert cat.scores == (8.5, 1.0)  # "8.5" as a string is a number.
    skipped = skipped_rows(b)["skipped_train"]
    assert skipped == {
        "completions[0].overall_score: not a number: 'N/A'": 1,
        "completions: fewer than 2 rankable responses (1) under ties='stable'": 1,
        "completions[0].response: empty": 1,
        "instruction: missing": 1,
    }
    kf = load_split("ultrafeedback", "train", files={"train": UF}, skip_bad_rows=True, ties="keep_first")
    assert kf[1].responses == ("4", "5")
    dt = load_split("ultrafeedback", "train", files={"train": UF}, skip_bad_rows=True, ties="drop_tied_tail")
    assert [x.prompt for x in dt] == ["Write a haiku about rain.", "Translate 'cat' to Spanish."]  # "4"/"Four." tie.
    k2 = load_split("ultrafeedback", "train", files={"train": UF}, skip_bad_rows=True, k=2)
    assert k2[0].responses == haiku.responses[:2]
    fg = load_split(
        "ultrafeedback", "train", files={"train": UF}, skip_bad_rows=True, rating_field="fine-grained_score"
    )
    assert fg[1].responses == ("4", "Four.", "22", "5")
    with pytest.raises(
        DataError, match=r"row 3: field 'completions\[0\].annotations.helpfulness.Rating': not a number"
    ):
        make_builder("ultrafeedback", files={"train": UF}, rating_field="mean_annotation")
    with pytest.raises(DataError, match=r"row 4: field 'completions\[0\].overall_score': not a number: 'N/A'"):
        make_builder("ultrafeedback", files={"train": UF})
    with pytest.raises(ValueError, match="ties"):
        make_builder("ultrafeedback", files={"train": UF}, ties="random")
    assert rank_with_ties([1.0, 3.0, 3.0, 2.0], "stable") == [1, 2, 3, 0]
    assert rank_with_ties([1.0, 3.0, 3.0, 2.0], "keep_first") == [1, 3, 0]
    assert rank_with_ties([1.0, 3.0, 3.0, 2.0], "drop_tied_tail") == [1]


def test_ranked_jsonl_and_bad_inputs(tmp_path):
    b = make_builder("ranked_jsonl", files={"train": RJ}, skip_bad_rows=True)
    got = read_split(b, "train")
    assert [(x.example_id, x.prompt, x.responses) for x in got] == [
        ("r1", "Pick a colour.", ("Blue, calm and deep.", "Blue.", "Colour.")),
        ("r2", "Count to three.", ("1, 2, 3.", "1, 2.")),
        ("r3", "Spell cat.", ("c-a-t", "k-a-t", "c-a", "cat?")),
        ("r4", "Last one.", ("yes", "no")),
    ]
    assert sum(skipped_rows(b)["skipped_train"].values()) == 4
    with pytest.raises(DataError, match=r"row 4: field 'responses': 1 responses, need at least 2"):
        make_builder("ranked_jsonl", files={"train": RJ})
    lines = open(RJ, encoding="utf-8").read().splitlines()
    for bad_row, pattern in (
        (4, r"row 1: field 'prompt': missing"),
        (5, r"field 'responses\[1\]': empty"),
        (6, r"row 1: invalid JSON line"),
    ):
        p = tmp_path / f"bad{bad_row}.jsonl"
        p.write_text(lines[bad_row] + "\n" + lines[0] + "\n")
        with pytest.raises(DataError, match=pattern):
            make_builder("ranked_jsonl", files={"train": str(p)})
    # A line that is not UTF-8 is that row's error (skippable), named with its file and row.
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(
        lines[0].encode() + b"\n" + '{"prompt": "caf\xe9", "responses": ["a", "b"]}'.encode("latin-1") + b"\n"
    )
    with pytest.raises(DataError, match=r"latin1.jsonl: row 2: invalid JSON line: not UTF-8 text"):
        make_builder("ranked_jsonl", files={"train": str(p)})
    skipped = make_builder("ranked_jsonl", files={"train": str(p)}, skip_bad_rows=True)
    assert len(read_split(skipped, "train")) == 1 and sum(skipped_rows(skipped)["skipped_train"].values()) == 1
    with pytest.raises(DataError, match="missing.jsonl: file not found"):
        make_builder("ranked_jsonl", files={"train": str(tmp_path / "missing.jsonl")})
    with pytest.raises(ValueError, match="pass files"):
        make_builder("ranked_jsonl")
    with pytest.raises(ValueError, match="unknown data source"):
        make_builder("imagenet")
    empty = tmp_path / "onlybad.jsonl"
    empty.write_text(lines[3] + "\n")
    with pytest.raises(DataError, match="no usable rows"):
        make_builder("ranked_jsonl", files={"train": str(empty)}, skip_bad_rows=True)


def test_changed_file_is_rebuilt(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"prompt": "a", "responses": ["x", "y"]}\n')
    assert load_split("ranked_jsonl", "train", files={"train": str(p)})[0].responses == ("x", "y")
    p.write_text('{"prompt": "a", "responses": ["y", "x", "z"]}\n')
    assert load_split("ranked_jsonl", "train", files={"train": str(p)})[0].responses == ("y", "x", "z")


def test_stats_command(capsys):
    assert (
        stats_main(
            [
                "--source=ranked_jsonl",
                f"--files=train={RJ}",
                "--skip_bad_rows",
                "--max_prompt_len=8",
                "--max_response_len=4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    stats = json.loads(out[out.index('{\n  "source"') :])
    assert stats["rows"] == 4 and stats["responses"] == 11
    assert stats["k_distribution"] == {"2": 2, "3": 1, "4": 1}
    assert sum(stats["skipped_rows"].values()) == 4
    assert stats["prompts_truncated"] == 4  # Every templated prompt is longer than 8 tokens.
    assert stats["responses_truncated"] >= 1 and set(stats["prompt_len"]) == {"p50", "p90", "p99", "p100"}
