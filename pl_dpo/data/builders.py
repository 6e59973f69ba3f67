"""TFDS builders (array_record, no TensorFlow) for the four sources, and `load_split`.

Every builder writes the same features (the fields of `Example`) in the
`array_record` format and is read back with `builder.as_data_source()`, which
needs no TensorFlow. Nothing is downloaded: the synthetic data is generated from
a seed, the others read local JSONL / parquet files named in the builder config.

The builder config's name is a hash of every parameter (and of the input files'
path, size and mtime), so changing a knob or a file never reuses a stale build.
Bad rows raise `DataError` (file, row, field) unless `skip_bad_rows`, in which
case they are skipped, counted per reason, logged, and the counts are stored in
the dataset's `metadata.json` (see `skipped_rows`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from pl_dpo.data import schemas, synthetic
from pl_dpo.data.files import BadRowPolicy, expand_paths, files_fingerprint, iter_rows
from pl_dpo.data.schemas import Example

tfds.disable_progress_bar()
log = logging.getLogger(__name__)

_VERSION = tfds.core.Version("1.0.0")
SOURCES = ("synthetic", "ultrachat", "ultrafeedback", "ranked_jsonl")


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "example_id": tfds.features.Text(),
            "prompt": tfds.features.Text(),
            "responses": tfds.features.Sequence(tfds.features.Text()),
            "scores": tfds.features.Sequence(np.float32),
            "task": tfds.features.Text(),
            "meta": tfds.features.Text(),
        }
    )


@dataclasses.dataclass
class LocalConfig(tfds.core.BuilderConfig):
    """Parameters of one build. `splits` maps split name -> local file(s) or folder."""

    splits: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_rows: int | None = None  # Size knob: first N good rows per split (SPIN uses 50k).
    skip_bad_rows: bool = False


def _make_config(source: str, splits, options, max_rows, skip_bad_rows) -> LocalConfig:
    files = {s: tuple(expand_paths(p)) for s, p in sorted(splits.items())}
    key = json.dumps(
        {
            "source": source,
            "splits": {s: [os.path.abspath(f) for f in fs] for s, fs in files.items()},
            "fp": {s: files_fingerprint(fs) for s, fs in files.items()},
            "options": options,
            "max_rows": max_rows,
            "skip": skip_bad_rows,
        },
        sort_keys=True,
        default=str,
    )
    name = f"{source}_{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    return LocalConfig(
        name=name, version=_VERSION, splits=files, options=dict(options), max_rows=max_rows, skip_bad_rows=skip_bad_rows
    )


def _to_record(e: Example) -> dict[str, Any]:
    return {
        "example_id": e.example_id,
        "prompt": e.prompt,
        "responses": list(e.responses),
        "scores": np.asarray(e.scores, np.float32),
        "task": e.task,
        "meta": e.meta,
    }


class _Base(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Common features and version; no checksums file and no package metadata."""

    VERSION = _VERSION
    # TFDS looks for a checksums file next to the builder's code through
    # `importlib_resources`, which is not installed (and not needed) on Python >= 3.9;
    # nothing is downloaded here, so there are no checksums to find.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=_features(), metadata=tfds.core.MetadataDict())

    # TFDS speaks of downloads that never happen here. Every config is a `LocalConfig` made for
    # the call (never one of BUILDER_CONFIGS), and TFDS warns "Using custom data configuration:"
    # with the whole config each time a builder is made for it; it prints (to stdout, whatever the
    # log level) "Downloading and preparing dataset Unknown size ..." and "Dataset ... downloaded
    # and prepared to ..." around each build. A debug log line says the same.
    def _create_builder_config(self, builder_config, version):
        if isinstance(builder_config, LocalConfig):
            return builder_config
        return super()._create_builder_config(builder_config, version)

    def _log_download_bytes(self) -> None:
        log.debug("building %s into %s", self.info.full_name, self.data_dir)

    def _log_download_done(self) -> None:
        log.debug("built %s into %s", self.info.full_name, self.data_dir)


class _LocalBuilder(_Base, skip_registration=True):
    """Shared machinery: one split per configured file group, converter per row."""

    def _convert(self, file: str, row: int, obj: Any) -> Example:
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded.
        return {split: self._generate_examples(split) for split in self.builder_config.splits}

    def _generate_examples(self, split: str):
        cfg = self.builder_config
        policy = BadRowPolicy(skip_bad_rows=cfg.skip_bad_rows)
        seen: set[str] = set()
        n = 0
        for file, row, obj in iter_rows(cfg.splits[split]):
            if cfg.max_rows is not None and n >= cfg.max_rows:
                break
            try:
                ex = self._convert(file, row, obj)
            except schemas.DataError as err:
                policy.handle(err)
                continue
            if ex.example_id in seen:  # TFDS keys must be unique; make ids unique too.
                ex = dataclasses.replace(ex, example_id=f"{ex.example_id}@{file}:{row}")
            seen.add(ex.example_id)
            n += 1
            yield ex.example_id, _to_record(ex)
        if n == 0:
            raise schemas.DataError(",".join(cfg.splits[split]), None, None, f"split {split!r} has no usable rows")
        if policy.n_skipped > len(policy.examples):  # more than the rows already logged one by one
            log.warning("%s split %r (%s): %s", self.name, split, ", ".join(cfg.splits[split]), policy.summary())
        self.info.metadata[f"skipped_{split}"] = dict(policy.skipped)
        self.info.metadata[f"rows_{split}"] = n


class PlDpoUltrachat(_LocalBuilder):
    """HuggingFaceH4/ultrachat_200k rows -> (first user turn, first assistant turn)."""

    def _convert(self, file, row, obj):
        return schemas.ultrachat_to_example(file, row, obj)


