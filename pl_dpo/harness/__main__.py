"""`python -m pl_dpo.harness --model pl_dpo --model_args path=<HF folder> --tasks ...`: lm-eval's own command
line, with pl_dpo's backend registered first (lm-eval finds backends by import, not by entry point)."""

from lm_eval.__main__ import cli_evaluate

import pl_dpo.harness.lm  # noqa: F401  (registers "pl_dpo")

if __name__ == "__main__":
    cli_evaluate()
