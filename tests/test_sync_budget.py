"""The host-sync budget of one training step (README: "Host syncs"), counted on CPU.

tests/sync_counter.py counts what would synchronise a GPU (`.item()`, `.tolist()`, `.cpu()` of a
device tensor, boolean masks, `nonzero`, ...). The budget: at most one device->host copy per MoE
layer per forward (the all-to-all's split sizes; none for one rank without capacity), plus a
fixed number per step that does not grow with layers, experts or grad_accum.
"""

import json

import pytest
import torch

from models.config import MoEConfig
from models.moe.layer import MoELayer
from tests.jobs import TINY, fault_env, run_job
from tests.sync_counter import COMPUTE_DEVICE, SyncCounter

# Per step: the step's one look at its losses (finite? cross-entropy) + the global gradient norm +
# the log window's figures (log_interval=1 here), + on several ranks the mean loss over ranks.
FIXED_PER_STEP = {1: 3, 2: 4}
STEPS = 2


def per_layer_forward(nproc: int, capacity_factor) -> int:
    """Syncs per MoE layer per forward: the all-to-all's split sizes; on one rank, the kept count
    when capacity can drop copies."""
    return 1 if nproc > 1 or capacity_factor is not None else 0


CASES = [  # (ranks, n_layers, num_experts, grad_accum, capacity_factor)
    (1, 2, 4, 1, None),
    (1, 3, 8, 3, None),
    (1, 2, 4, 2, 1.25),
    (2, 2, 4, 1, None),
    (2, 3, 8, 2, None),
]


@pytest.mark.parametrize(
    "nproc,n_layers,num_experts,grad_accum,capacity_factor",
    CASES,
    ids=[f"ranks{c[0]}-L{c[1]}-E{c[2]}-ga{c[3]}-cf{c[4]}" for c in CASES],
)
def test_training_step_syncs_within_the_budget(
    tmp_path, data_cache, nproc, n_layers, num_experts, grad_accum, capacity_factor
):
    out = tmp_path / "syncs"
    out.mkdir()
    overrides = [
        *TINY,
        f"train.steps={STEPS}",
        "train.eval_interval=100",
        "logging.sample_tokens=0",
        "run_name=syncs",
        f"model.n_layers={n_layers}",
        f"moe.num_experts={num_experts}",
        f"train.grad_accum={grad_accum}",
        f"parallel.ep={nproc}",
        "moe.aux_loss_scope=micro_batch",
    ]
    if capacity_factor is not None:
        overrides.append(f"moe.capacity_factor={capacity_factor}")
    done = run_job(
        tmp_path, data_cache, *overrides, nproc=nproc, extra_env=fault_env(SWITCHYARD_TEST_COUNT_SYNCS=str(out))
    )
    assert done.returncode == 0, done.stderr[-3000:]
    per_step = grad_accum * n_layers * per_layer_forward(nproc, capacity_factor) + FIXED_PER_STEP[nproc]
    for rank in range(nproc):
        record = json.loads((out / f"rank{rank}.json").read_text())
        assert record["steps"] == STEPS
        events = "\n".join(f"{what} at {where}" for what, where in record["events"])
        assert len(record["events"]) == STEPS * per_step, f"rank {rank}: want {STEPS} x {per_step}, counted:\n{events}"


# -- the counter itself --------------------------------------------------------------------------------


def test_counter_sees_what_would_sync_a_gpu():
    counter = SyncCounter()
    device_t = torch.arange(6.0)
    host_t = torch.arange(3.0)
    step_counter = torch.tensor(4.0)  # like AdamW's: stays on the host on a GPU
    counter.mark(device_t)
    with counter.counting():
        float(step_counter)
        host_t.tolist()
        host_t.cpu()
        y = device_t * 2  # stays on the device: not a sync
        y[y > 3]  # boolean mask
        y.nonzero()
        y.sum().item()
        y.tolist()
        moved = y.cpu()
        moved.tolist()  # already on the host
        int(moved[0])
        y.to(torch.float64)  # a cast on the device
        y.to("cpu", torch.float64)
        y.to(y.device)  # .device reads as the compute device while counting
        torch.repeat_interleave(y.long(), y.long())  # its output size is data-dependent
        torch.repeat_interleave(y.long(), y.long(), output_size=30)
    assert [what for what, _ in counter.events] == [
        "aten.index.Tensor",
        "aten.nonzero.default",
        "aten._local_scalar_dense.default",
        "Tensor.tolist",
        "device->host copy",
        "device->host copy",
        "aten.repeat_interleave.Tensor",
    ]
    assert "device" not in torch.Tensor.__dict__  # restored


@pytest.mark.parametrize("capacity_factor,want", [(None, 0), (1.0, 1)])
def test_moe_layer_forward_and_backward_sync_at_most_once(capacity_factor, want):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden=32, capacity_factor=capacity_factor)
    layer = MoELayer(16, "swiglu", cfg)
    layer.reset_parameters(0.2, 2)
    x = torch.randn(2, 8, 16, requires_grad=True)
    counter = SyncCounter()
    counter.mark([*layer.parameters(), *layer.buffers(), x])
    with counter.counting():
        out, stats = layer(x)
        (out.sum() + stats.z_loss).backward()
    assert len(counter.events) == want, counter.events

    # ...and a new host read in the model is caught.
    original = layer.router.forward
    layer.router.forward = lambda x_TD: (original(x_TD), int(x_TD.argmax()))[0]
    counter = SyncCounter()
    counter.mark([*layer.parameters(), *layer.buffers(), x])
    with counter.counting():
        layer(x)
    assert len(counter.events) == want + 1, counter.events
    assert COMPUTE_DEVICE.type == "cpu" and COMPUTE_DEVICE.index == 0
