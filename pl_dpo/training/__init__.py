"""One resumable training phase: objectives and the jitted step, the loop, checkpoints, preemption."""
