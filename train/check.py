"""Checking a job's settings without running it.

`compose_job(overrides)` composes `conf/` with Hydra overrides as `python -m train` does and
returns the typed `JobConfig`; `check_job(job, world_size)` raises the one `ValueError` the job
would stop with before any process group exists. `hydra_error_line` turns Hydra's own
composition errors (a wrong type, an unknown key, a bad override) into one line.

`python -m train.check [--nproc N] [overrides...]` runs both and prints `switchyard: error: ...`
(exit 2) or nothing (exit 0). The launchers call it before starting torchrun, so that a bad
setting stops with that one line instead of N failing workers and torchrun's failure report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from train.config import JobConfig, batch_layout, refuse_unknown_keys, register_configs, unknown_setting_message

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_job(overrides: list[str]) -> JobConfig:
    """The job `python -m train *overrides` would run; run_dir is where Hydra would put it."""
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None, job_name="train"):
            cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise ValueError(hydra_error_line(err, overrides)) from err
    with open_dict(cfg):
        cfg.run_dir = str(cfg.hydra.run.dir)  # `${hydra:runtime.output_dir}` is only set inside a run
        del cfg["hydra"]
    refuse_unknown_keys(cfg)
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:  # e.g. an interpolation to a key that does not exist
        raise ValueError(hydra_error_line(err)) from err


def check_job(job: JobConfig, world_size: int = 1) -> None:
    """Everything checked before the first process group: settings, places, process layout."""
    from parallel.dims import validate_degrees  # imports torch.distributed: only where needed

    job.validate()
    validate_degrees(world_size, job.parallel.ep, job.moe.num_experts)
    batch_layout(job.train, world_size)


def hydra_error_line(err: BaseException, overrides: list[str] = ()) -> str:
    """One line for an error Hydra or OmegaConf raised while composing the config."""
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and getattr(cause, "full_key", None):
        return unknown_setting_message(cause.full_key)
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return f"{cause.full_key}: {_first_line(getattr(cause, 'msg', str(cause)))}"
    if isinstance(err, OverrideParseException):
        bad = _unparsable(overrides)
        return f"cannot parse the override {bad!r}: {_first_line(str(err))} (the syntax is key=value)" if bad else \
            f"cannot parse the overrides: {_first_line(str(err))} (the syntax is key=value)"
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and "/" in err.missing_cfg_file:
        group, name = err.missing_cfg_file.rsplit("/", 1)
        return f"{group}={name}: no such option (conf/{group}/ has: {', '.join(err.options or [])})"
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def _unparsable(overrides: list[str]) -> str | None:
    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except OverrideParseException:
            return override
    return None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=1, help="number of processes the job will have (world size)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m train")
    args = parser.parse_args(argv)
    try:
        check_job(compose_job(args.overrides), args.nproc)
    except ValueError as err:
        print(f"switchyard: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
