"""Resume a run on whatever layout torchrun gives it, save the state it just loaded into a side
folder, then train on: `torchrun ... tests/reshard_probe.py SIDE_DIR RUN_DIR [overrides]`.

The side folder lets a test compare, tensor by tensor, what the new layout holds with what the old
one saved; the training after it is the real loop of `python -m train`.
"""

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.jobs import REPO
from train.checkpoint import CheckpointManager
from train.config import register_configs
from train.loop import train
from train.setup import setup


def main(side_dir: str, run_dir: str, *overrides: str) -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=[*overrides, f"run_dir={run_dir}", "train.resume=true"])
    job = OmegaConf.to_object(cfg)
    run = setup(job)
    CheckpointManager(Path(side_dir), job, run.dims).save(run.trainer, run.start_step)
    train(run)


if __name__ == "__main__":
    main(*sys.argv[1:])
