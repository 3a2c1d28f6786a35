"""Where DeepSpeed keeps this rank's share of the dense weights, gradients and AdamW state.

ZeRO-1/2 partition the flattened parameters of each param group into contiguous ranges, one per
rank (DeepSpeed's `_hp_mapping` fragments, the mechanism behind its `safe_get_full_*` API); ZeRO-3
partitions each flattened parameter into equal ranges (`ds_tensor`, read through DeepSpeed's
`safe_*_local_*` API); ZeRO-0 keeps everything whole on every rank. `DenseShards` hides the three
behind one view: for each dense parameter, the range of its flattened elements held here, and the
tensors for that range.

No other module reads DeepSpeed's internals (private attributes, `deepspeed.runtime`, `deepspeed.ops`):
gradient clipping (parallel/grad_norm.py), the training state (parallel/training_state.py), the
memory measurement (parallel/memory.py) and the planner's DeepSpeed defaults (planner/model_states.py)
go through this module, and tests/test_layers.py checks that. The tests pin its behaviour (one
gradient norm, resharded optimizer state and measured bytes equal the single-process ones and the plan).
"""

from __future__ import annotations

import torch
from torch import nn

from parallel.flat_split import Piece

ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")


def zero_settings(zero_optimization: dict) -> dict:
    """DeepSpeed's own values (its defaults filled in) of the ZeRO settings the planner mirrors, for
    the `zero_optimization` section of a DeepSpeed config."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = DeepSpeedZeroConfig(**zero_optimization)
    return {
        "reduce_bucket_size": int(zero.reduce_bucket_size),
        "contiguous_gradients": bool(zero.contiguous_gradients),
        "sub_group_size": int(zero.sub_group_size),
        "param_persistence_threshold": int(zero.param_persistence_threshold),
        "model_persistence_threshold": int(zero.model_persistence_threshold),
    }


def skip_deepspeed_shm_op() -> None:
    """DeepSpeed's CPU backend compiles its `deepspeed_shm_comm` op with gcc when it sets up
    communication (slow on the first run, noisy, needs a compiler). The op only serves
    `inference_all_reduce`, which training never calls, and DeepSpeed builds it only when its table
    of compatible ops says so; that table is one module-level dict whose edits persist."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def skip_zero3_grad_norm(engine) -> None:
    """Stop ZeRO-3 from computing its own gradient norm, which we throw away: ours covers dense and
    expert gradients together (parallel/grad_norm.py), and clipping is ours (`gradient_clipping` 0).
    ZeRO-1/2 have the config key `compute_grad_norm: false` for that; DeepSpeed 0.19.8 refuses it at
    stage 3 (zero/config.py: "compute_grad_norm=false is supported only with ZeRO Stage 1 or 2"), and
    `DeepSpeedZeroOptimizer_Stage3.step` always calls `_get_norm_groups()` (a norm over every
    partition, an all-reduce, and a host read of the result in `is_invalid_grad_norm`). Its norm
    only feeds DeepSpeed's own clipping (off) and `engine.get_global_grad_norm()` (unused), so the
    engine's optimizer reports one norm of 0.0 per group instead: a host float, valid, read without a
    device sync. fp16 overflow checks are elsewhere (`check_overflow`) and untouched."""
    if engine.zero_optimization_stage() != 3:
        return
    zero3_optimizer = engine.optimizer
    zero3_optimizer._get_norm_groups = lambda: [0.0] * len(zero3_optimizer.fp16_groups)


def ensure_adamw_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor] | None = None) -> None:
    """Create AdamW's state (step 0, zero moments) for `params` (default: the optimizer's) where it
    does not exist yet, as AdamW's first step would, so that a checkpoint can be loaded into it
    before any step ran."""
    if params is None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        state = optimizer.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            for key in ADAM_STATE_KEYS:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)


