"""Token dispatchers: `LocalDispatcher` (all experts on this rank) and `AllToAllDispatcher`
(experts split over the ranks of an expert-parallel group). Both follow the `Dispatcher` protocol
(models/moe/dispatch.py).

Shape legend: T tokens, D hidden, K experts per token, E experts, L = E / ep local experts,
P peers in the EP group, N copies this rank sends, M copies it receives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from models.moe.dispatch import Dispatcher, DispatchState, LocalDispatcher, gather_tokens, plan_routing, scatter_combine
from parallel.all_to_all import all_to_all, all_to_all_async

__all__ = ["AllToAllDispatcher", "AllToAllState", "Dispatcher", "LocalDispatcher"]


@dataclass
class AllToAllState(DispatchState):
    """What combine needs to send the results back the way the tokens came."""

    send_splits_P: list[int] | None = None  # copies this rank sent to each peer in dispatch
    recv_splits_P: list[int] | None = None  # copies it received from each peer (returned in combine)
    regroup_M: torch.Tensor | None = None  # [M] received rows, (peer, local expert) order -> local-expert order


def peer_major_to_expert_major(counts_PL: torch.Tensor) -> torch.Tensor:
    """Row permutation that turns received rows, ordered (peer, local expert), into
    (local expert, peer) order, so each local expert's rows are contiguous for the grouped GEMM."""
    num_peers, num_local = counts_PL.shape
    sizes = counts_PL.flatten()  # chunk (p, l) has sizes[p * L + l] rows
    starts = torch.cumsum(sizes, 0) - sizes
    wanted = torch.arange(num_peers * num_local).view(num_peers, num_local).t().flatten()  # (l, p) order
    wanted_sizes, wanted_starts = sizes[wanted], starts[wanted]
    new_starts = torch.cumsum(wanted_sizes, 0) - wanted_sizes
    total = int(sizes.sum())
    return torch.repeat_interleave(wanted_starts - new_starts, wanted_sizes, output_size=total) + torch.arange(total)


def remote_rows(splits_P: list[int], own_rank: int) -> int:
    return sum(splits_P) - splits_P[own_rank]


class AllToAllDispatcher:
    def __init__(self, num_experts: int, top_k: int, capacity_factor: float | None, group, ep: int, ep_rank: int):
        assert num_experts % ep == 0, (num_experts, ep)
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ep
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.group = group
        self.ep = ep
        self.ep_rank = ep_rank

    def dispatch(
        self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, AllToAllState]:
        plan = plan_routing(expert_ids_TK, self.num_experts, self.capacity_factor)
        # Experts are laid out peer by peer: peer p holds experts [p·L, (p+1)·L).
        send_counts_PL = plan.kept_per_expert_E.view(self.ep, self.num_local_experts)
        recv_counts, counts_work = all_to_all_async(send_counts_PL.flatten(), self.group)
        # Every copy, sorted by expert (= grouped by destination peer), gathered while the counts
        # travel; the kept ones are its first rows.
        x_all_ND = gather_tokens(x_TD, plan, self.top_k)
        started = time.perf_counter()
        counts_work.wait()
        recv_counts_PL = recv_counts.view(self.ep, self.num_local_experts)
        # The layer's one device->host copy: the split sizes of both exchanges and the regrouping
        # all derive from these counts on the host.
        send_PL, recv_PL = torch.stack([send_counts_PL, recv_counts_PL]).cpu()
        send_splits, recv_splits = send_PL.sum(1).tolist(), recv_PL.sum(1).tolist()
        plan = plan.keep_first(sum(send_splits))
        # Received in (peer, local expert) order.
        x_MD = all_to_all(x_all_ND[: sum(send_splits)], recv_splits, send_splits, self.group)
        regroup_M = peer_major_to_expert_major(recv_PL).to(x_MD.device, non_blocking=True)
        state = AllToAllState(
            plan,
            x_TD.shape[0],
            bytes_sent=remote_rows(send_splits, self.ep_rank) * x_TD.shape[-1] * x_TD.element_size(),
            comm_seconds=_wall_seconds(started, x_TD),
            send_splits_P=send_splits,
            recv_splits_P=recv_splits,
            regroup_M=regroup_M,
            host_counts_E=recv_PL.sum(0),  # rows per local expert, from the same host copy
        )
        return x_MD[regroup_M], recv_counts_PL.sum(0), state

    def combine(self, y_MD: torch.Tensor, weights_TK: torch.Tensor, state: AllToAllState) -> torch.Tensor:
        undo_M = torch.empty_like(state.regroup_M)
        undo_M[state.regroup_M] = torch.arange(state.regroup_M.numel(), device=state.regroup_M.device)
        started = time.perf_counter()
        # Back in send order: what came from peer p returns to p.
        y_ND = all_to_all(y_MD[undo_M], state.send_splits_P, state.recv_splits_P, self.group)
        state.comm_seconds += _wall_seconds(started, y_MD)
        state.bytes_sent += remote_rows(state.recv_splits_P, self.ep_rank) * y_MD.shape[-1] * y_MD.element_size()
        return scatter_combine(y_ND, weights_TK, state.plan, state.num_tokens)


def _wall_seconds(started: float, like: torch.Tensor) -> float:
    """Time since `started`. gloo exchanges are synchronous, so on CPU this is their cost; on CUDA
    (asynchronous NCCL) a host clock would only see the launch, so it is not measured there."""
    return 0.0 if like.is_cuda else time.perf_counter() - started
