"""`python -m pl_dpo.harness --model pl_dpo --model_args path=<HF folder | a run's policy> --tasks ...`: lm-eval's own
command line, with pl_dpo's backend registered first (lm-eval finds backends by import, not by entry point). A
model path that cannot be read is one line and exit code 2."""

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
