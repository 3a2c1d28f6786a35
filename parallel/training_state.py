"""The whole training state of a Trainer as one flat dict of tensors: what `Trainer.state_dict()`
returns and `Trainer.load_state_dict()` takes, the form torch.distributed.checkpoint saves and
reshards (train/checkpoint/manager.py only adds folders and metadata). The one list:

    model.<name>             every parameter and persistent buffer of the single-process model,
                             under its name there (`blocks.0.attn.qkv.weight`,
                             `blocks.1.ffn.experts.w1_EDF`): experts as the global [E, ...]
                             tensors, dense weights flattened to 1-D (every ZeRO stage splits the
                             flattened parameter)
    optim.exp_avg.<name>     AdamW's moments of every parameter, laid out like the parameter
    optim.exp_avg_sq.<name>
    optim.step.<group>       AdamW's step count of the dense weights (`dense`) and of the experts
    rng.<device>.rank<r>     each rank's random state (`with_rng`)

Each tensor is a DTensor that describes this rank's piece of the single-process tensor, so that
DCP writes every element once and reads exactly the pieces another layout holds:
- dense weights and their AdamW moments, on a 1-D mesh of the world: `Replicate()` where every
  rank holds them whole (weights under ZeRO 0-2, moments under ZeRO-0), else `Shard(0)`. ZeRO-3's
  partitions are Shard(0)'s chunks (views, nothing is copied); ZeRO-1/2 hold ranges of any length
  (parallel/flat_split.py), moved into Shard(0)'s chunks by one all-to-all per moment on saving and
  back on loading: while that runs a rank holds copies of its share of the moments (the chunks,
  and one moment's send and receive buffers), never a whole tensor.
- experts and their moments: views of this rank's EP shard (and FSDP2 slice) as a piece of the
  global [E, ...] tensor on the (edp, ep) mesh (parallel/zero.py: expert_global_view).
- buffers (the routers' selection bias): `Replicate()` on the world mesh.
- step counts and random states: plain tensors (the same on every rank, or one per rank).
On one process every entry is a plain tensor.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from parallel.deepspeed_state import ADAM_STATE_KEYS
from parallel.flat_split import chunk_split, gather_split, repartition
from parallel.zero import expert_global_view, local_tensor

MODEL, OPTIM = "model.", "optim."


def state_dict(trainer, with_rng: bool = True) -> dict[str, torch.Tensor]:
    """This rank's part of the whole training state (see the module docstring)."""
    state = _dense_state(trainer, with_optimizer=True)
    state.update(_buffer_state(trainer))
    state["optim.step.dense"] = torch.tensor(trainer.dense.step_count())
    state.update(_expert_state(trainer, with_optimizer=True))
    if trainer.expert_optimizer is not None:
        state["optim.step.experts"] = torch.tensor(_expert_step(trainer))
    if with_rng:
        state.update(_rng_state(trainer.dims))
    return state


def model_state(trainer) -> dict[str, torch.Tensor]:
    """The `model.*` entries of `state_dict` alone (no optimizer state is moved)."""
    return {
        **_dense_state(trainer, with_optimizer=False),
        **_buffer_state(trainer),
        **_expert_state(trainer, with_optimizer=False),
    }


