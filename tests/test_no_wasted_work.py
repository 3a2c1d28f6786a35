"""No wasted work in a training step: DeepSpeed neither times (its throughput timer synchronises the
device) nor computes its own gradient norm at any ZeRO stage (ours is parallel/grad_norm.py)."""

import traceback

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from models.gpt import GPT
from parallel.dims import init_parallel
from parallel.parallelize import parallelize
from tests.test_balance import global_batch, tiny_job


def one_step(zero_stage: int, grad_accum: int = 2):
    """A single-process trainer taking one optimizer step of `grad_accum` micro-batches."""
    job = tiny_job(micro_batch=2, grad_accum=grad_accum, zero_stage=zero_stage)
    dims = init_parallel(ep=1, num_experts=job.moe.num_experts, device=torch.device("cpu"))
    with torch.device("meta"):
        model = GPT(job.gpt_config())
    trainer = parallelize(model, dims, job)
    idx = global_batch()
    return trainer, lambda: [step_micro_batch(trainer, idx[2 * m : 2 * m + 2]) for m in range(grad_accum)]


def step_micro_batch(trainer, idx_BS):
    logits, _ = trainer.forward(idx_BS[:, :-1])
    trainer.backward(F.cross_entropy(logits.flatten(0, 1), idx_BS[:, 1:].flatten()))
    return trainer.step(lr=1e-3)


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_a_step_never_synchronises_the_device_for_deepspeed(monkeypatch, zero_stage):
    from deepspeed.accelerator import get_accelerator

    trainer, step = one_step(zero_stage)
    accelerator = get_accelerator()
    calls = []
    original = accelerator.synchronize
    monkeypatch.setattr(accelerator, "synchronize", lambda *a, **k: calls.append(1) or original(*a, **k))
    norms = [step() for _ in range(3)]  # the throughput timer starts measuring after 2 steps
    assert calls == []
    assert norms[-1][-1] is not None and torch.isfinite(torch.tensor(norms[-1][-1]))
    # The check can fail: DeepSpeed's default timer config synchronises.
    assert trainer.engine.tput_timer.config.enabled is False


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_deepspeed_computes_no_gradient_norm_of_its_own(monkeypatch, zero_stage):
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    trainer, step = one_step(zero_stage)
    assert isinstance(trainer.engine.optimizer, DeepSpeedZeroOptimizer)
    calls = []
    for name in ("scaled_global_norm", "get_grad_norm_direct"):
        original = getattr(DeepSpeedZeroOptimizer, name)
        monkeypatch.setattr(
            DeepSpeedZeroOptimizer,
            name,
            lambda self, *a, _original=original, **k: calls.append(1) or _original(self, *a, **k),
        )
    before = [p.detach().clone() for p in trainer.module.parameters()]
    norms = step()
    assert calls == []
    assert norms[-1] is not None and norms[-1] > 0  # ours still is
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.module.parameters()))  # and the step applied


aten = torch.ops.aten
NORM_OPS = {aten.linalg_vector_norm, aten.norm, aten.linalg_norm, aten._foreach_norm, aten.frobenius_norm}
DEEPSPEED_NORM_METHODS = (
    "get_grad_norm_direct",
    "scaled_global_norm",
    "complete_grad_norm_calculation_for_cpu_offload",
)


