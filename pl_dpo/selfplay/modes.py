"""The modes of a run as data: what each one ranks, against which reference, under which objective.

A mode is one entry of `MODES`, so a new mode is one entry here and, if it ranks lists in a new
way, one list-building function `(ListSources, K) -> Ranked`. Its readers: `config_lib` (validation,
K), `selfplay.rounds` and `selfplay.ranked_sets` (what a round ranks, against which reference), the
planner (the programs of each K) and `experiments/` (collect, report). This table is the one
description of the modes; the README and docs/ARCHITECTURE.md refer to it.

| mode | K | ranked list, best first | reference |
|---|---|---|---|
| spin | 2 | dataset answer, πθ(t)'s sample | πθ(t) |
| asft | 3 | dataset answer, assistant 0's sample, πθ(t)'s sample | πθ(t) |
| ladder | 2 + #assistants | dataset answer, every assistant's sample (strongest first), πθ(t)'s sample | πθ(t) |
| triplet | 3 | dataset answer, πθ(0)'s sample, πθ(t)'s sample | πθ(t) |
| ranked_samples | config.loss.K | K samples of πθ(t) ranked by the task's verifier (rounds.answer_on_top: the answer first, then K-1) | πθ(t) |
| offline | config.loss.K | the dataset's own ranked responses | πθ(0), fixed |
| sft | 1 | (none: more SFT epochs on the dataset answers, the control arm) | (none) |

No jax here: `experiments/` imports this module to read workdirs.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)

TokenIds = list[int]
RankedLists = list[list[TokenIds]]  # per training prompt: responses best first


class Ranked(NamedTuple):
    """What a list builder returns: the lists, and graded labels [N, K] where it has them
    (ratings, verifier scores; higher is better), which the pairwise losses weigh pairs by."""

    lists: RankedLists
    labels: np.ndarray | None = None


class Reference(enum.Enum):
    """Where a round's reference log-probs come from."""

    ROUND_POLICY = "round_policy"  # πθ(t): the policy the round starts from (self-play)
    SFT = "sft"  # the fixed πθ(0): the lists do not change, neither does their reference
    NONE = "none"  # the objective uses no reference


class Objective(enum.Enum):
    PL_DPO = "pl_dpo"  # Plackett-Luce DPO over the ranked lists (config.loss)
    SFT = "sft"  # token-mean NLL of the dataset answers


@dataclasses.dataclass(frozen=True)
class ListSources:
    """What lists are built from: token ids per training prompt (assistants and πθ(t) on demand)."""

    answers: Sequence[TokenIds]  # the dataset answer of each prompt
    dataset_responses: Sequence[Sequence[TokenIds]]  # the dataset's ranked responses, best first
    assistant_samples: Callable[[int], Sequence[TokenIds]]  # assistant i's samples (generated once, cached)
    sft_samples: Callable[[], Sequence[TokenIds]]  # πθ(0)'s samples (generated once, cached)
    # πθ(t)'s i-th sample of every prompt (independent draws; 0 is the one the self-play lists rank).
    policy_samples: Callable[[int], Sequence[TokenIds]]
    dataset_scores: Sequence[Sequence[float]] = ()  # the dataset's ratings of its responses, if any
    # Verifier: (prompt index, response ids) -> graded score, higher is better; None without one.
    grade: Callable[[int, TokenIds], float] | None = None
    answer_on_top: bool = False  # ranked_samples: the dataset answer first, then K-1 samples
    seed: int = 0  # for orders that must be drawn (ties)

    def own_samples(self) -> Sequence[TokenIds]:
        return self.policy_samples(0)


def self_play_lists(sources: ListSources, K: int) -> Ranked:
    """[dataset answer, samples of assistants 0..K-3 (strongest first), πθ(t)'s sample]."""
    assistants = [sources.assistant_samples(i) for i in range(K - 2)]
    own = sources.own_samples()
    return Ranked([[answer, *(a[n] for a in assistants), own[n]] for n, answer in enumerate(sources.answers)])


def triplet_lists(sources: ListSources, K: int) -> Ranked:
    """[dataset answer, πθ(0)'s sample, πθ(t)'s sample]: aSFT's shape with the SFT policy as the
    middle rank instead of an assistant (cf. T-SPIN, which keeps πθ(0)'s samples in play so that
    the advantage over πθ(t) does not vanish as the rounds go on)."""
    if K != 3:
        raise ValueError(f"triplet lists have K=3, got K={K}")
    sft, own = sources.sft_samples(), sources.own_samples()
    return Ranked([[answer, sft[n], own[n]] for n, answer in enumerate(sources.answers)])


class ListSizeError(ValueError):
    """config.loss.K asks for longer lists than the data has."""


_said: set[tuple[int, int, int]] = set()  # (full lists, lists, K) already logged


def dataset_lists(sources: ListSources, K: int) -> Ranked:
    """The dataset's first K ranked responses (shorter lists stay shorter: masked), with the
    dataset's ratings as labels when every example has them (UltraFeedback)."""
    lists = [list(responses[:K]) for responses in sources.dataset_responses]
    full = sum(len(responses) == K for responses in lists)
    if full == 0:
        longest = max((len(r) for r in lists), default=0)
        raise ListSizeError(f"config.loss.K={K}: no list in the data has {K} responses (the longest has {longest})")
    if full < len(lists) and (full, len(lists), K) not in _said:
        _said.add((full, len(lists), K))
        log.warning("%d of %d lists have K=%d responses; the shorter ones are masked", full, len(lists), K)
    scores = sources.dataset_scores
    if len(scores) != len(lists) or not all(scores):
        return Ranked(lists)
    labels = np.zeros((len(lists), K), np.float32)
    for n, s in enumerate(scores):
        labels[n, : min(len(s), K)] = s[:K]
    return Ranked(lists, labels)


