"""The workdir's layout: where every stage's output lives, whether it is committed, and which config fields
each stage's output depends on (no jax here, so that tools can import it).

    config.json                  the first run's config and the fingerprints of the files it read (`agreement`)
    .lock                        held by the running run (`lock.WorkdirLock`)
    tokenizer/                   built once when no tokenizer path is configured
    tfds/                        the TFDS builds of the data sources (a per-host cache for a bucket workdir)
    sft/policies/0               πθ(0)  (sft/train: its mid-phase state)
    sft/eval_0.json              πθ(0)'s held-out metrics and greedy answers, with the eval settings
    sft/samples.npz              πθ(0)'s cached samples (mode triplet)
    assistant_<i>/policies/0     assistant i;  assistant_<i>/samples.npz: its cached samples
    <mode>/round_<t>/ranked.npz  round t's ranked set with reference log-probs (πθ(t))
                                 (a mode with one fixed set, offline: <mode>/ranked.npz)
    <mode>/round_<t>/mixed.npz   with rounds.mix_previous: the previous rounds' sets and this one
    <mode>/round_<t>/train       mid-round train state (deleted once πθ(t+1) is committed)
    <mode>/round_<t>/adapter     with model.lora: round t's adapters as a PEFT folder (their base: πθ(t));
                                 sft/adapter, assistant_<i>/adapter: those of the SFT phases
    <mode>/policies/<t+1>        πθ(t+1);  <mode>/eval_<t+1>.json its metrics
    <mode>/hf_export/round_<t+1> πθ(t+1) as a Hugging Face folder (with export_hf)
    metrics.jsonl, tensorboard/  every step and every evaluation (`metric_log`)
    results.md, results.png      the final table and plot (pl_dpo.main)
    jax_cache/                   the compilation cache, unless one is configured (pl_dpo.main)

Files and metric names count training rounds from 0: `round_<t>` trains πθ(t) into πθ(t+1), which is
`policies/<t+1>`, `eval_<t+1>.json`, `hf_export/round_<t+1>`. The control arm `sft` continues the `sft`
lineage (`sft/policies/<t+1>` next to πθ(0)).

`STAGE_FIELDS`, the config fields each stage depends on, is the one table from which the check of a resumed
run (`agreement.WORKDIR_KEYS`) and the sweep's stage sharing (experiments/sweep.py) derive. Paths are strings
that etils.epath reads and writes: a local path, or a gs:// URL whose files go to a bucket
(`pl_dpo.workdir.bucket` says what differs there).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import yaml  # PyYAML: a dependency of ml-collections
from etils import epath

from pl_dpo.workdir import bucket

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- stages

# The config fields each stage's output depends on. The assistants' stages also depend on their
# own `assistants[i]` section; rounds.num is absent on purpose (more rounds continue a run).
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "tokenizer": ("tokenizer",),
    "tfds": ("data.source", "data.options", "data.files"),
    "sft": ("seed", "tokenizer", "model", "data", "sft", "logprob_chunk"),
    "assistant": ("seed", "tokenizer", "data", "sampling", "logprob_chunk"),
    "rounds": (
        "modes",
        "assistants",
        "loss",
        "sampling",
        "rounds.epochs",
        "rounds.batch_size",
        "rounds.optim",
        "rounds.max_steps",
        "rounds.lr_per_round",
        "rounds.mix_previous",
        "rounds.mix_rescore",
        "rounds.answer_on_top",
        "rounds.prompts_per_round",
    ),
}
# Fields added after workdirs were first written: an older config.json without one ran with this value.
FIELDS_ADDED_LATER = {"rounds.prompts_per_round": 0}
# Fields of a model section that are off by default: off (or absent, in a config.json written before they
# existed), they compare as absent, in `model` and in every `assistants[i].model` (a switched-off LoRA section
# changes nothing, whatever its rank).
OFF_BY_DEFAULT = {
    "lora": lambda section: isinstance(section, dict) and not section.get("enabled"),
    "sample_int8": lambda value: value is False,
}
# Fields the held-out evaluation depends on: eval_<t>.json records them, and a resumed run with other values
# evaluates again instead of mixing results. Not in STAGE_FIELDS for that reason, although sampling.max_new_tokens
# also shapes the rounds' samples (through "sampling" in STAGE_FIELDS["rounds"]).
EVAL_FIELDS = ("eval", "sampling.max_new_tokens")
# Fields that change results in their last bits only (the reduction order, the attention kernel,
# what the backward pass recomputes): a resumed run may change them, two jobs that differ in them do not share work.
NUMERICS_FIELDS = ("mesh", "data.pack_prompt", "model.remat", "model.attention_impl", "sampling.decode_tp")


def identity_fields() -> tuple[str, ...]:
    """Every field the saved work depends on: what a resumed run must not change."""
    out: list[str] = []
    for fields in STAGE_FIELDS.values():
        out += [f for f in fields if f not in out]
    return tuple(out)


# ----------------------------------------------------------------------------- layout


def absolute(workdir: str | os.PathLike) -> str:
    """The workdir as every process names it: an absolute local path (Orbax wants one), or the gs:// URL."""
    workdir = os.fspath(workdir)
    return workdir.rstrip("/") if bucket.is_bucket(workdir) else os.path.abspath(workdir)


