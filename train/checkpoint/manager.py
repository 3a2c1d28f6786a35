"""One checkpoint manager: save, find the latest, load the whole training state; folders,
metadata, CRCs and publishing. What the state holds and how it is split over the ranks is the
trainer's (`Trainer.state_dict()` / `load_state_dict()`, parallel/training_state.py).

A checkpoint is a folder `<run_dir>/checkpoints/step_NNNNNN/`, written by every rank at once with
torch.distributed.checkpoint (DCP): the trainer's state dict (`model.*`, `optim.*`, `rng.*`), and

    meta.json                format, step, model signature, layout, and the size and CRC-32 of
                             every file of the folder; written last, by rank 0

Each rank writes only what it holds. The state dict's tensors are DTensors, pieces of the
single-process model's tensors, so loading asks DCP for exactly the pieces the new layout holds: a
run resumes on another world size, `parallel.ep` and `deepspeed.zero_stage` with every weight and
AdamW moment kept, and no rank ever holds the whole model. On the same layout the resumed run also
gets its random state back and continues bit for bit.

Crash safety: every rank writes into `step_N.tmp/`; rank 0 then writes meta.json, renames the
folder and only then replaces the `latest` marker atomically, so a crash never leaves a folder
that resume would load. Loading checks every file's size and CRC first and never unpickles code
(train/checkpoint/safe_dcp.py).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor

from parallel.collectives import any_rank
from parallel.dims import ParallelDims
from parallel.trainer import Trainer
from train.checkpoint.files import write_atomic
from train.checkpoint.safe_dcp import SafeFileSystemReader, TensorOnlyLoadPlanner, UnsafeCheckpointError

FORMAT_VERSION = 2  # 1 was DeepSpeed's files + dense.pt + experts_ep*.pt; 2 from ShardedTensors or DTensors alike
LATEST = "latest"
META = "meta.json"
SHAPE_KEYS = {
    "model": (
        "vocab_size",
        "n_layers",
        "d_model",
        "n_heads",
        "ffn_hidden",
        "activation",
        "tie_embeddings",
        "n_kv_heads",
        "head_dim",
        "qk_norm",
        "qkv_bias",
    ),
    "moe": ("num_experts", "every", "expert_ffn_hidden", "num_shared_experts", "shared_expert_gate"),
}
# Keys added after checkpoints were written without them: those checkpoints had the default.
SIGNATURE_DEFAULTS = {
    "model.n_kv_heads": None,
    "model.head_dim": None,
    "model.qk_norm": "none",
    "model.qkv_bias": False,
    "moe.shared_expert_gate": False,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: one line naming the file and what to do."""


class SaveFailed(RuntimeError):
    """A checkpoint that could not be saved (one line: the step, the folder, why); nothing
    published was touched. train.on_save_failure says whether the job stops or goes on."""


def checkpoint_bytes(state: dict) -> int:
    """Bytes the checkpoint of `state` will take: every entry's whole (global) size once, as DCP
    writes it, plus a margin for its index and meta.json."""
    data = sum(_global_bytes(t) for t in state.values())
    return data + data // 100 + (1 << 20)


def _snapshot(state: dict) -> dict:
    """A copy of the state that training cannot change or free while the writer thread runs (some
    entries are views of buffers the next step reuses; DCP's own staging reads them too late)."""
    copies = {}
    for key, t in state.items():
        if isinstance(t, DTensor):
            local = t.to_local().detach().clone()
            copies[key] = DTensor.from_local(
                local, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
            )
        else:
            copies[key] = t.detach().clone()
    return copies


def _global_bytes(t: torch.Tensor) -> int:
    """The whole tensor's bytes, of which this rank may hold a piece (a DTensor's numel is the global one)."""
    return t.numel() * t.element_size()


def model_signature(job) -> dict:
    """The settings that fix parameter shapes; a checkpoint only loads into a model with the same."""
    return {
        f"{section}.{key}": getattr(getattr(job, section), key) for section, keys in SHAPE_KEYS.items() for key in keys
    }


