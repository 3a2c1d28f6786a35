"""`python -m train [overrides]`: the Hydra entry point (also under torchrun and srun)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from parallel.dims import shutdown
from train.config import JobConfig, register_configs
from train.logging import quiet_third_party_logs
from train.loop import TrainingDiverged, train
from train.setup import setup
from train.sweep import in_sweep

register_configs()


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    quiet_third_party_logs()
    job: JobConfig = OmegaConf.to_object(cfg)
    if in_sweep() and job.logging.wandb.group is None:
        job.logging.wandb.group = Path(HydraConfig.get().sweep.dir).name  # one W&B group per sweep
    try:
        run = setup(job)
        summary = train(run)
    except (ValueError, TrainingDiverged) as err:  # a user mistake or a diverged run: one clear line
        print(f"switchyard: error: {err}", file=sys.stderr)
        if in_sweep():
            raise  # Hydra records this job as failed and runs the others
        sys.exit(2 if isinstance(err, ValueError) else 3)
    finally:
        if not in_sweep():  # sweep jobs share this process, and DeepSpeed keeps its group handles
            shutdown()
    return sweep_figures(summary)


def sweep_figures(summary: dict) -> dict:
    imbalance = [v for k, v in summary.items() if k.endswith("/imbalance_max_over_mean")]
    return {
        "val/loss": summary.get("val/loss"),
        "perf/tokens_per_s": summary.get("perf/tokens_per_s"),
        "imbalance": sum(imbalance) / len(imbalance) if imbalance else None,
    }


if __name__ == "__main__":
    main()
