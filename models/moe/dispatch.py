"""Single-process token dispatch: group token copies by expert, and the exact reverse.

Shape legend: T tokens, K experts per token, D hidden, E experts, N kept token copies (= T·K
when dropless).

`Dispatcher` is the contract; `LocalDispatcher` its one-rank implementation, and the
expert-parallel `AllToAllDispatcher` in `parallel/dispatcher.py` shares it and the routing plan
below. Both live here, in plain torch, because `models/` must not import `parallel/`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class RoutingPlan:
    """Which token copies go where, decided on the local tokens before any exchange. Built on the
    device without a host sync: how many copies are kept is learnt from the counts a dispatcher
    copies to the host anyway (`keep_first`)."""

    # Indices into the flattened [T·K] assignments: kept copies sorted by expert (stable), then dropped ones.
    order_N: torch.Tensor
    kept_per_expert_E: torch.Tensor  # copies each expert will compute after capacity drops
    routed_per_expert_E: torch.Tensor  # copies the router asked each expert for (the load)
    num_dropped: torch.Tensor  # scalar int64: copies dropped by capacity (0 when dropless)

    def keep_first(self, num_kept: int) -> RoutingPlan:
        """The plan with only the kept copies in `order_N` (`num_kept` = kept_per_expert_E.sum(), a host int)."""
        return dataclasses.replace(self, order_N=self.order_N[:num_kept])


def expert_capacity(num_assignments: int, num_experts: int, capacity_factor: float) -> int:
    """Copies one expert may take per step: ceil(factor · T·K / E), the GShard/Switch rule."""
    return math.ceil(capacity_factor * num_assignments / num_experts)


def count_per_expert(flat_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64 assignments per expert. A scatter-add: `torch.bincount` synchronises a GPU (it
    reads the largest id to size its output)."""
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=flat_ids.device)
    return counts_E.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))


def plan_routing(expert_ids_TK: torch.Tensor, num_experts: int, capacity_factor: float | None) -> RoutingPlan:
    flat_ids = expert_ids_TK.flatten()  # [T·K]
    order_N = torch.argsort(flat_ids, stable=True)  # stable: earlier tokens keep priority
    routed_E = count_per_expert(flat_ids, num_experts)
    if capacity_factor is None:
        return RoutingPlan(order_N, routed_E, routed_E, torch.zeros((), dtype=torch.int64, device=flat_ids.device))

    capacity = expert_capacity(flat_ids.numel(), num_experts, capacity_factor)
    sorted_ids = flat_ids[order_N]
    first_slot_E = torch.cumsum(routed_E, 0) - routed_E
    rank_within_expert = torch.arange(flat_ids.numel(), device=flat_ids.device) - first_slot_E[sorted_ids]
    dropped_N = rank_within_expert >= capacity
    # Dropped copies moved to the end (a stable sort keeps the rest by expert): the kept ones are a
    # prefix, where a boolean mask would synchronise the device to size its result.
    order_N = order_N[torch.argsort(dropped_N.to(torch.uint8), stable=True)]
    kept_E = routed_E.clamp(max=capacity)
    return RoutingPlan(order_N, kept_E, routed_E, dropped_N.sum())


def gather_tokens(x_TD: torch.Tensor, plan: RoutingPlan, top_k: int) -> torch.Tensor:
    """[T, D] tokens -> [N, D] copies grouped by expert (every copy in `plan.order_N`)."""
    return x_TD[plan.order_N // top_k]


def scatter_combine(y_ND: torch.Tensor, weights_TK: torch.Tensor, plan: RoutingPlan, num_tokens: int) -> torch.Tensor:
    """[N, D] expert outputs -> [T, D]: each token's weighted sum over its kept copies, in the
    outputs' dtype. Dropped copies add nothing (the residual stream carries the token on)."""
    top_k = weights_TK.shape[-1]
    weights_N = weights_TK.flatten()[plan.order_N].to(y_ND.dtype)
    out_TD = y_ND.new_zeros(num_tokens, y_ND.shape[-1])
    return out_TD.index_add(0, plan.order_N // top_k, y_ND * weights_N[:, None])


@dataclass
class DispatchState:
    """What `combine` needs to undo `dispatch`, plus the step's counters."""

    plan: RoutingPlan
    num_tokens: int
    bytes_sent: int = 0  # bytes this rank sent to other ranks: tokens in dispatch, results in combine
    comm_seconds: float = 0.0  # wall time of the forward all-to-alls (dispatch + combine)
    # Rows per local expert (dispatch's counts) on the host, where dispatch copied them there anyway
    # (the split sizes, the kept count); None where it did not: for kernels that read sizes on the host.
    host_counts_E: torch.Tensor | None = None


class Dispatcher(Protocol):
    """Moves token copies to the experts that compute them and the results back.

    dispatch: x_TD [T, D] and the router's expert_ids_TK [T, K] -> (x_ND [N, D] copies grouped by
        local expert, counts [E_local] rows per local expert, a state for combine)
    combine: y_ND [N, D] expert outputs (same rows), weights_TK [T, K], that state -> out_TD [T, D],
        each token's weighted sum over its kept copies
    """

    num_experts: int
    top_k: int
    capacity_factor: float | None

    def dispatch(
        self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchState]: ...

    def combine(self, y_ND: torch.Tensor, weights_TK: torch.Tensor, state: DispatchState) -> torch.Tensor: ...


class LocalDispatcher:
    """All experts on this process: dispatch is a sort, combine a weighted scatter-add."""

    def __init__(self, num_experts: int, top_k: int, capacity_factor: float | None):
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor

    def dispatch(
        self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        plan = plan_routing(expert_ids_TK, self.num_experts, self.capacity_factor)
        host_counts_E = None
        if self.capacity_factor is not None:  # dropless keeps all T·K copies; with drops, one host copy says how many
            host_counts_E = plan.kept_per_expert_E.cpu()
            plan = plan.keep_first(int(host_counts_E.sum()))
        state = DispatchState(plan, x_TD.shape[0], host_counts_E=host_counts_E)
        return gather_tokens(x_TD, plan, self.top_k), plan.kept_per_expert_E, state

    def combine(self, y_ND: torch.Tensor, weights_TK: torch.Tensor, state: DispatchState) -> torch.Tensor:
        return scatter_combine(y_ND, weights_TK, state.plan, state.num_tokens)