LAYOUT_BEFORE_THE_KEY = {"parallel.pp": 1}  # what a checkpoint written before a layout key existed had


def layout(job, dims: ParallelDims) -> dict:
    return {
        "world_size": dims.world_size,
        "parallel.pp": dims.pp,
        "parallel.ep": dims.ep,
        "deepspeed.zero_stage": job.deepspeed.zero_stage,
    }


@dataclass(frozen=True)
class _InFlight:
    step: int
    staging: Path
    final: Path
    needed: int
    future: object  # concurrent.futures.Future of dcp.async_save


@dataclass(frozen=True)
class ResumePoint:
    folder: Path
    meta: dict


class CheckpointManager:
    def __init__(self, ckpt_dir: Path, job, dims: ParallelDims):
        self.dir = Path(ckpt_dir)
        self.job = job
        self.dims = dims
        self._in_flight: _InFlight | None = None  # the background save not published yet
        self._save_group = None  # gloo group of the background writes

    # -- finding ------------------------------------------------------------------------------

    def latest(self, announce: bool = False) -> Path | None:
        return latest_checkpoint(self.dir, announce)

    def resume_point(self) -> ResumePoint | None:
        """The checkpoint to continue from: asked for with train.resume, or implied by a restart
        after a failure (torchrun --max-restarts, SLURM requeue) when one exists. Reads only."""
        if self.job.train.resume or restarted():
            folder = self.latest(announce=self.dims.is_main)
            if folder is not None:
                meta = self.check(folder)
                _verify_files(folder, meta, self.dims)  # before any heavy work
                _read_metadata(folder)
                return ResumePoint(folder, meta)
            if self.job.train.resume:
                raise CheckpointError(f"train.resume=true but there is no complete checkpoint in {self.dir}")
        return None

    def set_aside_earlier(self) -> None:
        """A fresh run never overwrites an earlier run's checkpoints: they are moved aside (rank 0,
        once the job holds the run folder's lock and passed every check)."""
        if self.job.train.resume or restarted() or self.latest() is None:
            return
        aside = self.dir.with_name(f"checkpoints.prev-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(self.dir, aside)
        print(f"switchyard: starting fresh; earlier checkpoints moved to {aside} (use train.resume=true to continue)")

    def check(self, folder: Path) -> dict:
        """meta.json of `folder`, after checking that this run can load it."""
        meta = _readable_meta(folder)
        if meta is None:
            raise CheckpointError(
                f"{folder / META} is missing or damaged: delete {folder} to resume from the checkpoint before it"
            )
        if not isinstance(meta.get("files"), dict) or ".metadata" not in meta["files"]:
            raise CheckpointError(
                f"{folder / META} lists no files (damaged): delete {folder} to resume from the checkpoint before it"
            )
        if meta.get("format") != FORMAT_VERSION:
            raise CheckpointError(
                f"{folder} has checkpoint format {meta.get('format', 1)!r}; this Switchyard reads format "
                f"{FORMAT_VERSION} only: resume it with the version that wrote it"
            )
        for key, want in model_signature(self.job).items():
            have = meta["model_signature"].get(key, SIGNATURE_DEFAULTS.get(key))
            if have != want:
                raise CheckpointError(
                    f"train.resume=true: checkpoint {folder} was saved with {key}={have!r}, this run has {key}={want!r}"
                )
        return meta

    # -- saving -------------------------------------------------------------------------------

    def save(self, trainer: Trainer, step: int, background: bool = False) -> Path:
        """Every rank calls this; returns the folder the checkpoint is (or will be) published as.
        A save that cannot be done (not enough free space for the state's size, or a write that
        fails, e.g. ENOSPC) raises SaveFailed on every rank, with the published checkpoints
        untouched.

        `background`: torch.distributed.checkpoint's async_save. The call returns once the state is
        copied to host memory; the files are written by a thread (its collectives on a gloo group
        of their own), and the checkpoint is published by `finish_background`, which every rank
        calls once every rank's write is done (the loop learns that through its per-step
        all-reduce). At most one save is in flight: a new save first finishes the one before."""
        self.finish_background()
        name = f"step_{step:06d}"
        final, staging = self.dir / name, self.dir / f"{name}.tmp"
        state = trainer.state_dict()
        needed = checkpoint_bytes(state)
        problem = None
        if self.dims.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
            problem = self._lacking_space(needed, step)
            if problem is None:
                staging.mkdir()
        if any_rank(problem is not None, self.dims):
            raise SaveFailed(problem or f"checkpoint at step {step} not saved (see rank 0)")
        writer = dcp.FileSystemWriter(str(staging))
        try:
            if background:
                future = dcp.async_save(_snapshot(state), storage_writer=writer, process_group=self._background_group())
                self._in_flight = _InFlight(step, staging, final, needed, future)
                return final
            dcp.save(state, storage_writer=writer)
        except (Exception, CheckpointException) as err:  # DCP fails every rank alike when one fails to write
            self._abandon(staging, err, needed, step)
        self._complete(step, staging, final)
        return final

    @property
    def in_flight(self) -> bool:
        """A background save is waiting to be published (the same answer on every rank)."""
        return self._in_flight is not None

    def background_write_running(self) -> bool:
        """This rank's background write has not finished yet (a local answer: see `save`)."""
        return self._in_flight is not None and not self._in_flight.future.done()

    def finish_background(self) -> Path | None:
        """Every rank: wait for the background save in flight, if any, and publish it."""
        if self._in_flight is None:
            return None
        flight, self._in_flight = self._in_flight, None
        try:
            flight.future.result()
        except (Exception, CheckpointException) as err:
            self._abandon(flight.staging, err, flight.needed, flight.step)
        self._complete(flight.step, flight.staging, flight.final)
        return flight.final

    def _background_group(self):
        """Collectives of the writing thread must not interleave with the training loop's."""
        if self.dims.distributed and self._save_group is None:
            self._save_group = dist.new_group(backend="gloo")
        return self._save_group

    def _complete(self, step: int, staging: Path, final: Path) -> None:
        files = _gather_file_digests(staging, self.dims)
        if self.dims.is_main:
            meta = {
                "format": FORMAT_VERSION,
                "step": step,
                "model_signature": model_signature(self.job),
                **layout(self.job, self.dims),
                "files": files,
            }
            self._publish(staging, final, meta)
        _barrier(self.dims)

    def _abandon(self, staging: Path, err: BaseException, needed: int, step: int) -> None:
        _barrier(self.dims)
        if self.dims.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise SaveFailed(self._write_failure(err, needed, step)) from None

    def _lacking_space(self, needed: int, step: int) -> str | None:
        free = shutil.disk_usage(self.dir).free
        if needed <= free:
            return None
        return (
            f"checkpoint at step {step} not saved: {self.dir} needs {needed} bytes, {free} are free "
            f"(the checkpoints saved before are intact)"
        )

    def _write_failure(self, err: BaseException, needed: int, step: int) -> str:
        """One line for a failed write; a full disk is named as such, whatever layer noticed it
        (an OSError ENOSPC, or torch's zip writer: "unexpected pos")."""
        text = str(err)
        free = shutil.disk_usage(self.dir).free
        if _is_enospc(err) or "No space left on device" in text or free < needed:
            cause = f"no space left on device in {self.dir} ({free} bytes free, the checkpoint needs {needed})"
        else:
            cause = _last_line(err)
        return f"checkpoint at step {step} not saved: {cause} (the checkpoints saved before are intact)"

    def _publish(self, staging: Path, final: Path, meta: dict) -> None:
        write_atomic(staging / META, json.dumps(meta, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        write_atomic(self.dir / LATEST, final.name)
        self._prune(keep=final.name)

    def _prune(self, keep: str) -> None:
        """Drop stale staging folders and all but the newest train.keep_checkpoints complete checkpoints."""
        for old in complete_checkpoints(self.dir)[: -self.job.train.keep_checkpoints]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.dir.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    # -- loading ------------------------------------------------------------------------------

    def load(self, trainer: Trainer, point: ResumePoint) -> int:
        """Put the whole training state of `point` into `trainer` (any saved layout); returns the step."""
        folder, meta = point.folder, point.meta
        now = layout(self.job, self.dims)
        exact = all(meta.get(k, LAYOUT_BEFORE_THE_KEY.get(k)) == v for k, v in now.items())
        state = trainer.state_dict(with_rng=exact)  # receivers for exactly what this rank holds now
        _read_into(state, folder)
        trainer.load_state_dict(state)
        if self.dims.is_main:
            saved = {k: meta.get(k, LAYOUT_BEFORE_THE_KEY.get(k)) for k in now}
            how = "exact" if exact else f"resharded from {saved} to {now}, optimizer state kept"
            print(f"switchyard: resumed from step {meta['step']} ({how})")
        return meta["step"]


# -- finding ------------------------------------------------------------------------------------


def restarted() -> bool:
    """This process is a restart after a failure or preemption (torchrun --max-restarts, SLURM requeue)."""
    return any(int(os.environ.get(v, "0") or 0) > 0 for v in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Published folders (a readable meta.json), oldest first."""
    return [
        path
        for path in sorted(Path(ckpt_dir).glob("step_*"))
        if path.is_dir() and not path.name.endswith(".tmp") and _readable_meta(path) is not None
    ]


def latest_checkpoint(ckpt_dir: Path, announce: bool = False) -> Path | None:
    """The folder the `latest` marker names; if that is missing or incomplete, the newest complete
    one (and, with `announce`, a line saying so)."""
    ckpt_dir = Path(ckpt_dir)
    marker = ckpt_dir / LATEST
    named = None
    if marker.is_file():
        try:
            named = ckpt_dir / marker.read_text(encoding="ascii").strip()
        except (UnicodeDecodeError, OSError):
            named = None
    if named is not None and named.parent == ckpt_dir and _readable_meta(named) is not None:
        return named
    complete = complete_checkpoints(ckpt_dir)
    if not complete:
        return None
    if announce and marker.exists():
        if named is None or named.parent != ckpt_dir:
            problem = f"{marker} is damaged"
        elif not named.is_dir():
            problem = f"{marker} names {named.name}, which does not exist"
        else:
            problem = f"{named / META} is missing or damaged"
        print(f"switchyard: {problem}; resuming from {complete[-1].name}, the newest complete checkpoint")
    return complete[-1]


# -- reading a checkpoint on one process (export, tests) -----------------------------------------


def read_tensors(folder: Path, prefixes: tuple[str, ...] = ("model.",)) -> dict[str, torch.Tensor]:
    """Every entry whose name starts with one of `prefixes`, whole, read by this process alone
    (whatever layout saved it): e.g. `model.blocks.1.ffn.experts.w1_EDF` as [E, D, F]."""
    folder = Path(folder)
    meta = _readable_meta(folder)
    if meta is None:
        raise CheckpointError(f"{folder / META} is missing or damaged: not a complete checkpoint")
    _verify_files(folder, meta, None)
    entries = _read_metadata(folder).state_dict_metadata
    state = {
        name: torch.empty(md.size, dtype=md.properties.dtype)
        for name, md in entries.items()
        if name.startswith(prefixes) and hasattr(md, "size")
    }
    with warnings.catch_warnings():  # DCP warns that it loads in a single process: that is the point
        warnings.simplefilter("ignore", UserWarning)
        _read_into(state, folder, no_dist=True)
    return state


def _read_metadata(folder: Path):
    """DCP's index of the folder, unpickled with the allow-list of train/checkpoint/safe_dcp.py."""
    try:
        return SafeFileSystemReader(str(folder)).read_metadata()
    except UnsafeCheckpointError as err:
        raise CheckpointError(f"{folder / '.metadata'} {err}: refusing to load it") from None
    except Exception as err:  # not a pickle at all
        raise CheckpointError(
            f"{folder / '.metadata'} is damaged ({type(err).__name__}): delete {folder} "
            f"to resume from the checkpoint before it"
        ) from None


def _read_into(state: dict, folder: Path, no_dist: bool = False) -> None:
    """DCP load with the safe reader; any failure becomes one line naming the folder."""
    try:
        dcp.load(
            state, storage_reader=SafeFileSystemReader(str(folder)), planner=TensorOnlyLoadPlanner(), no_dist=no_dist
        )
    except UnsafeCheckpointError as err:
        raise CheckpointError(f"{folder / '.metadata'} {err}: refusing to load it") from None
    except (Exception, CheckpointException) as err:  # DCP wraps each rank's failure (a BaseException)
        raise CheckpointError(
            f"{folder} could not be read ({_last_line(err)}): refusing to load it; "
            f"delete it to resume from the checkpoint before it"
        ) from None


def read_model_weights(folder: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's weights as `model.state_dict()` of the single-process model (build it on
    the meta device: only its names and shapes are used)."""
    saved = read_tensors(folder)
    weights = {}
    for name, like in model.state_dict(keep_vars=True).items():
        key = f"model.{name}"
        if key not in saved and getattr(model.cfg.model, "tie_embeddings", False) and name == "lm_head.weight":
            key = "model.embed.weight"
        if key not in saved:
            raise CheckpointError(f"{folder} holds no {name}: it was saved from another model")
        weights[name] = saved[key].view(like.shape)
    return weights


# -- files ----------------------------------------------------------------------------------------


def _readable_meta(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("step"), int) else None


def _digest(path: Path) -> list[int]:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(block, crc)
    return [path.stat().st_size, crc]


def _gather_file_digests(folder: Path, dims: ParallelDims) -> dict[str, list[int]]:
    """Each rank digests the data files it wrote (DCP names them `__<rank>_<n>.distcp`)."""
    mine = {p.name: _digest(p) for p in folder.glob(f"__{dims.rank}_*.distcp")}
    if dims.is_main:
        mine[".metadata"] = _digest(folder / ".metadata")
    gathered = [mine]
    if dims.distributed:
        gathered = [None] * dims.world_size
        dist.all_gather_object(gathered, mine)
    return {name: digest for part in gathered for name, digest in sorted(part.items())}


def _verify_files(folder: Path, meta: dict, dims: ParallelDims | None) -> None:
    """Every file listed in meta.json exists with its size and CRC; ranks split the reading
    (`dims` None: this process reads them all)."""
    problems = []
    rank, world = (dims.rank, dims.world_size) if dims is not None else (0, 1)
    for i, (name, (size, crc)) in enumerate(sorted(meta.get("files", {}).items())):
        if i % world != rank:
            continue
        path = folder / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{path} has {path.stat().st_size} bytes, {size} were written (truncated or damaged)")
        elif _digest(path)[1] != crc:
            problems.append(f"{path} does not match the CRC written with it (damaged)")
    if dims is not None and dims.distributed:
        gathered = [None] * dims.world_size
        dist.all_gather_object(gathered, problems)
        problems = [p for part in gathered for p in part]
    if problems:
        raise CheckpointError(f"{problems[0]}: delete {folder} to resume from the checkpoint before it")


def _last_line(err: BaseException) -> str:
    """DCP's CheckpointException carries each rank's traceback; its last line is the cause."""
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__


def _is_enospc(err: BaseException | None) -> bool:
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        failures = getattr(err, "failures", None)  # DCP's CheckpointException: {rank: exception}
        if isinstance(failures, dict) and any(
            _is_enospc(getattr(f, "exception", f))
            for f in failures.values()
            if isinstance(getattr(f, "exception", f), BaseException)
        ):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _barrier(dims: ParallelDims) -> None:
    if dims.distributed:
        dist.barrier()