class DenseShards:
    """This rank's share of every dense parameter of a DeepSpeed engine (fp32 master weights)."""

    def __init__(self, engine, client_optimizer: torch.optim.Optimizer, zero_stage: int):
        self.engine = engine
        self.client_optimizer = client_optimizer  # the AdamW handed to deepspeed.initialize
        self.zero_stage = zero_stage
        ensure_adamw_state(client_optimizer, self._optimized_tensors())

    def _optimized_tensors(self) -> list[torch.Tensor]:
        """What AdamW steps: the parameters (ZeRO-0) or the flat fp32 partitions DeepSpeed made."""
        if self.zero_stage == 0:
            return [p for group in self.client_optimizer.param_groups for p in group["params"]]
        if self.zero_stage == 3:
            return list(self.engine.optimizer.fp32_partitioned_groups_flat)
        return list(self.engine.optimizer.single_partition_of_fp32_groups)

    @property
    def partitioned(self) -> bool:
        """True when every element lives on exactly one rank (ZeRO >= 1 optimizer state)."""
        return self.zero_stage >= 1

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.engine.module.named_parameters())

    # -- where ---------------------------------------------------------------------------------

    def piece(self, p: nn.Parameter) -> Piece | None:
        """The range of `p` (flattened) whose optimizer state and gradient live here; None if none."""
        numel = self.full_numel(p)
        if self.zero_stage == 0:
            return Piece(0, numel)
        if self.zero_stage == 3:
            part = p.ds_tensor.numel()
            start = p._z3_optimizer._get_param_partition_rank(p) * part
            held = max(0, min(part, numel - start))
            return Piece(start, held) if held else None
        mapping = p._hp_mapping
        if mapping is None:
            return None
        return Piece(mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel)

    def full_numel(self, p: nn.Parameter) -> int:
        return p.ds_numel if self.zero_stage == 3 else p.numel()

    # -- gradients (valid after the boundary backward, before engine.step) -------------------

    def grad(self, p: nn.Parameter) -> torch.Tensor | None:
        """This rank's piece of p's averaged gradient, flattened."""
        piece = self.piece(p)
        if piece is None:
            return None
        if self.zero_stage == 0:
            return None if p.grad is None else p.grad.reshape(-1)
        if self.zero_stage == 3:
            from deepspeed.utils import safe_get_local_grad

            return safe_get_local_grad(p)[: piece.numel]
        grad = p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group).reshape(-1)
        if grad.numel() == p.numel() and piece.numel < p.numel():  # a full-size buffer: take our range
            grad = grad.narrow(0, piece.start, piece.numel)
        return grad

    @torch.no_grad()
    def scale_grads(self, factor: float) -> None:
        for _, p in self.named_parameters():
            grad = self.grad(p)
            if grad is None:
                continue
            if self.zero_stage == 3:
                from deepspeed.utils import safe_set_local_grad

                padded = torch.zeros_like(p.ds_tensor, dtype=grad.dtype)
                padded[: grad.numel()] = grad * factor
                safe_set_local_grad(p, padded)
            else:
                grad.mul_(factor)

    @torch.no_grad()
    def zero_grads(self) -> None:
        """Zero this rank's gradients (also non-finite ones, which scaling by 0 would keep)."""
        for _, p in self.named_parameters():
            grad = self.grad(p)
            if grad is None:
                continue
            if self.zero_stage == 3:
                from deepspeed.utils import safe_set_local_grad

                safe_set_local_grad(p, torch.zeros_like(p.ds_tensor, dtype=grad.dtype))
            else:
                grad.zero_()

    # -- weights and optimizer state ----------------------------------------------------------

    def master_weights(self, p: nn.Parameter) -> torch.Tensor | None:
        """The fp32 master copy of this rank's piece of p, flattened (ZeRO-3); the whole
        parameter for ZeRO 0-2, whose weights every rank holds."""
        if self.zero_stage != 3:
            return p.detach().reshape(-1)
        piece = self.piece(p)
        if piece is None:
            return None
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(p)[: piece.numel]

    def optimizer_state(self, p: nn.Parameter, key: str) -> torch.Tensor | None:
        """A view of AdamW's `key` state for this rank's piece of p, flattened."""
        piece = self.piece(p)
        if piece is None:
            return None
        if self.zero_stage == 0:
            return self.client_optimizer.state[p][key].reshape(-1)
        if self.zero_stage == 3:
            from deepspeed.utils import safe_get_local_optimizer_state

            return safe_get_local_optimizer_state(p, key)[: piece.numel]
        mapping = p._hp_mapping
        flat_partition = self._optimized_tensors()[mapping.param_group_index]
        address = mapping.hp_fragment_address
        return self.client_optimizer.state[flat_partition][key].narrow(0, address.start, address.numel)

    @torch.no_grad()
    def load_weights(self, p: nn.Parameter, values: torch.Tensor) -> None:
        """Set p from `values`: the whole flattened parameter (ZeRO 0-2) or this rank's piece (ZeRO-3).
        Both DeepSpeed's working copy and its fp32 master copy are set."""
        if self.zero_stage != 3:
            p.copy_(values.view_as(p))
            if self.zero_stage > 0 and p._hp_mapping is not None:
                address = p._hp_mapping.lp_fragment_address
                p._hp_mapping.hp_fragment.copy_(values.reshape(-1).narrow(0, address.start, address.numel))
            return
        from deepspeed.utils import safe_set_local_fp32_param

        padded = torch.zeros_like(p.ds_tensor)
        padded[: values.numel()] = values
        p.ds_tensor.copy_(padded)
        safe_set_local_fp32_param(p, padded)

    @torch.no_grad()
    def load_optimizer_state(self, p: nn.Parameter, key: str, values: torch.Tensor) -> None:
        if self.zero_stage == 3:
            from deepspeed.utils import safe_set_local_optimizer_state

            padded = torch.zeros_like(p.ds_tensor, dtype=torch.float32)
            padded[: values.numel()] = values
            safe_set_local_optimizer_state(p, padded, key)
            return
        self.optimizer_state(p, key).copy_(values)

    # -- what is held, for parallel/memory.py ----------------------------------------------------

    def partitioned_weights(self) -> list[torch.Tensor]:
        """ZeRO-3's partitions of the weights (`ds_tensor`); under ZeRO 0-2 the parameters hold them."""
        if self.zero_stage != 3:
            return []
        return [p.ds_tensor for _, p in self.named_parameters()]

    def held_gradients(self) -> list[torch.Tensor]:
        """Where DeepSpeed's ZeRO optimizers keep this rank's gradients between backward and step,
        besides `param.grad`."""
        zero_optimizer = self.engine.optimizer
        if self.zero_stage in (1, 2):
            held = list(getattr(zero_optimizer, "averaged_gradients", {}).values())
            held += list(getattr(zero_optimizer, "all_grad_tensors", {}).values())
            held += [p.grad for p in zero_optimizer.single_partition_of_fp32_groups]
            return [g for g in held if g is not None]  # some are lists of tensors
        if self.zero_stage == 3:
            held = [zero_optimizer.grad_partitions_flat_buffer]
            held += [p.grad for p in zero_optimizer.fp32_partitioned_groups_flat]
            return [g for g in held if g is not None]
        return []

    def reduce_buckets(self) -> list[torch.Tensor]:
        """DeepSpeed's gradient-reduction buckets (ZeRO >= 1)."""
        if self.zero_stage == 0:
            return []
        buckets = []
        for bucket in getattr(self.engine.optimizer, "ipg_buckets", {}).values():
            buffer = bucket.buffer
            buckets += buffer if isinstance(buffer, list) else [buffer]
        return [b for b in buckets if b is not None]

    def step_count(self) -> float:
        return float(next(iter(self._step_states()))["step"])

    def set_step_count(self, step: float) -> None:
        for state in self._step_states():
            state["step"].fill_(step)

    def _step_states(self):
        # Through `state`, not `param_groups`: ZeRO-3 empties the groups between its sub-group steps.
        for state in self.client_optimizer.state.values():
            if "step" in state:
                yield state


