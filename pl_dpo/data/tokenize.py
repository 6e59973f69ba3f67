"""Examples -> token arrays in the training layout, with an exact prompt/response boundary.

Layout of the arrays (N examples, K responses, L tokens, P prompt tokens):

  tokens_NxKxL      int32  prompt ids then response ids (+EOS), right-padded with pad_id
  loss_mask_NxKxL   bool   True where token i is a response token (EOS included).
                           Convention: the log-prob of token i is read from the
                           logits at position i-1, so loss_mask[..., 0] is always
                           False and the summed log-prob of a response is
                           sum_i mask[i] * log p(tokens[i] | tokens[:i]).
  attn_valid_NxKxL  bool   True on non-padding tokens (prompt + response).
  valid_NxK         bool   response k exists. A missing one (list shorter than K)
                           holds the prompt alone (attn_valid on the prompt, no
                           loss_mask), so no row is fully masked.
  prompt_tokens_NxP int32  the prompt alone, LEFT-padded (for generation).
  prompt_valid_NxP  bool   True on the prompt's real tokens.
  example_ids_N     int64  index of the example in the input list.
  ref_logps_NxK     float32 (optional) reference log-probs, filled by the caller.

Boundary: the prompt is tokenised alone, then prompt+response as one text; if
the prompt ids are a prefix of the whole, the response ids are the rest (so the
training tokens equal what the tokenizer gives the full text). If a BPE merge
crosses the boundary, the response is tokenised separately and concatenated,
and `TokenizeStats.boundary_merges` counts it.

Truncation (as in SPIN / TRL): a prompt keeps its END (and its BOS), a response
keeps its START; policy "error" refuses instead. Every truncation is counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from pl_dpo.data.ranked_set import RankedSet
from pl_dpo.data.schemas import Example

TEMPLATES = ("auto", "chat", "plain", "raw")


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    max_prompt_len: int = 64
    max_response_len: int = 64
    # auto: the tokenizer's chat template if it has one, else plain.
    # plain: "{bos}User: {prompt}\nAssistant:\n". raw: the prompt text as is.
    prompt_template: str = "auto"
    prompt_truncation: str = "keep_end"  # or "error"
    response_truncation: str = "keep_start"  # or "error"
    system_prompt: str | None = None

    def validate(self) -> None:
        if self.max_prompt_len < 2 or self.max_response_len < 1:
            raise ValueError(
                f"TokenizeConfig: max_prompt_len={self.max_prompt_len} (>= 2) / max_response_len={self.max_response_len} (>= 1)"
            )
        if self.prompt_template not in TEMPLATES:
            raise ValueError(f"TokenizeConfig.prompt_template={self.prompt_template!r} not in {TEMPLATES}")
        if self.prompt_truncation not in ("keep_end", "error"):
            raise ValueError(
                f"TokenizeConfig.prompt_truncation={self.prompt_truncation!r} not in ('keep_end', 'error')"
            )
        if self.response_truncation not in ("keep_start", "error"):
            raise ValueError(
                f"TokenizeConfig.response_truncation={self.response_truncation!r} not in ('keep_start', 'error')"
            )


@dataclasses.dataclass
class TokenizeStats:
    rows: int = 0
    responses: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    boundary_merges: int = 0
    prompt_lens: list[int] = dataclasses.field(default_factory=list)  # Before truncation.
    response_lens: list[int] = dataclasses.field(default_factory=list)  # Before truncation, EOS included.
    k_counts: dict[int, int] = dataclasses.field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        def pct(xs):
            return {f"p{q}": int(np.percentile(xs, q)) for q in (50, 90, 99, 100)} if xs else {}

        return {
            "rows": self.rows,
            "responses": self.responses,
            "prompts_truncated": self.prompts_truncated,
            "responses_truncated": self.responses_truncated,
            "boundary_merges": self.boundary_merges,
            "prompt_len": pct(self.prompt_lens),
            "response_len": pct(self.response_lens),
            "k_distribution": dict(sorted(self.k_counts.items())),
        }


def prompt_text(tokenizer, prompt: str, cfg: TokenizeConfig) -> str:
    """The prompt rendered by the configured template (ends where the response starts)."""
    template = cfg.prompt_template
    if template == "auto":
        template = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if template == "raw":
        return prompt
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt_template='chat' but the tokenizer has no chat template")
        msgs = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        msgs.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token or ""
    system = f"{cfg.system_prompt}\n" if cfg.system_prompt else ""
    return f"{bos}{system}User: {prompt}\nAssistant:\n"


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    # Special tokens are already in the text (template); add none.
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _truncate_prompt(ids: list[int], cfg: TokenizeConfig, bos_id, where: str, stats: TokenizeStats) -> list[int]:
    if len(ids) <= cfg.max_prompt_len:
        return ids
    if cfg.prompt_truncation == "error":
        raise ValueError(f"{where}: prompt has {len(ids)} tokens > max_prompt_len={cfg.max_prompt_len}")
    stats.prompts_truncated += 1
    if bos_id is not None and ids[0] == bos_id:  # Keep BOS: models expect it first.
        return [bos_id] + ids[len(ids) - cfg.max_prompt_len + 1 :]
    return ids[len(ids) - cfg.max_prompt_len :]


def _truncate_response(ids: list[int], cfg: TokenizeConfig, where: str, stats: TokenizeStats) -> list[int]:
    if len(ids) <= cfg.max_response_len:
        return ids
    if cfg.response_truncation == "error":
        raise ValueError(f"{where}: response has {len(ids)} tokens > max_response_len={cfg.max_response_len}")
    stats.responses_truncated += 1
    return ids[: cfg.max_response_len]


def encode_examples(
    tokenizer, examples: Sequence[Example], cfg: TokenizeConfig, stats: TokenizeStats | None = None
) -> tuple[list[list[int]], list[list[list[int]]], TokenizeStats]:
    """(prompt ids per example, response ids (+EOS) per example and rank, stats), truncated."""
    cfg.validate()
    stats = stats if stats is not None else TokenizeStats()
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos token; responses must end with one")
    ptexts = [prompt_text(tokenizer, e.prompt, cfg) for e in examples]
    pids_all = _ids(tokenizer, ptexts)
    flat_whole = [pt + r for pt, e in zip(ptexts, examples) for r in e.responses]
    whole_all = iter(_ids(tokenizer, flat_whole))
    prompts, responses = [], []
    for n, (e, pids) in enumerate(zip(examples, pids_all)):
        where = f"example {n} (id {e.example_id!r})"
        if not e.responses:
            raise ValueError(f"{where}: no responses")
        stats.rows += 1
        stats.k_counts[len(e.responses)] = stats.k_counts.get(len(e.responses), 0) + 1
        stats.prompt_lens.append(len(pids))
        resp_ids = []
        for k, r in enumerate(e.responses):
            whole = next(whole_all)
            if whole[: len(pids)] == pids:
                rids = whole[len(pids) :]
            else:  # A merge crossed the boundary: keep the prompt's own tokens.
                stats.boundary_merges += 1
                rids = _ids(tokenizer, [r])[0]
            if not rids:
                raise ValueError(f"{where}: response {k} is empty after tokenisation")
            rids = rids + [eos_id]
            stats.responses += 1
            stats.response_lens.append(len(rids))
            resp_ids.append(_truncate_response(rids, cfg, f"{where} response {k}", stats))
        prompts.append(_truncate_prompt(pids, cfg, tokenizer.bos_token_id, where, stats))
        responses.append(resp_ids)
    return prompts, responses, stats


def assemble_ranked(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[Sequence[int]]],
    *,
    pad_id: int,
    k: int | None = None,
    seq_len: int | None = None,
    prompt_len: int | None = None,
    example_ids: Sequence[int] | None = None,
    ref_logps: np.ndarray | None = None,
) -> RankedSet:
    """Token id lists -> a RankedSet in the array layout of this module's docstring.

    `response_ids[n][k]` are the ids of response k (best first) of example n,
    EOS included when the response ended. Lists shorter than K get valid=False.
    seq_len / prompt_len fix L / P (error if too small); default: the longest.
    """
    n = len(prompt_ids)
    if len(response_ids) != n:
        raise ValueError(f"assemble_ranked: {n} prompts but {len(response_ids)} response lists")
    if n == 0:
        raise ValueError("assemble_ranked: no examples")
    k_max = max(len(r) for r in response_ids)
    k = k_max if k is None else k
    if k_max > k:
        raise ValueError(f"assemble_ranked: an example has {k_max} responses > K={k}")
    need_l = max(len(p) + len(r) for p, rs in zip(prompt_ids, response_ids) for r in rs)
    need_p = max(len(p) for p in prompt_ids)
    seq_len = need_l if seq_len is None else seq_len
    prompt_len = need_p if prompt_len is None else prompt_len
    if need_l > seq_len or need_p > prompt_len:
        raise ValueError(f"assemble_ranked: need L>={need_l}, P>={need_p}; got L={seq_len}, P={prompt_len}")
    tokens = np.full((n, k, seq_len), pad_id, np.int32)
    loss_mask = np.zeros((n, k, seq_len), bool)
    attn_valid = np.zeros((n, k, seq_len), bool)
    valid = np.zeros((n, k), bool)
    ptoks = np.full((n, prompt_len), pad_id, np.int32)
    pvalid = np.zeros((n, prompt_len), bool)
    for i, (p, rs) in enumerate(zip(prompt_ids, response_ids)):
        lp = len(p)
        if lp == 0:  # The first response token needs a position to be predicted from.
            raise ValueError(f"assemble_ranked: example {i} has an empty prompt")
        ptoks[i, prompt_len - lp :] = p
        pvalid[i, prompt_len - lp :] = True
        # Missing responses (j >= len(rs)) hold the prompt alone: valid False, no
        # loss, but every row attends to real tokens (a fully masked row would give
        # NaN in attention, and NaN * 0 is still NaN).
        tokens[i, :, :lp] = p
        attn_valid[i, :, :lp] = True
        for j, r in enumerate(rs):
            if len(r) == 0:
                raise ValueError(f"assemble_ranked: example {i} response {j} is empty")
            tokens[i, j, :lp] = p
            tokens[i, j, lp : lp + len(r)] = r
            loss_mask[i, j, lp : lp + len(r)] = True
            attn_valid[i, j, : lp + len(r)] = True
            valid[i, j] = True
    ref = None
    if ref_logps is not None:
        ref = np.asarray(ref_logps, np.float32)
        if ref.shape != (n, k):
            raise ValueError(f"assemble_ranked: ref_logps shape {ref.shape} != {(n, k)}")
    return RankedSet(
        tokens_NxKxL=tokens,
        loss_mask_NxKxL=loss_mask,
        attn_valid_NxKxL=attn_valid,
        valid_NxK=valid,
        prompt_tokens_NxP=ptoks,
        prompt_valid_NxP=pvalid,
        example_ids_N=np.arange(n, dtype=np.int64) if example_ids is None else np.asarray(example_ids, np.int64),
        ref_logps_NxK=ref,
    )


def tokenize_examples(
    tokenizer, examples: Sequence[Example], cfg: TokenizeConfig, *, k: int | None = None
) -> tuple[RankedSet, TokenizeStats]:
    """Examples -> (ranked set, stats) with L = max_prompt_len + max_response_len, P = max_prompt_len.

    k: keep the best k responses of each list (k=1: SFT on the best answer) and
    make K exactly k; None: K is the longest list.
    Fixed L / P (rather than the longest row) so that every split and round of a
    run has the same shapes; the batch iterator cuts L down to a bucket per batch.
    """
    prompts, responses, stats = encode_examples(tokenizer, examples, cfg)
    if k is not None:
        responses = [r[:k] for r in responses]
    arrays = assemble_ranked(
        prompts,
        responses,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        k=k,
        seq_len=cfg.max_prompt_len + cfg.max_response_len,
        prompt_len=cfg.max_prompt_len,
    )
    return arrays, stats


def trim_at_eos(ids: Sequence[int], eos_id: int) -> list[int]:
    """Generated ids up to and including the first EOS (all of them if none)."""
    out = []
    for t in ids:
        out.append(int(t))
        if t == eos_id:
            break
    return out
