"""Reading a finished (or running) run's weights: the one place that knows how a run directory
stores its model, for the tools beside the job (export_hf, generate, upcycling).

`load_run_weights(run_dir, step)` returns the run's configuration, the full unsharded state dict
(keys exactly those of `models.gpt.GPT(job.gpt_config()).state_dict()`, every expert stacked
`[E, ...]`) and its tokenizer, whatever layout saved it (any world size, `parallel.ep`, ZeRO
stage). When the checkpoint format changes, only the three checkpoint functions below
(`run_checkpoint_config`, `_checkpoint_folder`, `_read_checkpoint`) change.

The tokenizer: `<run_dir>/tokenizer.json` when the run recorded it (`save_run_tokenizer`, called by
the job's set-up); else the prepared-data cache its data settings point to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from models.gpt import GPT
from train.checkpoint.manager import complete_checkpoints, latest_checkpoint, read_model_weights
from train.config import JobConfig
from train.data.tokenizer import Tokenizer

RUN_TOKENIZER = "tokenizer.json"


@dataclass
class RunWeights:
    job: JobConfig  # the run's settings; job.model.vocab_size is the trained vocabulary
    state_dict: dict[str, torch.Tensor]  # GPT state dict, experts stacked [E, ...]
    tokenizer: Tokenizer
    step: int
    checkpoint: Path  # the folder the weights were read from

    def build_model(self) -> GPT:
        """The model in eval mode on CPU, fp32, holding these weights."""
        model = GPT(self.job.gpt_config())
        model.load_state_dict(self.state_dict)
        return model.eval()


def load_run_weights(run_dir: Path | str, step: int | None = None) -> RunWeights:
    """The weights of `run_dir` at `step` (None: the latest complete checkpoint). Every problem is
    one ValueError naming what is wrong (no such run, no checkpoint, no such step, ...)."""
    run_dir = Path(run_dir).expanduser().resolve()
    job, folder, meta = run_checkpoint_config(run_dir, step)
    state_dict = _read_checkpoint(folder, job)
    tokenizer = run_tokenizer(run_dir, job)
    if tokenizer.vocab_size != job.model.vocab_size:
        raise ValueError(
            f"{run_dir}: the run's tokenizer has {tokenizer.vocab_size} tokens but its checkpoint has "
            f"model.vocab_size={job.model.vocab_size}; the tokenizer found is not the one it was trained with"
        )
    return RunWeights(job, state_dict, tokenizer, meta["step"], folder)


def run_job_config(run_dir: Path) -> JobConfig:
    """The run's JobConfig from the Hydra config it saved (`.hydra/config.yaml`)."""
    from omegaconf import OmegaConf

    saved = run_dir / ".hydra" / "config.yaml"
    if not run_dir.is_dir():
        raise ValueError(f"RUN_DIR {run_dir} does not exist")
    if not saved.is_file():
        raise ValueError(f"RUN_DIR {run_dir} is not a Switchyard run directory: no .hydra/config.yaml")
    try:
        cfg = OmegaConf.load(saved)
        cfg.run_dir = str(run_dir)  # was ${hydra:runtime.output_dir}, which only resolves inside Hydra
        job = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobConfig), cfg))
    except Exception as err:  # an older or hand-edited config: say which file
        raise ValueError(f"{saved}: not a configuration this version can read ({type(err).__name__}: {err})") from err
    return job


def run_checkpoint_config(run_dir: Path | str, step: int | None = None) -> tuple[JobConfig, Path, dict]:
    """The run's JobConfig with the trained vocabulary, the checkpoint folder and its meta.json,
    without reading any weights."""
    run_dir = Path(run_dir).expanduser().resolve()
    job = run_job_config(run_dir)
    folder = _checkpoint_folder(run_dir, step)
    meta = json.loads((folder / "meta.json").read_text())
    for key, value in meta["model_signature"].items():  # the saved config and the checkpoint must agree
        section, name = key.split(".")
        if key != "model.vocab_size" and getattr(getattr(job, section), name) != value:
            raise ValueError(
                f"{folder}: checkpoint has {key}={value!r} "
                f"but the run's .hydra/config.yaml says {getattr(getattr(job, section), name)!r}"
            )
    job.model.vocab_size = meta["model_signature"]["model.vocab_size"]  # set from the tokenizer at run time
    return job, folder, meta


def _checkpoint_folder(run_dir: Path, step: int | None) -> Path:
    ckpt_dir = run_dir / "checkpoints"
    if step is None:
        latest = latest_checkpoint(ckpt_dir)
        if latest is None:
            raise ValueError(
                f"RUN_DIR {run_dir} has no complete checkpoint (nothing under checkpoints/ with a meta.json)"
            )
        return latest
    complete = complete_checkpoints(ckpt_dir)
    folder = ckpt_dir / f"step_{step:06d}"
    if folder not in complete:
        have = [json.loads((p / "meta.json").read_text())["step"] for p in complete]
        raise ValueError(
            f"--step {step}: {run_dir} has no complete checkpoint of step {step}; it has steps {have or 'none'}"
        )
    return folder


def _read_checkpoint(folder: Path, job: JobConfig) -> dict[str, torch.Tensor]:
    """Every weight of the single-process model, read on this process alone from whatever layout
    saved the checkpoint (train/checkpoint/manager.py)."""
    with torch.device("meta"):
        expected = GPT(job.gpt_config())
    return read_model_weights(folder, expected)


def run_tokenizer(run_dir: Path, job: JobConfig) -> Tokenizer:
    if job.data.tokenizer.kind == "bytes":
        return Tokenizer()
    recorded = run_dir / RUN_TOKENIZER
    if recorded.is_file():
        return Tokenizer.from_file(str(recorded))
    return _cached_tokenizer(run_dir, job)


def _cached_tokenizer(run_dir: Path, job: JobConfig) -> Tokenizer:
    """The tokenizer of the prepared data the run's data settings name (runs that did not record one)."""
    import os

    from train.data.prepare import cache_inputs, cache_key

    try:
        cache = Path(os.path.expanduser(job.data.cache_dir)) / cache_key(cache_inputs(job.data))
    except (ValueError, OSError) as err:
        raise ValueError(f"{run_dir}: cannot locate the run's tokenizer from its data settings: {err}") from err
    meta, path = cache / "meta.json", cache / "tokenizer.json"
    if not (meta.is_file() and path.is_file()):
        raise ValueError(
            f"{run_dir}: the run's tokenizer is not there: no {RUN_TOKENIZER} in the run directory and no prepared "
            f"data at {cache} (set SWITCHYARD_CACHE / data.cache_dir as in training)"
        )
    return Tokenizer.from_file(str(path), json.loads(meta.read_text())["eot_id"])


def save_run_tokenizer(run_dir: Path | str, tokenizer: Tokenizer, is_main: bool) -> None:
    """Record the run's tokenizer in its directory, so its weights can be read without the data cache."""
    if not is_main or tokenizer.backend is None:  # the bytes tokenizer needs no file
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f"{RUN_TOKENIZER}.tmp"
    tokenizer.save(str(tmp))
    tmp.replace(run_dir / RUN_TOKENIZER)