class PlDpoUltrafeedback(_LocalBuilder):
    """openbmb/UltraFeedback rows -> up to K completions ranked by rating."""

    def _convert(self, file, row, obj):
        return schemas.ultrafeedback_to_example(file, row, obj, **self.builder_config.options)


class PlDpoRankedJsonl(_LocalBuilder):
    """{"prompt", "responses": [best, ..., worst]} rows."""

    def _convert(self, file, row, obj):
        return schemas.ranked_jsonl_to_example(file, row, obj, **self.builder_config.options)


class PlDpoSynthetic(_Base):
    """The built-in verifiable tasks, generated from a seed (see `synthetic`)."""

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = synthetic.SyntheticConfig(**self.builder_config.options)
        splits = synthetic.generate_examples(cfg)
        return {name: self._generate_examples(exs) for name, exs in splits.items() if exs}

    def _generate_examples(self, examples):
        for e in examples:
            yield e.example_id, _to_record(e)


_BUILDERS = {
    "synthetic": PlDpoSynthetic,
    "ultrachat": PlDpoUltrachat,
    "ultrafeedback": PlDpoUltrafeedback,
    "ranked_jsonl": PlDpoRankedJsonl,
}


_CONVERTERS = {
    "ultrachat": schemas.ultrachat_to_example,
    "ultrafeedback": schemas.ultrafeedback_to_example,
    "ranked_jsonl": schemas.ranked_jsonl_to_example,
}


def source_options(source: str) -> tuple[str, ...]:
    """The options `source` takes (`make_builder(**options)`, config.data.options)."""
    if source == "synthetic":
        return tuple(f.name for f in dataclasses.fields(synthetic.SyntheticConfig))
    params = inspect.signature(_CONVERTERS[source]).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY)


def check_options(source: str, options: dict[str, Any]) -> None:
    """Raises ValueError naming an unknown source, an option `source` does not take, or a bad synthetic value."""
    if source not in _BUILDERS:
        raise ValueError(f"unknown data source {source!r}; known: {SOURCES}")
    unknown = sorted(set(options) - set(source_options(source)))
    if unknown:
        takes = ", ".join(source_options(source)) or "none"
        raise ValueError(f"data source {source!r} takes no option {unknown[0]!r} (its options: {takes})")
    if source == "synthetic":
        synthetic.SyntheticConfig(**options).validate()
    if source == "ultrafeedback" and options.get("ties", "stable") not in schemas.TIE_RULES:
        raise ValueError(f"ultrafeedback: ties={options['ties']!r} not in {schemas.TIE_RULES}")


def make_builder(
    source: str,
    *,
    data_dir: str | None = None,
    files: dict[str, str | list[str]] | None = None,
    max_rows: int | None = None,
    skip_bad_rows: bool = False,
    **options: Any,
) -> tfds.core.DatasetBuilder:
    """A builder for `source` (see SOURCES), prepared (built) if not yet on disk.

    synthetic: options are `SyntheticConfig` fields (seed, n_train, n_test, tasks,
      min_difficulty, max_difficulty); splits "train" and "test".
    others: `files` maps split name -> local file, list of files or folder
      (.jsonl / .json / .parquet). ultrafeedback options: k=4,
      rating_field="overall_score", ties="stable". ranked_jsonl: min_responses=2.
    data_dir: TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).
    """
    check_options(source, options)
    if source == "synthetic":
        if files:
            raise ValueError("synthetic data is generated; it takes no files")
        cfg_obj = synthetic.SyntheticConfig(**options)
        opts = dataclasses.asdict(cfg_obj)
        opts["tasks"] = list(opts["tasks"])
        key = json.dumps(opts, sort_keys=True)
        config = LocalConfig(
            name=f"synthetic_{hashlib.sha256(key.encode()).hexdigest()[:12]}", version=_VERSION, options=opts
        )
    else:
        if not files:
            raise ValueError(f"{source}: pass files={{split: path}} (local JSONL/parquet files)")
        config = _make_config(source, files, options, max_rows, skip_bad_rows)
    cls = _BUILDERS[source]
    builder = cls(config=config, data_dir=data_dir, file_format="array_record")
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except OSError:
        # Several processes building the same dataset into a shared data_dir: TFDS
        # writes into a private temporary folder and renames it; the loser's rename
        # fails because the winner's complete folder is already there. Use that one.
        builder = cls(config=config, data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
            raise
    return builder


def _decode(rec: dict[str, Any]) -> Example:
    def s(x):
        return x.decode("utf-8") if isinstance(x, bytes) else str(x)

    return Example(
        example_id=s(rec["example_id"]),
        prompt=s(rec["prompt"]),
        responses=tuple(s(r) for r in rec["responses"]),
        scores=tuple(float(v) for v in np.asarray(rec["scores"]).reshape(-1)),
        task=s(rec["task"]),
        meta=s(rec["meta"]),
    )


def read_split(builder: tfds.core.DatasetBuilder, split: str) -> list[Example]:
    """All examples of a split, in a fixed order (sorted by example_id).

    TFDS shuffles records by key hash when writing; sorting by id gives an order
    that depends on the content only, which the batch iterator then shuffles by seed.
    """
    if split not in builder.info.splits:
        raise ValueError(f"{builder.name}: no split {split!r}; have {sorted(builder.info.splits)}")
    source = builder.as_data_source(split=split)
    out = [_decode(source[i]) for i in range(len(source))]
    out.sort(key=lambda e: e.example_id)
    return out


def skipped_rows(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
    """The per-split skip counts and row counts recorded at build time."""
    return dict(builder.info.metadata or {})


@functools.wraps(make_builder)
def load_split(source: str, split: str, **kwargs: Any) -> list[Example]:
    """`read_split(make_builder(source, **kwargs), split)`."""
    return read_split(make_builder(source, **kwargs), split)
