"""What a checkpoint holds for a running job, and how it is put back (see train/checkpoint.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from parallel.dims import ParallelDims
from parallel.zero import ZeroTrainer
from train.checkpoint import expert_shard_weights, load, same_layout


def full_dense_state(trainer: ZeroTrainer, zero_stage: int) -> dict[str, torch.Tensor]:
    """The dense weights as one state dict; under ZeRO-3 they are gathered first (every rank
    must take part; the result is used on rank 0)."""
    if zero_stage != 3:
        return trainer.module.state_dict()
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(trainer.module.parameters()), modifier_rank=None):
        return {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}


def write_training_state(folder: Path, trainer: ZeroTrainer, job, dims: ParallelDims) -> None:
    trainer.engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)
    dense = full_dense_state(trainer, job.deepspeed.zero_stage)
    if dims.rank == 0:
        torch.save(dense, folder / "dense.pt")
    if dims.rank < dims.ep:  # the first EP group holds one copy of every expert shard
        shard = {
            "weights": [module.state_dict() for module in trainer.experts],
            "optimizer": trainer.expert_optimizer.state_dict() if trainer.expert_optimizer else None,
        }
        torch.save(shard, folder / f"experts_ep{dims.ep_rank}.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, folder / f"rng_rank{dims.rank}.pt")


def restore_weights(resume_from: tuple[Path, dict], model: nn.Module, experts: list[nn.Module], job, dims: ParallelDims) -> None:
    """Load the weights into the (not yet DeepSpeed-wrapped) model, whatever layout saved them."""
    path, meta = resume_from
    model.load_state_dict(load(path / "dense.pt"))
    num_local = job.moe.num_experts // dims.ep
    shard = expert_shard_weights(path, meta, job.moe.num_experts, dims.ep_rank * num_local, num_local)
    for module, weights in zip(experts, shard, strict=True):
        module.load_state_dict(weights)


def restore_training_state(resume_from: tuple[Path, dict], trainer: ZeroTrainer, layout: dict, dims: ParallelDims) -> int:
    """Optimizer and RNG state when the layout is unchanged (exact resume); returns the step."""
    path, meta = resume_from
    if not same_layout(meta, layout):
        if dims.is_main:
            saved = {k: meta.get(k) for k in layout}
            print(f"switchyard: resharding checkpoint {path.name} from {saved} to {layout}: weights restored, optimizer state starts afresh")
        return meta["step"]
    trainer.engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True)
    if trainer.expert_optimizer is not None:
        trainer.expert_optimizer.load_state_dict(load(path / f"experts_ep{dims.ep_rank}.pt")["optimizer"])
    rng = load(path / f"rng_rank{dims.rank}.pt")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return meta["step"]
