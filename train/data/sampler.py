"""Batches from a flat token array.

`BatchSampler` draws each step's training blocks deterministically from (seed, step), split
disjointly over replicas and micro-steps; `val_batches` gives fixed, evenly spaced validation blocks.
"""

from __future__ import annotations

import numpy as np
import torch


def _check_split_length(tokens: np.ndarray, seq_len: int) -> None:
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"data: the split has {len(tokens)} tokens, fewer than one block of seq_len + 1 = "
            f"{seq_len + 1}; use more data, a larger data.val_fraction or a smaller seq_len"
        )


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1; got {value!r}")


def _check_rank(num_replicas: int, rank: int) -> None:
    _check_positive(num_replicas=num_replicas)
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, num_replicas={num_replicas}); got {rank!r}")


def _blocks(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets for blocks starting at `starts` ([rows])."""
    idx = starts[:, None] + np.arange(seq_len + 1)  # [rows, seq_len + 1]
    block = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))  # [rows, seq_len + 1]
    return block[:, :-1].contiguous(), block[:, 1:].contiguous()  # [rows, seq_len] each


class BatchSampler:
    """[micro_batch, seq_len] blocks chosen deterministically from (seed, step).

    The global batch of a step is drawn as a whole (rows = micro_batch * num_replicas * grad_accum);
    replica r, micro-step m takes its own disjoint rows. So the same (seed, step) gives the same
    global batch whatever the number of processes, and a resumed run sees exactly the same batches.
    Rows are ordered (micro_step, rank, row): with one micro-step the replicas' rows together are
    the first micro_batch * num_replicas rows, as one replica with that micro_batch would get.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        micro_batch: int,
        num_replicas: int = 1,
        rank: int = 0,
        grad_accum: int = 1,
        seed: int = 0,
    ):
        _check_positive(seq_len=seq_len, micro_batch=micro_batch, grad_accum=grad_accum)
        _check_rank(num_replicas, rank)
        if seed < 0:
            raise ValueError(f"seed must be >= 0; got {seed!r}")
        _check_split_length(tokens, seq_len)
        self.tokens = tokens
        self.seq_len, self.micro_batch = seq_len, micro_batch
        self.num_replicas, self.rank, self.grad_accum, self.seed = num_replicas, rank, grad_accum, seed

    @property
    def global_rows(self) -> int:
        return self.micro_batch * self.num_replicas * self.grad_accum

    def global_starts(self, step: int) -> np.ndarray:
        """Start offsets of the whole global batch of `step` ([global_rows])."""
        if step < 0:
            raise ValueError(f"step must be >= 0; got {step!r}")
        rng = np.random.Generator(np.random.PCG64([self.seed, step]))
        # A block needs seq_len + 1 tokens, so starts lie in [0, len - seq_len - 1].
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.global_rows)

    def get(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) for this replica at (step, micro_step): LongTensor [micro_batch, seq_len]."""
        if not 0 <= micro_step < self.grad_accum:
            raise ValueError(f"micro_step must be in [0, grad_accum={self.grad_accum}); got {micro_step!r}")
        first = (micro_step * self.num_replicas + self.rank) * self.micro_batch
        starts = self.global_starts(step)[first : first + self.micro_batch]  # [micro_batch]
        return _blocks(self.tokens, starts, self.seq_len)


def val_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, num_batches: int, num_replicas: int = 1, rank: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed validation batches: batch_size * num_replicas * num_batches blocks evenly spaced over the
    split (overlapping if the split is short), the same every call. Batch i of replica r holds global
    rows [(i * num_replicas + r) * batch_size, +batch_size), so replicas get disjoint shares and the
    global set depends only on batch_size * num_replicas. Each batch: LongTensors [batch_size, seq_len]."""
    _check_positive(seq_len=seq_len, batch_size=batch_size, num_batches=num_batches)
    _check_rank(num_replicas, rank)
    _check_split_length(tokens, seq_len)
    total = batch_size * num_replicas * num_batches
    starts = np.linspace(0, len(tokens) - seq_len - 1, total).round().astype(np.int64)  # [total]
    batches = []
    for i in range(num_batches):
        first = (i * num_replicas + rank) * batch_size
        batches.append(_blocks(tokens, starts[first : first + batch_size], seq_len))
    return batches
