"""The training state on disk: the checkpoint manager over torch.distributed.checkpoint (`manager`),
reading DCP folders without unpickling code (`safe_dcp`), a finished run's weights for the tools
(`run_weights`), and files published atomically (`files`)."""
