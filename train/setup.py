"""Setting up a run: devices, process groups, data, the model and its expert-parallel shard, the
DeepSpeed engine, and where to resume from. Every user mistake surfaces here, as a ValueError,
before any step runs."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from models.gpt import GPT, count_parameters
from parallel.dims import ParallelDims, init_parallel
from parallel.expert_parallel import apply_expert_parallel
from parallel.zero import ZeroTrainer, deepspeed_config, detach_experts
from train.checkpoint import latest_checkpoint, model_signature, open_checkpoint
from train.config import JobConfig
from train.data import PreparedData, prepare_data
from train.metrics import flops_per_token
from train.run_state import restore_training_state, restore_weights


@dataclass
class Run:
    """Everything a running job holds."""

    job: JobConfig
    dims: ParallelDims
    device: torch.device
    autocast_dtype: torch.dtype | None
    data: PreparedData
    trainer: ZeroTrainer
    start_step: int
    ckpt_dir: Path
    flops_per_token: float

    @property
    def model(self) -> GPT:
        return self.trainer.module


def pick_device(job: JobConfig) -> torch.device:
    if job.train.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but CUDA is not available; allowed here: auto, cpu")
    if job.train.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def pick_autocast_dtype(job: JobConfig, device: torch.device) -> torch.dtype | None:
    """None = plain fp32. CPUs run bf16 matmuls slower than fp32, so `auto` keeps them in fp32."""
    if job.train.dtype == "bf16" or (job.train.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def build_optimizer(params, weight_decay: float, job: JobConfig) -> torch.optim.AdamW:
    # Weight decay on matrices only; norms (1-D) are left alone.
    params = list(params)
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    o = job.optim
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)


def barrier(dims: ParallelDims) -> None:
    if dims.distributed:
        dist.barrier()


def setup(job: JobConfig) -> Run:
    """Everything that can fail because of the user's input fails here, as a ValueError."""
    job.validate()
    device = pick_device(job)
    dims = init_parallel(job.parallel.ep, job.moe.num_experts, device)
    if device.type == "cuda":
        device = torch.device("cuda", dims.local_rank)
        torch.cuda.set_device(device)

    job.data.cache_dir = os.path.abspath(os.path.expanduser(job.data.cache_dir))
    job.data.paths = [os.path.abspath(os.path.expanduser(p)) for p in job.data.paths]
    data = prepare_data(job.data)
    job.model.vocab_size = data.vocab_size
    torch.manual_seed(job.train.seed)  # same initial weights on every rank
    model = GPT(job.gpt_config())
    total_params, active_params = count_parameters(model)
    embedding_params = 0 if job.model.tie_embeddings else model.embed.weight.numel()
    apply_expert_parallel(model, dims)
    model.to(device)
    experts = detach_experts(model)

    ckpt_dir = Path(job.run_dir) / "checkpoints"
    resume_from = find_resume_point(job, dims, ckpt_dir)
    if resume_from is not None:
        restore_weights(resume_from, model, experts, job, dims)
    trainer = ZeroTrainer(
        model,
        build_optimizer(model.parameters(), job.optim.weight_decay, job),
        experts,
        build_optimizer([p for m in experts for p in m.parameters()], job.optim.weight_decay, job) if experts else None,
        deepspeed_config(job.deepspeed.zero_stage, job.train.micro_batch, job.train.grad_accum, job.optim.grad_clip, dims.world_size),
        dims,
        job.optim.grad_clip,
    )
    start_step = 0
    if resume_from is not None:
        start_step = restore_training_state(resume_from, trainer, layout(job, dims), dims)
    barrier(dims)
    fpt = flops_per_token(active_params, embedding_params, job.model.n_layers, job.model.d_model, job.train.seq_len)
    if dims.is_main:
        print(
            f"switchyard: {total_params / 1e6:.1f}M parameters ({active_params / 1e6:.1f}M active), "
            f"{dims.world_size} process(es), ep={dims.ep}, ZeRO-{job.deepspeed.zero_stage}, device={device}, "
            f"{len(data.train) / 1e6:.2f}M training tokens, vocab {data.vocab_size}"
        )
    return Run(job, dims, device, pick_autocast_dtype(job, device), data, trainer, start_step, ckpt_dir, fpt)


def layout(job: JobConfig, dims: ParallelDims) -> dict:
    return {"world_size": dims.world_size, "parallel.ep": dims.ep, "deepspeed.zero_stage": job.deepspeed.zero_stage}


def find_resume_point(job: JobConfig, dims: ParallelDims, ckpt_dir: Path) -> tuple[Path, dict] | None:
    """The checkpoint to continue from: asked for with train.resume, or implied by a restart after
    a failure, when one exists: torchrun's elastic restart, or SLURM's requeue (preemption, node
    failure, `scontrol requeue`)."""
    restarted = any(int(os.environ.get(count, "0") or "0") > 0 for count in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))
    if job.train.resume or (restarted and latest_checkpoint(ckpt_dir) is not None):
        return open_checkpoint(ckpt_dir, model_signature(job))
    if not restarted and dims.is_main and latest_checkpoint(ckpt_dir) is not None:
        # A fresh run never overwrites an earlier run's checkpoints: they are kept aside.
        aside = ckpt_dir.with_name(f"checkpoints.prev-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(ckpt_dir, aside)
        print(f"switchyard: starting fresh; earlier checkpoints moved to {aside} (use train.resume=true to continue)")
    return None


def checkpoint_meta(job: JobConfig, dims: ParallelDims) -> dict:
    return {"model_signature": model_signature(job), **layout(job, dims)}
