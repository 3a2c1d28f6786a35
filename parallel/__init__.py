"""Everything about processes, applied to a built model: the one DeviceMesh and its groups (`dims`),
the differentiable all-to-all and the expert-parallel dispatcher, expert parallelism, ZeRO (DeepSpeed
for the dense weights, FSDP2 for the experts), activation checkpointing, the global gradient norm,
and `parallelize` (the one place, in a written order) returning the `Trainer` that owns the sharded
training state. DeepSpeed's internals are read in `deepspeed_state` only."""
