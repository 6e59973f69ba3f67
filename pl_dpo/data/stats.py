"""Print a dataset's statistics: rows, skipped rows, K distribution, token lengths, truncation.

  python -m pl_dpo.data.stats --source=synthetic --n_train=2000 --n_test=200
  python -m pl_dpo.data.stats --source=ultrafeedback --files=train=/data/uf.jsonl \
      --tokenizer=/models/llama --max_prompt_len=512 --max_response_len=512 --skip_bad_rows

Without --tokenizer the tiny local tokenizer (`pl_dpo.tokenizer`) is built in a
temporary folder, which is right for the synthetic tasks only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

from pl_dpo.data import builders
from pl_dpo.data.tokenize import TokenizeConfig, encode_examples


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m pl_dpo.data.stats", description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, choices=builders.SOURCES)
    p.add_argument("--split", default="train")
    p.add_argument("--files", action="append", default=[], help="split=path (repeatable)")
    p.add_argument("--data_dir", default=None, help="TFDS data dir (default $TFDS_DATA_DIR)")
    p.add_argument("--tokenizer", default=None, help="local tokenizer folder (default: the tiny one)")
    p.add_argument("--max_prompt_len", type=int, default=64)
    p.add_argument("--max_response_len", type=int, default=64)
    p.add_argument("--max_rows", type=int, default=None)
    p.add_argument("--skip_bad_rows", action="store_true")
    p.add_argument("--k", type=int, default=None, help="ultrafeedback: list length (default 4)")
    p.add_argument("--ties", default=None, help="ultrafeedback tie rule")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n_train", type=int, default=None)
    p.add_argument("--n_test", type=int, default=None)
    p.add_argument("--max_difficulty", type=int, default=None)
    return p.parse_args(argv)


def compute_stats(args) -> dict:
    files = {}
    for item in args.files:
        split, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"--files expects split=path, got {item!r}")
        files.setdefault(split, []).append(path)
    options = {
        k: v
        for k, v in {
            "k": args.k,
            "ties": args.ties,
            "seed": args.seed,
            "n_train": args.n_train,
            "n_test": args.n_test,
            "max_difficulty": args.max_difficulty,
        }.items()
        if v is not None
    }
    if args.source == "synthetic":
        builder = builders.make_builder("synthetic", data_dir=args.data_dir, **options)
    else:
        builder = builders.make_builder(
            args.source,
            data_dir=args.data_dir,
            files=files,
            max_rows=args.max_rows,
            skip_bad_rows=args.skip_bad_rows,
            **options,
        )
    examples = builders.read_split(builder, args.split)
    if args.tokenizer:
        from pl_dpo.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
    else:
        from pl_dpo.tokenizer import build_tiny_tokenizer

        tok = build_tiny_tokenizer(tempfile.mkdtemp(prefix="pl_dpo_tok_"))
    cfg = TokenizeConfig(max_prompt_len=args.max_prompt_len, max_response_len=args.max_response_len)
    _, _, tstats = encode_examples(tok, examples, cfg)
    meta = builders.skipped_rows(builder)
    return {
        "source": args.source,
        "split": args.split,
        "splits": {s: info.num_examples for s, info in builder.info.splits.items()},
        "skipped_rows": meta.get(f"skipped_{args.split}", {}),
        **tstats.summary(),
    }


def main(argv=None) -> int:
    stats = compute_stats(_parse(sys.argv[1:] if argv is None else argv))
    print(json.dumps(stats, indent=2, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
