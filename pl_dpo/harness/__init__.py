"""lm-evaluation-harness on pl_dpo's own model: `requests` answers lm-eval's request types with pl_dpo's kernels
(no lm_eval needed), `lm` is the backend lm-eval loads as `pl_dpo` (the `eval` extra), and
`python -m pl_dpo.harness` is lm-eval's command line with that backend registered."""