def tokenizer_dir(workdir: str) -> str:
    """The tiny tokenizer built once when none is configured; `tokenizer.json` commits it."""
    return os.path.join(workdir, "tokenizer")


def tfds_dir(workdir: str) -> str:
    """The TFDS builds of the data sources: in the workdir, or for a bucket workdir in this host's
    local cache (array_record files are local files; a build's name hashes all its inputs)."""
    return (
        os.path.join(bucket.local_cache_dir(), "tfds") if bucket.is_bucket(workdir) else os.path.join(workdir, "tfds")
    )


def compilation_cache_dir(workdir: str) -> str:
    """`<workdir>/jax_cache` (JAX reads and writes a gs:// cache too: a resumed run on a new VM finds it)."""
    return os.path.join(absolute(workdir), "jax_cache")


def lineage_dir(workdir: str, lineage: str) -> str:
    """`sft`, `assistant_<i>` or a mode: its policies, evaluations and phases."""
    return os.path.join(workdir, lineage)


# The items of a policy checkpoint (checkpoint.PolicyCheckpoints): the weights and a JSON record.
POLICY_ITEMS = ("params", "metadata")


def policies_dir(workdir: str, lineage: str) -> str:
    """Every policy of a lineage, one Orbax step per index (πθ(0) of `sft`, an assistant, πθ(t) of a mode)."""
    return os.path.join(workdir, lineage, "policies")


def policy_dir(workdir: str, lineage: str, index: int) -> str:
    return os.path.join(policies_dir(workdir, lineage), str(index))


def eval_path(workdir: str, lineage: str, index: int) -> str:
    return os.path.join(workdir, lineage, f"eval_{index}.json")


def samples_path(workdir: str, lineage: str) -> str:
    """Cached samples of an assistant or of πθ(0) (lineage `sft`)."""
    return os.path.join(workdir, lineage, "samples.npz")


def round_dir(workdir: str, mode: str, t: int) -> str:
    """Round t of a mode: its ranked set, mixed set and mid-round train state."""
    return os.path.join(workdir, mode, f"round_{t}")


def train_state_dir(phase_dir: str) -> str:
    """A phase's mid-phase train states (TrainCheckpoints); phase_dir is a lineage or a round dir."""
    return os.path.join(phase_dir, "train")


def mixed_set_path(workdir: str, mode: str, t: int) -> str:
    """Round t's ranked set joined by the previous rounds' (rounds.mix_previous)."""
    return os.path.join(round_dir(workdir, mode, t), "mixed.npz")


def ranked_set_path(workdir: str, mode: str, t: int, one_set: bool = False) -> str:
    return (
        os.path.join(workdir, mode, "ranked.npz")
        if one_set
        else os.path.join(round_dir(workdir, mode, t), "ranked.npz")
    )


def adapter_dir(phase_dir: str) -> str:
    """A LoRA phase's adapters as a PEFT folder (`adapter_config.json`, `adapter_model.safetensors`)."""
    return os.path.join(phase_dir, "adapter")


def export_dir(workdir: str, mode: str, index: int) -> str:
    return os.path.join(workdir, mode, "hf_export", f"round_{index}")


def read_config_json(path: str | os.PathLike) -> dict:
    """A workdir's config.json (`agreement.check_workdir_config`) as a dict, its assistants (ConfigDicts inside a
    list, which the JSON writer stores as their YAML text) back as dicts."""
    config = json.loads(epath.Path(path).read_text(encoding="utf-8"))
    config["assistants"] = [yaml.safe_load(a) if isinstance(a, str) else a for a in config.get("assistants") or []]
    return config


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `path` under a temporary name, then renames it: a reader sees the old file or the
    new one, never a half-written one (a killed run leaves nothing a resumed run would trust).
    In a bucket an object write is atomic by itself: one upload of the whole text."""
    path = epath.Path(path)
    if bucket.is_bucket(path):
        path.write_text(text)
        return
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    tmp.replace(path)  # overwrites, as os.replace does


CHECKPOINT_METADATA = "_CHECKPOINT_METADATA"


def step_committed(step_dir: str | os.PathLike, items: Sequence[str]) -> bool:
    """An Orbax step is committed when its metadata carries a commit timestamp and every item
    folder exists (a killed save leaves neither)."""
    step_dir = epath.Path(step_dir)
    try:
        committed = json.loads((step_dir / CHECKPOINT_METADATA).read_text()).get("commit_timestamp_nsecs") is not None
    except (OSError, ValueError):
        return False
    return committed and all((step_dir / item).is_dir() for item in items)


def policy_committed(workdir: str, lineage: str, index: int) -> bool:
    return step_committed(policy_dir(workdir, lineage, index), POLICY_ITEMS)