@torch.no_grad()
def load_state_dict(trainer, state: dict[str, torch.Tensor]) -> None:
    """Put `state` (entries of `state_dict`'s names and layout, e.g. filled in by DCP) into the
    trainer's tensors. Entries not in `state` keep their values; every rank passes the same names."""
    _load_dense(trainer, state)
    for name, buffer in trainer.persistent_buffers():
        if MODEL + name in state:
            buffer.copy_(local_tensor(state[MODEL + name]))
    if "optim.step.dense" in state:
        trainer.dense.set_step_count(float(state["optim.step.dense"]))
    for name, p in trainer.named_expert_parameters:
        if MODEL + name in state:
            _copy_local(local_tensor(p), state[MODEL + name])
        for key in ADAM_STATE_KEYS:
            if f"{OPTIM}{key}.{name}" in state:
                _copy_local(local_tensor(trainer.expert_optimizer.state[p][key]), state[f"{OPTIM}{key}.{name}"])
    if "optim.step.experts" in state:
        for group in trainer.expert_optimizer.param_groups:
            for p in group["params"]:
                trainer.expert_optimizer.state[p]["step"].fill_(float(state["optim.step.experts"]))
    rank = trainer.dims.rank
    if f"rng.cpu.rank{rank}" in state:
        torch.set_rng_state(state[f"rng.cpu.rank{rank}"])
        if torch.cuda.is_available() and f"rng.cuda.rank{rank}" in state:
            torch.cuda.set_rng_state(state[f"rng.cuda.rank{rank}"])


def load_model_weights(trainer, weights: dict[str, torch.Tensor]) -> None:
    """Whole tensors named as in the single-process model (`GPT.state_dict()`, experts as the global
    [E, ...] tensors), held by every rank, into this rank's pieces. Names not given keep their values."""
    pieces = {}
    for key, like in model_state(trainer).items():
        full = weights.get(key[len(MODEL) :])
        if full is None:
            continue
        full = full.to(trainer.dims.device).reshape(like.shape)
        # src_data_rank=None: every rank holds `full` and keeps its own piece, nothing is sent.
        pieces[key] = (
            distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
            if isinstance(like, DTensor)
            else full
        )
    load_state_dict(trainer, pieces)


# -- dense weights (DeepSpeed) ----------------------------------------------------------------------


def _dense_state(trainer, with_optimizer: bool) -> dict[str, torch.Tensor]:
    dense, dims = trainer.dense, trainer.dims
    named = dense.named_parameters()
    state = {}
    split = {}  # key -> (param, this rank's piece of it): split over the ranks
    for name, p in named:
        if dense.zero_stage == 3:
            split[f"{MODEL}{name}"] = (p, dense.master_weights(p))
        else:
            state[f"{MODEL}{name}"] = _replicated(p.detach().reshape(-1), dims)
        for key in ADAM_STATE_KEYS if with_optimizer else ():
            values = dense.optimizer_state(p, key)
            if dense.partitioned:
                split[f"{OPTIM}{key}.{name}"] = (p, values)
            else:
                state[f"{OPTIM}{key}.{name}"] = _replicated(values, dims)
    for kind in _kinds(split):  # the weights, then each moment: one all-to-all each if ZeRO's split is not Shard(0)'s
        keys = [key for key in split if key.startswith(kind)]
        params = [split[key][0] for key in keys]
        chunks = _to_chunks(trainer, params, [split[key][1] for key in keys])
        state.update({key: _sharded(chunk, dense.full_numel(p), dims) for key, p, chunk in zip(keys, params, chunks)})
    return state


def _load_dense(trainer, state: dict[str, torch.Tensor]) -> None:
    dense = trainer.dense
    split = {}  # key -> (param, chunk)
    for name, p in dense.named_parameters():
        key = f"{MODEL}{name}"
        if key in state and dense.zero_stage == 3:
            split[key] = (p, local_tensor(state[key]))
        elif key in state:
            dense.load_weights(p, local_tensor(state[key]).to(p.device))
        for moment in ADAM_STATE_KEYS:
            key = f"{OPTIM}{moment}.{name}"
            if key in state and dense.partitioned:
                split[key] = (p, local_tensor(state[key]))
            elif key in state:
                dense.load_optimizer_state(p, moment, local_tensor(state[key]))
    for kind in _kinds(split):
        keys = [key for key in split if key.startswith(kind)]
        params = [split[key][0] for key in keys]
        pieces = _from_chunks(trainer, params, [split[key][1] for key in keys])
        for key, p, values in zip(keys, params, pieces):
            if dense.piece(p) is None:
                continue
            if key.startswith(MODEL):
                dense.load_weights(p, values)
            else:
                dense.load_optimizer_state(p, key[len(OPTIM) :].split(".", 1)[0], values)


