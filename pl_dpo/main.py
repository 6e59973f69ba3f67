"""Entry point: `python -m pl_dpo.main --config=configs/<name>.py[:arg] --workdir=DIR [--config.x=y]`.

Runs the whole self-play job of the config (SFT -> assistants -> rounds) in the
workdir, resuming whatever an earlier run on the same workdir left unfinished, and
prints one line per evaluated policy at the end.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

flags.DEFINE_string("workdir", None, "Run folder: checkpoints, ranked sets, metrics.jsonl, TensorBoard.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host TPU / GPU).")
config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/<name>.py[:arg]).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS

TABLE_COLUMNS = ["policy", "exact_match", "answer_logp", "answer_logp_per_token", "reward_accuracy", "win_rate_vs_sft"]


def main(argv: list[str]) -> None:
    del argv
    import jax

    if FLAGS.distributed:
        jax.distributed.initialize()
    from pl_dpo import evaluate, rounds  # after distributed init: they touch devices
    from pl_dpo.phase import Preempted

    logging.getLogger("absl").setLevel(logging.WARNING)
    config = FLAGS.config
    os.makedirs(FLAGS.workdir, exist_ok=True)
    try:
        table = rounds.SelfPlay(config, FLAGS.workdir).run()
    except Preempted as e:
        print(e.message, file=sys.stderr)
        raise
    if jax.process_index() == 0:
        columns = [c for c in TABLE_COLUMNS if any(c in row for row in table)]
        text = evaluate.format_table(table, columns)
        with open(os.path.join(FLAGS.workdir, "results.md"), "w", encoding="utf-8") as f:
            f.write(text + "\n")
        print("\nHeld-out evaluation (" + FLAGS.workdir + "/results.md):\n" + text)


if __name__ == "__main__":
    app.run(main)