class DeepSpeedNorms(TorchDispatchMode):
    """Records every norm computed by DeepSpeed's code: a norm op with a DeepSpeed frame on the stack
    (ours, parallel/grad_norm.py, sums squares), and every call of a ZeRO optimizer's norm method.
    Not counted: `combine_grad_norm_groups`, which ZeRO-3's step still calls on the per-group norms
    `skip_zero3_grad_norm` reports (a host vector of zeros, one per group); a real ZeRO-3 norm would
    first be computed by `get_grad_norm_direct`, which is counted."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in NORM_OPS:
            stack = traceback.extract_stack()
            frames = [f"{f.filename}:{f.lineno}" for f in stack if "/deepspeed/" in f.filename]
            if frames and not any(f.name == "combine_grad_norm_groups" for f in stack):
                self.calls.append(f"{func} at {frames[-1]}")
        return func(*args, **(kwargs or {}))

    def wrap_methods(self, optimizer) -> None:
        for name in DEEPSPEED_NORM_METHODS:
            method = getattr(optimizer, name, None)
            if method is not None:
                setattr(optimizer, name, lambda *a, _m=method, _n=name, **k: self.calls.append(_n) or _m(*a, **k))


def _deepspeed_norm_worker(rank, world_size, zero_stage):
    dims = init_parallel(ep=1, num_experts=4, device=torch.device("cpu"))  # experts FSDP-sharded at ZeRO >= 1
    job = tiny_job(micro_batch=2, grad_accum=2, zero_stage=zero_stage)
    with torch.device("meta"):
        model = GPT(job.gpt_config())
    trainer = parallelize(model, dims, job)
    norms = DeepSpeedNorms()
    norms.wrap_methods(trainer.engine.optimizer)
    idx = global_batch()[4 * rank : 4 * rank + 4]
    before = [p.detach().clone() for p in trainer.module.parameters()]
    with norms:
        ours = [step_micro_batch(trainer, idx[2 * m : 2 * m + 2]) for _ in range(2) for m in range(2)]
    assert norms.calls == [], f"ZeRO-{zero_stage}: DeepSpeed computed a gradient norm: {norms.calls}"
    assert ours[1] is not None and ours[1] > 0 and ours[3] is not None and ours[3] > 0  # ours still is
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.module.parameters()))  # and the steps applied


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_deepspeed_computes_no_gradient_norm_at_any_stage(zero_stage):
    """2 ranks over gloo, 2 steps of 2 micro-batches: not one norm by DeepSpeed (ZeRO-1/2: the config's
    `compute_grad_norm: false`; ZeRO-3: parallel/deepspeed_state.py's `skip_zero3_grad_norm`)."""
    from tests.ranks import run_ranks

    run_ranks(2, _deepspeed_norm_worker, zero_stage)


def test_the_norm_recorder_sees_deepspeed_norms():
    """The recorder above can fail: DeepSpeed's own norm helper, called as DeepSpeed calls it."""
    from deepspeed.runtime.utils import get_global_norm_of_tensors

    norms = DeepSpeedNorms()
    with norms:
        torch.arange(4.0).square().sum()  # ours: not a norm op
        get_global_norm_of_tensors([torch.arange(4.0)])
    assert len(norms.calls) >= 1 and all("deepspeed" in call for call in norms.calls), norms.calls


ROWS, ACCUM = 16, 4  # a global batch of 16 sequences: 4 ranks x 4 micro-batches of 1


def counting_on(group, collective, calls: list):
    def counted(*args, **kwargs):
        if kwargs.get("group") is group:
            calls.append(1)
        return collective(*args, **kwargs)

    return counted


def _expert_sync_worker(rank, world_size):
    import torch.distributed as dist

    from models.moe.balance import router_losses
    from tests.test_balance import assert_pieces_match

    dims = init_parallel(ep=2, num_experts=4, device=torch.device("cpu"))
    job = tiny_job(micro_batch=1, grad_accum=ACCUM, zero_stage=2)
    job.optim.grad_clip = 0.0  # the gradients as reduced, unclipped
    with torch.device("meta"):
        model = GPT(job.gpt_config())
    trainer = parallelize(model, dims, job)
    assert trainer.experts_sharded
    torch.manual_seed(7)
    idx = torch.randint(0, 64, (ROWS, 17))
    rows = [slice(r, r + 1) for r in range(rank * ACCUM, (rank + 1) * ACCUM)]
    with torch.no_grad():  # the step's expert counts (global_batch balance loss)
        counts = sum(torch.stack([s.selected_BE.sum(0) for s in trainer.forward(idx[r, :-1])[1]]) for r in rows)
    dist.all_reduce(counts)

    # FSDP2 reduce-scatters with reduce_scatter_single (torch 2.13) or reduce_scatter_tensor (2.11).
    expert_reductions, grads, originals = [], {}, {}
    for name in ("reduce_scatter_tensor", "reduce_scatter_single"):
        if hasattr(dist, name):
            originals[name] = getattr(dist, name)
            setattr(dist, name, counting_on(dims.edp_group, originals[name], expert_reductions))
    optimizer_step = trainer.expert_optimizer.step

    def capture_then_step(*args, **kwargs):
        grads.update({name: p.grad.to_local().clone() for name, p in trainer.named_expert_parameters})
        return optimizer_step(*args, **kwargs)

    trainer.expert_optimizer.step = capture_then_step
    try:
        for r in rows:
            logits, stats = trainer.forward(idx[r, :-1])
            losses = router_losses(stats, job.moe.aux_loss_coef, job.moe.z_loss_coef, "global_batch", counts)
            trainer.backward(F.cross_entropy(logits.flatten(0, 1), idx[r, 1:].flatten()) + losses.total)
            trainer.step(lr=1e-3)
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    # One reduce-scatter per expert module per optimizer step, not one per micro-batch.
    assert len(expert_reductions) == len(trainer.experts), expert_reductions

    # The gradients equal one process's taking all 16 sequences at once (balanced over all of them).
    single = tiny_job(micro_batch=ROWS, grad_accum=1, zero_stage=0)
    with torch.device("meta"):
        whole = GPT(single.gpt_config())
    from parallel.parallelize import materialize

    materialize(whole, torch.device("cpu"), single.train.seed)
    logits, stats = whole(idx[:, :-1])
    losses = router_losses(stats, single.moe.aux_loss_coef, single.moe.z_loss_coef, "micro_batch")
    (F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()) + losses.total).backward()
    want = {name: p.grad for name, p in whole.named_parameters()}
    pieces = {
        name: ("experts", trainer.experts[name.rsplit(".", 1)[0]].first_expert, grad, True)
        for name, grad in grads.items()
    }
    assert_pieces_match(pieces, want, dims)


def test_expert_gradients_are_reduced_once_per_step_and_equal_one_process():
    from tests.ranks import run_ranks

    run_ranks(4, _expert_sync_worker)
