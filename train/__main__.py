"""`python -m train [overrides]`: the Hydra entry point (also under torchrun and srun)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from parallel.dims import shutdown
from train.config import JobConfig, register_configs
from train.logging import quiet_third_party_logs
from train.loop import TrainingDiverged, setup, train

register_configs()


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    quiet_third_party_logs()
    job: JobConfig = OmegaConf.to_object(cfg)
    try:
        run = setup(job)
    except ValueError as err:  # a user mistake: one clear line, no traceback
        print(f"switchyard: error: {err}", file=sys.stderr)
        sys.exit(2)
    try:
        summary = train(run)
    except TrainingDiverged as err:
        print(f"switchyard: error: {err}", file=sys.stderr)
        sys.exit(3)
    finally:
        shutdown()
    return summary.get("val/loss")


if __name__ == "__main__":
    main()
