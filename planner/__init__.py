"""The memory planner: what each rank of a job will hold, computed on the meta device without running
it -- model states mirroring DeepSpeed and FSDP2 exactly (`model_states`), activations of one
micro-batch (`activations`), and the figures and table `python -m train.plan` prints (`report`).

Imports `models` and `parallel`, never the job (`train`)."""
