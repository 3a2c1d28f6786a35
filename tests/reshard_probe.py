"""Resume a run on whatever layout torchrun gives it, save the state it just loaded into a side
folder, then train on: `torchrun ... tests/reshard_probe.py SIDE_DIR RUN_DIR [overrides]`.

The side folder lets a test compare, tensor by tensor, what the new layout holds with what the old
one saved; the training after it is the real loop of `python -m train`.
"""

import sys
from pathlib import Path

from train.checkpoint.manager import CheckpointManager
from train.cli import compose_job
from train.loop import train
from train.setup import setup


def main(side_dir: str, run_dir: str, *overrides: str) -> None:
    job = compose_job([*overrides, "train.resume=true"])
    job.run_dir = run_dir
    run = setup(job)
    CheckpointManager(Path(side_dir), job, run.dims).save(run.trainer, run.start_step)
    train(run)


if __name__ == "__main__":
    main(*sys.argv[1:])
