"""What every command-line entry point shares, so that each refuses bad input the same way:

- `compose_job(overrides)`: the typed `JobConfig` that `python -m train *overrides` would run,
  composed by Hydra from conf/, with Hydra's own errors as one line (`hydra_error_line`);
- `print_error(message)`: the one line `switchyard: error: ...` on stderr;
- `run_tool(body)`: a tool's body, with a `ValueError` turned into that line and exit code 2;
- `tool_parser(prog, doc)`: a tool's argument parser, whose `--help` shows every option's default.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the module stays light: the data stack imports `first_line` from here
    from train.config import JobConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
EXIT_USAGE = 2  # a user mistake: bad settings, a missing file, an unusable run directory


def first_line(text: str) -> str:
    """The first non-blank line of a (possibly multi-line) message."""
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def print_error(message: object) -> None:
    print(f"switchyard: error: {message}", file=sys.stderr, flush=True)


def run_tool(body: Callable[[], int | None]) -> int:
    """Run a tool's body; a ValueError (a user mistake) becomes one line and exit code 2."""
    try:
        code = body()
    except ValueError as err:
        print_error(err)
        return EXIT_USAGE
    return 0 if code is None else code


def compose_job(overrides: list[str]) -> JobConfig:
    """The job `python -m train *overrides` would run; run_dir is where Hydra would put it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    from train.config import refuse_unknown_keys, register_configs

    register_configs()
    GlobalHydra.instance().clear()  # a caller (a test, a tool) may have initialised Hydra before
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None, job_name="train"):
            cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise ValueError(hydra_error_line(err, overrides)) from err
    with open_dict(cfg):
        cfg.run_dir = str(cfg.hydra.run.dir)  # `${hydra:runtime.output_dir}` is only set inside a run
        del cfg["hydra"]
    refuse_unknown_keys(cfg)  # `+train.stepz=50` is refused here as by python -m train
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:  # e.g. an interpolation to a key that does not exist
        raise ValueError(hydra_error_line(err)) from err


def hydra_error_line(err: BaseException, overrides: list[str] = ()) -> str:
    """One line for an error Hydra or OmegaConf raised while composing the config."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    from train.config import unknown_setting_message

    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and getattr(cause, "full_key", None):
        return unknown_setting_message(cause.full_key)
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return f"{cause.full_key}: {first_line(getattr(cause, 'msg', str(cause)))}"
    if isinstance(err, OverrideParseException):
        bad = _unparsable(overrides)
        where = f"the override {bad!r}" if bad else "the overrides"
        return f"cannot parse {where}: {first_line(str(err))} (the syntax is key=value)"
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and "/" in err.missing_cfg_file:
        group, name = err.missing_cfg_file.rsplit("/", 1)
        return f"{group}={name}: no such option (conf/{group}/ has: {', '.join(err.options or [])})"
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def _unparsable(overrides: list[str]) -> str | None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except OverrideParseException:
            return override
    return None


class ToolHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's help ends with its default (unless it has none, or says it itself)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        no_default = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if action.option_strings and not no_default and "default" not in text:
            text += " (default: %(default)s)"
        return text


def tool_parser(prog: str, doc: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of a user tool: its docstring's first paragraph (and the example after it,
    when the paragraph ends with a colon), every option's default."""
    paragraphs = doc.strip().split("\n\n")
    description = "\n\n".join(paragraphs[:2] if paragraphs[0].endswith(":") and len(paragraphs) > 1 else paragraphs[:1])
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog, formatter_class=ToolHelpFormatter)


def wants_help(argv: list[str]) -> bool:
    return any(arg in ("-h", "--help") for arg in argv)
