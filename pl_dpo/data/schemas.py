"""Row converters: UltraChat / UltraFeedback / ranked JSONL rows -> `Example`.

All sources become the same record, `Example` (prompt text + responses best
first), so tokenisation and batching have one code path. Converters are pure
and raise `DataError` naming file, row and field; the builders decide (through
`BadRowPolicy`) whether to raise or skip and count.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from pl_dpo.data.files import DataError, require_number, require_str

TIE_RULES = ("stable", "drop_tied_tail", "keep_first")


@dataclasses.dataclass(frozen=True)
class Example:
    """One prompt with its responses ranked best first.

    `scores` are the source ratings aligned with `responses` (empty when the
    source has none); `task` / `meta` (a JSON string) are set by the synthetic
    tasks so that `check_answer(task, json.loads(meta), text)` can grade.
    """

    example_id: str
    prompt: str
    responses: tuple[str, ...]
    scores: tuple[float, ...] = ()
    task: str = ""
    meta: str = ""

    @property
    def meta_dict(self) -> dict[str, Any]:
        return json.loads(self.meta) if self.meta else {}


def ultrachat_to_example(file: str, row: int, obj: Any) -> Example:
    """`HuggingFaceH4/ultrachat_200k` row -> (first user turn, first assistant turn after it).

    As in SPIN's reference data preparation, only the first exchange is used:
    the prompt is the first user message and the answer the assistant message
    that follows it.
    """
    if not isinstance(obj, dict) or "messages" not in obj or obj["messages"] is None:
        require_str(file, row, obj, "messages")  # Raises the right DataError.
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(file, row, "messages", "expected a non-empty list of {role, content}")
    user_i = None
    for i, m in enumerate(messages):
        role = require_str(file, row, m, "role", where=f"messages[{i}].role")
        if role == "user":
            user_i = i
            break
    if user_i is None:
        raise DataError(file, row, "messages", "no user turn (prompt)")
    prompt = require_str(file, row, messages[user_i], "content", where=f"messages[{user_i}].content")
    if user_i + 1 >= len(messages):
        raise DataError(file, row, "messages", "no assistant turn after the first user turn (answer)")
    nxt = messages[user_i + 1]
    if require_str(file, row, nxt, "role", where=f"messages[{user_i + 1}].role") != "assistant":
        raise DataError(file, row, f"messages[{user_i + 1}].role", "expected 'assistant' after the first user turn")
    answer = require_str(file, row, nxt, "content", where=f"messages[{user_i + 1}].content")
    pid = obj.get("prompt_id")
    example_id = str(pid) if pid not in (None, "") else f"{os.path.basename(file)}:{row}"
    return Example(example_id=example_id, prompt=prompt, responses=(answer,))


def _rating(file: str, row: int, comp: dict, i: int, rating_field: str) -> float:
    where = f"completions[{i}].{rating_field}"
    if rating_field == "mean_annotation":
        ann = comp.get("annotations")
        if not isinstance(ann, dict) or not ann:
            raise DataError(file, row, f"completions[{i}].annotations", "missing (needed for mean_annotation)")
        vals = []
        for aspect, a in sorted(ann.items()):
            raw = a.get("Rating") if isinstance(a, dict) else a
            vals.append(require_number(file, row, raw, f"completions[{i}].annotations.{aspect}.Rating"))
        return sum(vals) / len(vals)
    if rating_field not in comp:
        raise DataError(file, row, where, "missing")
    return require_number(file, row, comp[rating_field], where)


def rank_with_ties(scores: list[float], rule: str) -> list[int]:
    """Indices ordered best first under a tie rule (Python's sort is stable).

    - "stable": keep every response; ties keep their original (file) order.
    - "drop_tied_tail": keep the strictly decreasing prefix; cut at the first
      response whose score equals its predecessor's (the ranking below a tie is
      not an observed strict order).
    - "keep_first": of each group of equal scores keep only the first in file order.
    """
    if rule not in TIE_RULES:
        raise ValueError(f"tie rule {rule!r} not in {TIE_RULES}")
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    if rule == "stable":
        return order
    out = [order[0]] if order else []
    for i in order[1:]:
        if scores[i] == scores[out[-1]]:
            if rule == "drop_tied_tail":
                break
            continue
        out.append(i)
    return out


def ultrafeedback_to_example(
    file: str, row: int, obj: Any, *, k: int = 4, rating_field: str = "overall_score", ties: str = "stable"
) -> Example:
    """`openbmb/UltraFeedback` row -> up to `k` completions ranked by rating.

    rating_field: "overall_score", "fine-grained_score", or "mean_annotation"
    (mean of the per-aspect `annotations[*].Rating`). A rating that is not a
    number (e.g. "N/A") is a bad row. Fewer than 2 responses after the tie rule
    is a bad row (nothing to rank).
    """
    prompt = require_str(file, row, obj, "instruction")
    comps = obj.get("completions")
    if not isinstance(comps, list):
        raise DataError(file, row, "completions", "missing or not a list")
    responses, scores = [], []
    for i, c in enumerate(comps):
        responses.append(require_str(file, row, c, "response", where=f"completions[{i}].response"))
        scores.append(_rating(file, row, c, i, rating_field))
    order = rank_with_ties(scores, ties)[:k]
    if len(order) < 2:
        raise DataError(file, row, "completions", f"fewer than 2 rankable responses ({len(order)}) under ties={ties!r}")
    example_id = str(obj.get("id") or f"{os.path.basename(file)}:{row}")
    return Example(
        example_id=example_id,
        prompt=prompt,
        responses=tuple(responses[i] for i in order),
        scores=tuple(scores[i] for i in order),
    )


def ranked_jsonl_to_example(file: str, row: int, obj: Any, *, min_responses: int = 2) -> Example:
    """`{"prompt": str, "responses": [best, ..., worst], "id"?: str}` -> Example."""
    prompt = require_str(file, row, obj, "prompt")
    resps = obj.get("responses")
    if not isinstance(resps, list):
        raise DataError(file, row, "responses", "missing or not a list")
    if len(resps) < min_responses:
        raise DataError(file, row, "responses", f"{len(resps)} responses, need at least {min_responses}")
    responses = tuple(require_str(file, row, {"r": r}, "r", where=f"responses[{i}]") for i, r in enumerate(resps))
    example_id = str(obj.get("id") or f"{os.path.basename(file)}:{row}")
    return Example(example_id=example_id, prompt=prompt, responses=responses)
