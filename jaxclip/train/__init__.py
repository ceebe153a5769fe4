"""Training: state and optimizer, the step, checkpoints, the loop and its metrics."""
