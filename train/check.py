"""Checking a job's settings without running it.

`compose_job(overrides)` composes `conf/` with Hydra overrides as `python -m train` does and
returns the typed `JobConfig`; `check_job(job, world_size)` raises the one `ValueError` the job
would stop with before any process group exists. `hydra_error_line` turns Hydra's own
composition errors (a wrong type, an unknown key, a bad override) into one line.

`python -m train.check [--nproc N] [overrides...]` runs both and prints `switchyard: error: ...`
(exit 2) or what it checked (exit 0; `--quiet`: nothing). The launchers call it before starting
torchrun, so that a bad setting stops with that one line instead of N failing workers and
torchrun's failure report.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from train.config import JobConfig, refuse_unknown_keys, register_configs, unknown_setting_message

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


def checked_summary(job: JobConfig, world_size: int, overrides: list[str]) -> str:
    """What a successful check covered, in one line."""
    data = job.data.corpus + (f" ({len(job.data.paths)} file(s) found and readable)" if job.data.corpus == "files" else "")
    return (f"switchyard: ok: {len(overrides)} override(s) composed with conf/; every setting of the schema checked "
            f"against its allowed values; layout: {world_size} process(es), parallel.ep={job.parallel.ep} dividing "
            f"them and moe.num_experts={job.moe.num_experts}; data: {data}; writable: run directory {job.run_dir}, "
            f"its checkpoints/ and data.cache_dir {job.data.cache_dir}")


def main(argv: list[str] | None = None) -> int:
    from train.help import job_settings_epilog, tool_parser, wants_help

    argv = sys.argv[1:] if argv is None else argv
    parser = tool_parser("python -m train.check", __doc__, epilog=job_settings_epilog() if wants_help(argv) else None)
    parser.add_argument("--nproc", type=int, default=1, help="number of processes the job will have (world size)")
    parser.add_argument("--quiet", action="store_true", help="print nothing when all is well (the launchers' use)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m train (listed below)")
    args = parser.parse_args(argv)
    try:
        job = compose_job(args.overrides)
        check_job(job, args.nproc)
    except ValueError as err:
        print(f"switchyard: error: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(checked_summary(job, args.nproc, args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