def _kinds(split: dict) -> list[str]:
    """The prefixes (`model.`, `optim.exp_avg.`, ...) present, in a fixed order: every rank alike."""
    kinds = [MODEL] + [f"{OPTIM}{key}." for key in ADAM_STATE_KEYS]
    return [kind for kind in kinds if any(key.startswith(kind) for key in split)]


def _to_chunks(trainer, params: list, values: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """DeepSpeed's pieces of each parameter (None: none here) -> this rank's Shard(0) chunks."""
    dims, dense = trainer.dims, trainer.dense
    if not dims.distributed:
        return values
    group = dims.dp_mesh.get_group()  # this slice's ranks: the dense weights' data-parallel group
    have = gather_split([dense.piece(p) for p in params], dims.device, group)
    want = [chunk_split(dense.full_numel(p), dims.dp) for p in params]
    if have == want:  # ZeRO-3
        return [_or_empty(v, dims.device) for v in values]
    return repartition([_or_empty(v, dims.device) for v in values], have, want, dims.dp_rank, dims.device, group)


def _from_chunks(trainer, params: list, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    """The reverse of `_to_chunks`; ranks holding nothing of a parameter get an empty tensor."""
    dims, dense = trainer.dims, trainer.dense
    if not dims.distributed:
        return chunks
    group = dims.dp_mesh.get_group()
    have = [chunk_split(dense.full_numel(p), dims.dp) for p in params]
    want = gather_split([dense.piece(p) for p in params], dims.device, group)
    if have == want:
        return chunks
    return repartition(chunks, have, want, dims.dp_rank, dims.device, group)


def _or_empty(values: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    return values if values is not None else torch.empty(0, dtype=torch.float32, device=device)


def _sharded(chunk: torch.Tensor, numel: int, dims) -> torch.Tensor:
    if not dims.distributed:
        return chunk
    shape = torch.Size([numel])
    return DTensor.from_local(chunk, dims.dp_mesh, [Shard(0)], run_check=False, shape=shape, stride=(1,))


def _replicated(t: torch.Tensor, dims) -> torch.Tensor:
    if not dims.distributed:
        return t
    return DTensor.from_local(t, dims.dp_mesh, [Replicate()], run_check=False)


# -- buffers, experts, steps, random state ------------------------------------------------------------


def _buffer_state(trainer) -> dict[str, torch.Tensor]:
    return {MODEL + name: _replicated(buffer, trainer.dims) for name, buffer in trainer.persistent_buffers()}


def _expert_state(trainer, with_optimizer: bool) -> dict[str, torch.Tensor]:
    """Each expert weight and its AdamW moments as global [E, ...] views of this rank's shards:
    what saving writes and what loading fills in place."""
    views = {}
    dims, sharded = trainer.dims, trainer.experts_sharded
    with torch.no_grad():
        for name, p in trainer.named_expert_parameters:
            views[MODEL + name] = expert_global_view(p.detach(), dims, sharded)
            for key in ADAM_STATE_KEYS if with_optimizer else ():
                moment = trainer.expert_optimizer.state[p][key]
                views[f"{OPTIM}{key}.{name}"] = expert_global_view(moment, dims, sharded)
    return views


def _expert_step(trainer) -> float:
    state = trainer.expert_optimizer.state
    return float(next(s["step"] for s in state.values() if "step" in s))


def _rng_state(dims) -> dict[str, torch.Tensor]:
    state = {f"rng.cpu.rank{dims.rank}": torch.get_rng_state()}
    if dims.device.type == "cuda":
        state[f"rng.cuda.rank{dims.rank}"] = torch.cuda.get_rng_state(dims.device)
    return state


def _copy_local(live: torch.Tensor, loaded: torch.Tensor) -> None:
    loaded_local = local_tensor(loaded)
    if loaded_local.data_ptr() != live.data_ptr():
        live.copy_(loaded_local)
