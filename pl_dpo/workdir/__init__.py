"""The workdir and its I/O: layout and locks (no jax), gs:// buckets, the metric log, the results plot."""
