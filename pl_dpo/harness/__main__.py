"""`python -m pl_dpo.harness --model pl_dpo --model_args path=<HF folder | a run's policy> --tasks ...`: lm-eval's own
command line (as `lm_eval`, which finds the backend through `lm_eval_hook`), except that a model path that cannot be
read is one line and exit code 2 instead of lm-eval's traceback."""

import sys

from lm_eval.__main__ import cli_evaluate

import pl_dpo.harness.lm  # noqa: F401  (registers "pl_dpo")
from pl_dpo.models.hf_io import ModelFolderError
from pl_dpo.selfplay.policies import SavedPolicyError

if __name__ == "__main__":
    try:
        cli_evaluate()
    except (ModelFolderError, SavedPolicyError, pl_dpo.harness.lm.NoChatTemplate) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
