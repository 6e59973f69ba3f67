"""The planner: every program of a run compiled ahead of time for a Cloud TPU slice (`python -m pl_dpo.plan`)."""
