"""Training loop, loss, checkpoints and metrics."""
