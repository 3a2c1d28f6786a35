"""The training job: Hydra entry point, data, loop, checkpoints, metrics and logging."""
