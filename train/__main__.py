"""`python -m train [overrides]`: the Hydra entry point (also under torchrun and srun).

A mistake in the settings, found by Hydra while composing the config or by Switchyard while
checking it, ends the job with one line `switchyard: error: ...` on stderr (printed by rank 0
only, when there are several processes: see `fail`) and exit code 2; a diverged run exits with 3;
a checkpoint that cannot be saved (full disk), with train.on_save_failure=stop, with 4; a rank
whose peer died prints one line and exits with 5 (no collective traceback);
a job stopped by SIGTERM, SIGINT or SIGUSR1 saves a checkpoint and exits with 75, "run me again"
(train/preemption.py).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from parallel.collectives import peer_failure
from parallel.dims import shutdown
from train import preemption
from train.checkpoint.files import write_atomic
from train.checkpoint.manager import SaveFailed
from train.cli import EXIT_USAGE, hydra_error_line, print_error
from train.config import JobConfig, refuse_unknown_keys, register_configs
from train.logging import quiet_third_party_logs
from train.loop import TrainingDiverged, train
from train.setup import setup
from train.sweep import in_sweep, is_first_process, written_summary

register_configs()
_job_started = False  # an OSError before the job started comes from Hydra creating the run directory
OTHER_RANKS_WAIT_S = 30.0
EXIT_DIVERGED = 3
EXIT_SAVE_FAILED = 4  # a checkpoint could not be saved (train.on_save_failure=stop)
EXIT_PEER_FAILED = 5  # this rank stopped because another one died (its own exit code says what happened to it)


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    global _job_started
    _job_started = True
    run = None
    preemption.install()
    quiet_third_party_logs()
    try:
        refuse_unknown_keys(cfg)
        job: JobConfig = OmegaConf.to_object(cfg)
        if in_sweep() and job.logging.wandb.group is None:
            job.logging.wandb.group = Path(HydraConfig.get().sweep.dir).name  # one W&B group per sweep
        run = setup(job, record_settings=lambda: record_settings(cfg))
        summary = train(run)
    except (ValueError, TrainingDiverged, SaveFailed) as err:  # a user mistake, a diverged run, a full disk: one line
        if in_sweep():
            report(err)
            raise  # Hydra records this job as failed and runs the others
        fail(str(err), exit_code(err))
    except preemption.Preempted:  # the loop saved the checkpoint and logged the line
        if in_sweep():
            raise
        sys.exit(preemption.EXIT_PREEMPTED)  # "run me again"; the lock is released below
    except Exception as err:  # noqa: BLE001 - only a lost peer is turned into a line; the rest re-raised
        cause = peer_failure(err)
        if cause is None:
            raise  # this rank's own failure: its traceback is the root cause
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "?"))
        print(
            f"switchyard: (rank {rank}) stopped: another rank failed ({cause}); the first failure is the root cause "
            "torchrun names",
            file=sys.stderr,
            flush=True,
        )
        if run is not None:
            run.lock.release()
        os._exit(EXIT_PEER_FAILED)  # no teardown: the process group is broken and would hang or print more
    finally:
        if run is not None:
            run.lock.release()
        if not in_sweep():  # sweep jobs share this process, and DeepSpeed keeps its group handles
            shutdown()
    return sweep_figures(summary)


def record_settings(cfg: DictConfig) -> None:
    """The run's settings in `<run_dir>/.hydra/` (config.yaml, hydra.yaml, overrides.yaml, as Hydra
    writes them), written by the job once it passed every check (conf/config.yaml sets Hydra's
    own writing off): the recorded settings of a run are only ever those it trained with."""
    hydra_cfg = HydraConfig.get()
    folder = Path(hydra_cfg.runtime.output_dir) / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "config.yaml": cfg,
        "hydra.yaml": OmegaConf.create({"hydra": hydra_cfg}),
        "overrides.yaml": OmegaConf.create(list(hydra_cfg.overrides.task)),
    }
    for name, node in files.items():
        write_atomic(folder / name, OmegaConf.to_yaml(node))


def report(message) -> None:
    """Rank 0 speaks for all: every rank checks the same settings and reaches the same verdict."""
    if is_first_process():
        print_error(message)


def exit_code(err: Exception) -> int:
    if isinstance(err, SaveFailed):
        return EXIT_SAVE_FAILED
    return EXIT_DIVERGED if isinstance(err, TrainingDiverged) else EXIT_USAGE


def fail(message: str, code: int) -> None:
    """Print the line once and exit. Every rank reaches the same verdict on the same settings, so
    the other ranks leave the printing to rank 0 and wait for the launcher to stop them when rank 0
    exits (torchrun and `srun --kill-on-bad-exit` do): were one of them first to exit, torchrun
    could stop rank 0 before it printed. A rank still running after OTHER_RANKS_WAIT_S failed
    alone (e.g. a file missing on its node) and says so itself."""
    preemption.uninstall()  # the launcher's SIGTERM, when rank 0 has exited, must stop this rank
    if is_first_process():
        report(message)
    else:
        time.sleep(OTHER_RANKS_WAIT_S)
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID"))
        print_error(f"(rank {rank}) {message}")
    sys.exit(code)


def sweep_figures(summary: dict) -> dict:
    imbalance = [v for k, v in summary.items() if k.endswith("/imbalance_max_over_mean")]
    return {
        "val/loss": summary.get("val/loss"),
        "perf/tokens_per_s": summary.get("perf/tokens_per_s"),
        "imbalance": sum(imbalance) / len(imbalance) if imbalance else None,
    }


def cli() -> None:
    """Hydra's main, with Hydra's own errors (composition, run directory) as one line too. `--help`
    is Switchyard's (every setting with its meaning, default and allowed values), not Hydra's."""
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        from train.help import job_help

        print(job_help(), end="")
        return
    # Hydra then raises its errors instead of printing a multi-line report and exiting with 1.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (HydraException, OmegaConfBaseException) as err:  # bad override, wrong type, unknown key
        fail(hydra_error_line(err, sys.argv[1:]), EXIT_USAGE)
    except OSError as err:
        if _job_started:
            raise
        fail(
            f"cannot create the run directory: {err.filename}: {err.strerror} "
            "(set run_name, hydra.run.dir or, for sweeps, hydra.sweep.dir to a writable place)",
            EXIT_USAGE,
        )
    except (ValueError, TrainingDiverged, SaveFailed) as err:  # a sweep with a failed job: each job printed its line
        summary = written_summary()  # Hydra skips on_multirun_end (which prints it) after a failed job
        where = f"; every job's result is in {summary}" if summary else ""
        fail(f"at least one sweep job failed, e.g.: {err}{where}", exit_code(err))
    except preemption.Preempted:  # a sweep stopped by a signal: its running job saved a checkpoint
        sys.exit(preemption.EXIT_PREEMPTED)
    except KeyboardInterrupt:  # Ctrl-C before the job installed its handler (while importing)
        print("switchyard: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    cli()