def verifier_ranked_lists(sources: ListSources, K: int) -> Ranked:
    """K independent samples of πθ(t) per prompt (K-1 under the dataset answer with
    `answer_on_top`), sorted by the verifier's graded score, best first; the scores are the labels.

    Ties (equal scores, e.g. two wrong answers, or identical samples) are put in a random order
    drawn from the seed, one draw per prompt, and carry equal labels: the Plackett-Luce variants
    see one order of the tied group, the pairwise variants (lipo_lambda, bt_all_pairs) skip the
    tied pairs altogether. The answer on top gets label 1 + the best possible score (1.0)."""
    if sources.grade is None:
        raise ValueError("verifier-ranked lists need a verifier (the synthetic tasks' grader)")
    n_samples = K - 1 if sources.answer_on_top else K
    samples = [sources.policy_samples(i) for i in range(n_samples)]
    rng = np.random.default_rng(sources.seed)
    lists, labels = [], np.zeros((len(sources.answers), K), np.float32)
    for n, answer in enumerate(sources.answers):
        drawn = [s[n] for s in samples]
        scores = np.array([sources.grade(n, r) for r in drawn], np.float32)
        # Sort by score, descending; among equal scores by a random key (the tie order).
        order = np.lexsort((rng.permutation(n_samples), -scores))
        ranked, ranked_scores = [drawn[i] for i in order], scores[order]
        if sources.answer_on_top:
            ranked, ranked_scores = [answer, *ranked], np.concatenate([[2.0], ranked_scores])
        lists.append(ranked)
        labels[n] = ranked_scores
    return Ranked(lists, labels)


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    # K from (number of configured assistants, config.loss.K).
    list_size: Callable[[int, int], int]
    k_rule: str  # how K is derived, for error messages
    min_assistants: int
    reference: Reference
    objective: Objective
    # (sources, K) -> lists; None for a mode that trains on the dataset answers alone.
    build_lists: Callable[[ListSources, int], Ranked] | None
    # One ranked set for every round (fixed lists, fixed reference) instead of one per round.
    one_set: bool = False
    # K is config.loss.K itself (then loss.K need not agree with the other modes' K).
    k_from_config: bool = False

    @property
    def ranks_own_sample(self) -> bool:
        """The lists end with πθ(t)'s own sample (and so change every round)."""
        return self.build_lists in (self_play_lists, triplet_lists)

    def assistants_ranked(self, K: int) -> int:
        """How many of the configured assistants (the first ones) this mode's lists of size K rank."""
        return K - 2 if self.build_lists is self_play_lists else 0

    def policy_samples_per_prompt(self, K: int, answer_on_top: bool = False) -> int:
        """Samples of πθ(t) an arm generates per training prompt in every round (its generation budget)."""
        if self.build_lists is verifier_ranked_lists:
            return K - 1 if answer_on_top else K
        return 1 if self.ranks_own_sample else 0

    def cached_samples_per_prompt(self, K: int) -> int:
        """Samples per training prompt generated once and reused by every round (assistants', πθ(0)'s)."""
        if self.build_lists is triplet_lists:
            return 1
        return self.assistants_ranked(K)

    @property
    def ranks_dataset_responses(self) -> bool:
        """The lists come from the data: it must hold several ranked responses per prompt."""
        return self.build_lists is dataset_lists

    @property
    def needs_verifier(self) -> bool:
        """The lists are ranked by the task's verifier: the data must come with one (synthetic)."""
        return self.build_lists is verifier_ranked_lists


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("spin", lambda n, k: 2, "K=2", 0, Reference.ROUND_POLICY, Objective.PL_DPO, self_play_lists),
        Mode("asft", lambda n, k: 3, "K=3", 1, Reference.ROUND_POLICY, Objective.PL_DPO, self_play_lists),
        Mode(
            "ladder",
            lambda n, k: 2 + n,
            "K = 2 + number of assistants",
            1,
            Reference.ROUND_POLICY,
            Objective.PL_DPO,
            self_play_lists,
        ),
        Mode("triplet", lambda n, k: 3, "K=3", 0, Reference.ROUND_POLICY, Objective.PL_DPO, triplet_lists),
        Mode(
            "ranked_samples",
            lambda n, k: k,
            "K = config.loss.K",
            0,
            Reference.ROUND_POLICY,
            Objective.PL_DPO,
            verifier_ranked_lists,
            k_from_config=True,
        ),
        Mode(
            "offline",
            lambda n, k: k,
            "K = config.loss.K",
            0,
            Reference.SFT,
            Objective.PL_DPO,
            dataset_lists,
            one_set=True,
            k_from_config=True,
        ),
        # The control arm: the same rounds and gradient steps, spent on more SFT epochs.
        Mode("sft", lambda n, k: 1, "K=1", 0, Reference.NONE, Objective.SFT, None),
    )
}


def get(name: str) -> Mode:
    if name not in MODES:
        raise KeyError(f"unknown mode {name!r}; choose from {tuple(MODES)}")
    return MODES[name]
