"""lm-evaluation-harness on pl_dpo's own model: `requests` answers lm-eval's request types with pl_dpo's kernels
(no lm_eval needed), `lm` is the backend lm-eval loads as `pl_dpo` (the `eval` extra), and
`lm_eval_hook` lets lm-eval's own `lm_eval --model pl_dpo` find it, and `python -m pl_dpo.harness` is the same
command line with the backend's errors as one line and exit code 2."""