def partition_zero3(params: list[nn.Parameter], zero3_config: dict) -> None:
    """ZeRO-3 partitioning of `params` in place, now: the conversion DeepSpeed's engine applies to a
    whole model when it starts (`deepspeed.zero.Init(module=...)`: each parameter keeps this rank's
    range in `ds_tensor` and frees the rest), done a few parameters at a time during set-up so that
    no rank ever holds the whole dense model. The engine leaves converted parameters as they are."""
    if not params:
        return
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import is_zero_param

    deepspeed.init_distributed(dist_init_required=False)  # DeepSpeed's view of the existing process group
    holder = nn.Module()
    holder.weights = nn.ParameterList([p for p in params if not is_zero_param(p)])  # the same objects
    deepspeed.zero.Init(module=holder, config_dict_or_path=zero3_config)


def full_shape(p: nn.Parameter) -> torch.Size:
    """The parameter's shape in the model, also when ZeRO-3 has partitioned it (then it is empty here)."""
    return getattr(p, "ds_shape", p.shape)


class StageGroups:
    """DeepSpeed's `mpu` protocol for one pipeline slice (parallel/pipeline.py): the engine of a stage
    reduces and partitions its dense weights over the ranks of that stage only, never across
    stages. No model parallelism inside a stage: its model-parallel group is this rank alone."""

    def __init__(self, dp_group, singleton_group):
        import torch.distributed as dist

        self._dp_group = dp_group
        self._singleton = singleton_group
        self._dp_size = dist.get_world_size(dp_group)
        self._dp_rank = dist.get_rank(dp_group)

    def get_data_parallel_group(self):
        return self._dp_group

    def get_data_parallel_world_size(self) -> int:
        return self._dp_size

    def get_data_parallel_rank(self) -> int:
        return self._dp_rank

    def get_model_parallel_group(self):
        return self._singleton

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


def set_accumulation_boundary(engine, is_boundary: bool) -> None:
    """Tell the engine whether the next backward ends the step's accumulation (a pipeline schedule
    runs every micro-batch's backward before `step`, in an order of its own)."""
    engine.set_gradient_accumulation_boundary(is_boundary)
