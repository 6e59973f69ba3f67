"""Data: TFDS builders (array_record, no TensorFlow), tokenisation, batching.

Public API
----------
Sources -> examples (`Example`: example_id, prompt, responses best first,
scores, task, meta JSON):

  load_split(source, split, *, data_dir=None, files=None, max_rows=None,
             skip_bad_rows=False, **options) -> list[Example]
      source in {"synthetic", "ultrachat", "ultrafeedback", "ranked_jsonl"}.
      synthetic options: seed, n_train, n_test, tasks, min_difficulty,
      max_difficulty (splits "train", "test"; disjoint prompts).
      Others read local files: files={split: path | [paths] | folder}.
      ultrafeedback options: k=4, rating_field="overall_score", ties="stable"
      ("stable" | "drop_tied_tail" | "keep_first"). ranked_jsonl: min_responses=2.
  make_builder(...) / read_split(builder, split) / skipped_rows(builder)
  generate_examples(SyntheticConfig(...)) -> {"train": [...], "test": [...]}
      the same synthetic examples without TFDS (in memory).
  check_answer(task, prompt_meta, text) -> bool   (synthetic checker)
  grade_answer(task, prompt_meta, text) -> float  (its graded score in [0, 1])

Examples -> arrays (layout documented in `pl_dpo.data.tokenize`):

  tokenize_examples(tokenizer, examples, TokenizeConfig(...), k=None)
      -> (RankedSet, TokenizeStats)
  assemble_ranked(prompt_ids, response_ids, *, pad_id, k=None, seq_len=None,
                  prompt_len=None, example_ids=None, ref_logps=None) -> RankedSet
  trim_at_eos(ids, eos_id) -> list[int]

`RankedSet` (frozen, checked when made): tokens_NxKxL, loss_mask_NxKxL,
attn_valid_NxKxL, valid_NxK, and optional prompt_tokens_NxP / prompt_valid_NxP /
example_ids_N / ref_logps_NxK / labels_NxK / policy_sample_correct_N.

Ranked sets -> batches:

  BatchIterator(ranked, *, batch_size, batch_type, seed=0, shuffle=True,
                drop_remainder=True, num_epochs=None, length_buckets=None,
                process_index=0, process_count=1)
      -> iterator of `batch_type`: RankedBatch, or PackedBatch (the K responses of a
         list in one row behind one copy of the prompt); .state() / .restore()
  prompt_batches(ranked.prompts(), *, batch_size, length_buckets=None, process_index=0,
                 process_count=1) -> iterator of PromptBatch (left-padded)

On disk (atomic .npz, no pickle):

  save_ranked_set(path, ranked) / load_ranked_set(path) -> RankedSet
  concat_ranked_sets([ranked, ...]) -> RankedSet   (round mixing)
  save_arrays(path, {name: array}) / load_arrays(path)   (any named arrays: cached samples)

Statistics: `python -m pl_dpo.data.stats --source=... [--files=split=path]`.
"""

from pl_dpo.data.batching import BatchIterator, PromptBatch, RankedBatch, default_buckets, prompt_batches
from pl_dpo.data.builders import SOURCES, load_split, make_builder, read_split, skipped_rows
from pl_dpo.data.files import BadRowPolicy, DataError
from pl_dpo.data.npz import DamagedFile, load_arrays, save_arrays
from pl_dpo.data.packing import PackedBatch
from pl_dpo.data.ranked_set import RankedSet, concat_ranked_sets, load_ranked_set, save_ranked_set
from pl_dpo.data.schemas import Example
from pl_dpo.data.synthetic import TASKS, SyntheticConfig, check_answer, generate_examples, grade_answer
from pl_dpo.data.tokenize import TokenizeConfig, TokenizeStats, assemble_ranked, tokenize_examples, trim_at_eos

__all__ = [
    "SOURCES",
    "TASKS",
    "BadRowPolicy",
    "BatchIterator",
    "DamagedFile",
    "DataError",
    "Example",
    "PackedBatch",
    "PromptBatch",
    "RankedBatch",
    "RankedSet",
    "SyntheticConfig",
    "TokenizeConfig",
    "TokenizeStats",
    "assemble_ranked",
    "concat_ranked_sets",
    "check_answer",
    "default_buckets",
    "generate_examples",
    "grade_answer",
    "load_arrays",
    "load_ranked_set",
    "load_split",
    "make_builder",
    "prompt_batches",
    "read_split",
    "save_arrays",
    "save_ranked_set",
    "skipped_rows",
    "tokenize_examples",
    "trim_at_eos",
]
