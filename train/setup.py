"""Setting up a run: devices, process groups, the run folder's lock, data, the model (built on the
meta device), its parallel trainer, and where to resume from. Every user mistake surfaces here, as
a ValueError, before any step runs; and the run folder changes only after every check passed (the
lock aside): a refused start leaves the settings, tokenizer and checkpoints of a run as they were."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from models.gpt import GPT, count_parameters
from parallel.dims import ParallelDims, init_parallel, read_launch_env, wait_for_every_rank
from parallel.parallelize import parallelize
from parallel.precision import autocast_dtype
from parallel.trainer import Trainer
from train.checkpoint.manager import CheckpointManager
from train.checkpoint.run_weights import save_run_tokenizer
from train.config import JobConfig, process_layout
from train.data import PreparedData, prepare_data
from train.hf.init_from import load_initial_weights
from train.metrics import flops_per_token
from train.preflight import preflight
from train.run_lock import RunLock

DATA_PREPARATION_TIMEOUT = datetime.timedelta(hours=6)


@dataclass
class Run:
    """Everything a running job holds."""

    job: JobConfig
    dims: ParallelDims
    autocast_dtype: torch.dtype | None
    data: PreparedData
    trainer: Trainer
    checkpoints: CheckpointManager
    start_step: int
    flops_per_token: float
    lock: RunLock  # held by rank 0 until the job ends (release it)

    @property
    def model(self) -> GPT:
        """The model, or under pipeline parallelism this rank's stages (parallel/pipeline.py: LocalStages)."""
        return self.trainer.module

    @property
    def num_moe_layers(self) -> int:
        """MoE layers of the whole model (also where this rank holds only some of them)."""
        return self.job.model.n_layers // self.job.moe.every

    @property
    def device(self) -> torch.device:
        return self.dims.device


def pick_device(job: JobConfig) -> torch.device:
    if job.train.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but CUDA is not available; allowed here: auto, cpu")
    if job.train.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def take_run_lock(run_dir: str, dims: ParallelDims) -> RunLock:
    """Rank 0 takes the run folder's lock; every rank gets its verdict (a ValueError naming the holder)."""
    lock = RunLock(run_dir)
    refusal = None
    if dims.is_main:
        try:
            note = lock.acquire()
            if note:
                print(note, flush=True)
        except ValueError as err:
            refusal = str(err)
    if dims.distributed:
        box = [refusal]
        dist.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal:
        raise ValueError(refusal)
    return lock


def setup(job: JobConfig, record_settings: Callable[[], None] | None = None) -> Run:
    """Everything that can fail because of the user's input fails here, as a ValueError.
    `record_settings` (rank 0, once every check passed) writes the run's settings into its folder."""
    preflight(job)
    t = job.train
    # The layout's checks from the launcher's variables: every rank refuses before any collective.
    t.micro_batch, t.grad_accum = process_layout(job, read_launch_env()[0])  # the loop reads these
    dims = init_parallel(job.parallel.ep, job.moe.num_experts, pick_device(job), pp=job.parallel.pp)
    if dims.device.type == "cuda":
        torch.cuda.set_device(dims.device)
    if t.global_batch is not None and dims.is_main:
        print(
            f"switchyard: global batch {t.global_batch} = {dims.world_size} process(es) x "
            f"{t.grad_accum} micro-batch(es) "
            f"x {t.micro_batch} sequences"
        )
    lock = take_run_lock(job.run_dir, dims)
    try:
        return _set_up_locked(job, dims, lock, record_settings)
    except BaseException:
        lock.release()
        raise


def _set_up_locked(job: JobConfig, dims: ParallelDims, lock: RunLock, record_settings) -> Run:
    job.data.cache_dir = os.path.abspath(os.path.expanduser(job.data.cache_dir))
    job.data.paths = [os.path.abspath(os.path.expanduser(p)) for p in job.data.paths]
    data = prepare_data(job.data)
    # A node that builds the data cache (or waits for another process building it) may take far
    # longer than a collective may wait; the others wait here, not in the first collective.
    wait_for_every_rank(dims, "data", DATA_PREPARATION_TIMEOUT)
    job.model.vocab_size = data.vocab_size
    checkpoints = CheckpointManager(Path(job.run_dir) / "checkpoints", job, dims)
    resume_point = checkpoints.resume_point()  # before any heavy work: a bad checkpoint fails fast

    with torch.device("meta"):  # no rank allocates more than the shard it will hold
        model = GPT(job.gpt_config())
    total_params, active_params = count_parameters(model)
    embedding_params = 0 if job.model.tie_embeddings else model.embed.weight.numel()
    trainer = parallelize(model, dims, job)
    if resume_point is not None:
        start_step = checkpoints.load(trainer, resume_point)
    else:
        start_step = 0
        load_initial_weights(trainer, job, data.tokenizer)  # model.init_from (hf: / upcycle:), if set
    # Every check passed: from here on the job changes its run folder.
    if dims.is_main:
        if resume_point is None:
            checkpoints.set_aside_earlier()
        save_run_tokenizer(job.run_dir, data.tokenizer, dims.is_main)  # for export_hf / generate
        if record_settings is not None:
            record_settings()
    fpt = flops_per_token(active_params, embedding_params, job.model.n_layers, job.model.d_model, job.train.seq_len)
    if dims.is_main:
        print(
            f"switchyard: {total_params / 1e6:.1f}M parameters ({active_params / 1e6:.1f}M active), "
            f"{dims.world_size} process(es), "
            + (f"pp={dims.pp} ({job.parallel.schedule}), " if dims.pp > 1 else "")
            + f"ep={dims.ep}, ZeRO-{job.deepspeed.zero_stage}, device={dims.device}, "
            f"{len(data.train) / 1e6:.2f}M training tokens, vocab {data.vocab_size}"
        )
    return Run(
        job, dims, autocast_dtype(job.train.dtype, dims.device), data, trainer, checkpoints, start_step, fpt, lock
    )
