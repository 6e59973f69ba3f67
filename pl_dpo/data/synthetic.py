"""Built-in verifiable tasks: the embedded default dataset.

Three task families, each with a difficulty knob d (1..8):

  add      "What is 37 + 5?"       -> "42"        operands of up to d digits (one has d)
  sort     "Sort: 3140"            -> "0134"      d+1 digits
  reverse  "Reverse: a b c d"      -> "d c b a"   d+1 letters

Formats are chosen for the tiny tokenizer (`pl_dpo.tokenizer`): digits are one
token each and " x" (space + letter) is one token, so even at max_difficulty=8
a templated prompt is at most 26 tokens and an answer at most 10 (EOS included);
at the default max_difficulty=3, at most 16 and 5.

Measured (2026-11-26, a throwaway torch check, not part of the suite): a 0.89M
parameter 4-layer transformer, SFT for 2 minutes on one CPU thread (613 steps of
batch 64) on 4000 examples at max_difficulty=4, greedy decoding of 300 held-out
prompts: reverse 96/97, sort 65/94, add 8/109 (169/300). Sort and add get
harder with d, so there is room left for preference training.

Examples are generated from a seed, deduplicated by prompt, and split into
train / test with no prompt in both. `check_answer` recomputes the ground truth
from the task metadata, so it does not trust any stored answer string.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import numpy as np

from pl_dpo.data.schemas import Example

TASKS = ("add", "sort", "reverse")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """What to generate. Difficulty d of one example is drawn in [min, max]."""

    seed: int = 0
    n_train: int = 2000
    n_test: int = 200
    tasks: tuple[str, ...] = TASKS
    min_difficulty: int = 1
    max_difficulty: int = 3

    def validate(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"SyntheticConfig.tasks: unknown {bad} (known: {TASKS})")
        if not 1 <= self.min_difficulty <= self.max_difficulty <= 8:
            raise ValueError(
                f"SyntheticConfig: need 1 <= min_difficulty <= max_difficulty <= 8, got "
                f"{self.min_difficulty}, {self.max_difficulty}"
            )
        if self.n_train < 1 or self.n_test < 0:
            raise ValueError(f"SyntheticConfig: n_train={self.n_train} must be >= 1 and n_test={self.n_test} >= 0")


def _meta_add(rng: np.random.Generator, d: int) -> dict[str, Any]:
    # Operands have 1..d digits each (the larger one exactly d), so d drives carries.
    lo = 0 if d == 1 else 10 ** (d - 1)
    a = int(rng.integers(lo, 10**d))
    b = int(rng.integers(0, 10 ** int(rng.integers(1, d + 1))))
    if rng.integers(2):
        a, b = b, a
    return {"a": a, "b": b}


def _meta_sort(rng: np.random.Generator, d: int) -> dict[str, Any]:
    return {"digits": "".join(str(int(x)) for x in rng.integers(0, 10, size=d + 1))}


def _meta_reverse(rng: np.random.Generator, d: int) -> dict[str, Any]:
    return {"letters": "".join(_LETTERS[int(x)] for x in rng.integers(0, 26, size=d + 1))}


_MAKERS = {"add": _meta_add, "sort": _meta_sort, "reverse": _meta_reverse}


def render_prompt(task: str, meta: dict[str, Any]) -> str:
    if task == "add":
        return f"What is {meta['a']} + {meta['b']}?"
    if task == "sort":
        return f"Sort: {meta['digits']}"
    if task == "reverse":
        return "Reverse: " + " ".join(meta["letters"])
    raise ValueError(f"unknown synthetic task {task!r} (known: {TASKS})")


def solve(task: str, meta: dict[str, Any]) -> str:
    """The ground-truth answer, computed from the metadata."""
    if task == "add":
        return str(int(meta["a"]) + int(meta["b"]))
    if task == "sort":
        return "".join(sorted(meta["digits"]))
    if task == "reverse":
        return " ".join(reversed(meta["letters"]))
    raise ValueError(f"unknown synthetic task {task!r} (known: {TASKS})")


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def check_answer(task: str, prompt_meta: dict[str, Any] | str, text: str) -> bool:
    """True iff `text` (a decoded model response, special tokens removed) is correct.

    Exact match after collapsing whitespace runs and stripping the ends, against
    the answer recomputed from `prompt_meta` (a dict or its JSON string).
    """
    meta = json.loads(prompt_meta) if isinstance(prompt_meta, str) else prompt_meta
    return _normalise(text) == solve(task, meta)


def grade_answer(task: str, prompt_meta: dict[str, Any] | str, text: str) -> float:
    """A graded verifier score in [0, 1]: the fraction of characters of the (normalised) response
    that match the answer position by position, over the longer of the two. 1.0 iff
    `check_answer` is True; a wrong length costs what it adds or leaves out."""
    meta = json.loads(prompt_meta) if isinstance(prompt_meta, str) else prompt_meta
    got, want = _normalise(text), solve(task, meta)
    if not got and not want:
        return 1.0
    return sum(a == b for a, b in zip(got, want)) / max(len(got), len(want))


def generate_examples(cfg: SyntheticConfig) -> dict[str, list[Example]]:
    """{"train": [...], "test": [...]}: unique prompts, disjoint splits, deterministic.

    Tasks alternate round-robin so every split is balanced. Raises if the task
    space at these difficulties has fewer distinct prompts than requested.
    """
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    n_total = cfg.n_train + cfg.n_test
    seen: set[str] = set()
    out: list[Example] = []
    attempts, max_attempts = 0, 50 * n_total + 1000
    while len(out) < n_total:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(
                f"synthetic: only {len(out)} distinct prompts found for {n_total} requested "
                f"(tasks={cfg.tasks}, difficulty {cfg.min_difficulty}..{cfg.max_difficulty}); "
                "lower n_train/n_test or raise max_difficulty"
            )
        task = cfg.tasks[len(out) % len(cfg.tasks)]
        d = int(rng.integers(cfg.min_difficulty, cfg.max_difficulty + 1))
        meta = _MAKERS[task](rng, d)
        prompt = render_prompt(task, meta)
        if prompt in seen:
            continue
        seen.add(prompt)
        meta["difficulty"] = d
        out.append(
            Example(
                example_id=f"{task}-{len(out)}",
                prompt=prompt,
                responses=(solve(task, meta),),
                task=task,
                meta=json.dumps(meta, sort_keys=True),
            )
        )
    # The test split is a fixed-seed random subset, so both splits span all difficulties.
    perm = np.random.default_rng([cfg.seed, 1]).permutation(n_total)
    test_idx = set(perm[: cfg.n_test].tolist())
    return {
        "train": [e for i, e in enumerate(out) if i not in test_idx],
        "test": [e for i, e in enumerate(out) if i in test_idx],
    }
