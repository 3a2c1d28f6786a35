"""The host-sync budget of one training step (README: "Host syncs"), counted on CPU.

tests/sync_counter.py counts what would synchronise a GPU (`.item()`, `.tolist()`, `.cpu()` of a
device tensor, boolean masks, `nonzero`, ...). The budget: at most one device->host copy per MoE
layer per forward (the all-to-all's split sizes; none for one rank without capacity), plus a
fixed number per step that does not grow with layers, experts or grad_accum, at every ZeRO stage;
ZeRO-3 adds DeepSpeed's one-off checks of its recorded module order in the run's first forwards.
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


def zero3_trace_checks(forwards: int) -> int:
    """ZeRO-3's one-off syncs: DeepSpeed records the order in which modules fetch their parameters
    (zero/partitioned_param_coordinator.py, `reset_step` at the start of a forward) and checks that
    every rank recorded the same (`assert_ints_same_as_other_ranks`: a broadcast, then 2 host reads).
    The second forward checks the module order, the third the module and parameter orders and the
    parameters' step ids; from then on the trace is complete and nothing is checked."""
    return (2 if forwards >= 2 else 0) + (6 if forwards >= 3 else 0)


def per_layer_forward(nproc: int, capacity_factor) -> int:
    """Syncs per MoE layer per forward: the all-to-all's split sizes; on one rank, the kept count
    when capacity can drop copies."""
    return 1 if nproc > 1 or capacity_factor is not None else 0


CASES = [  # (ranks, n_layers, num_experts, grad_accum, capacity_factor, zero_stage)
    (1, 2, 4, 1, None, 0),
    (1, 3, 8, 3, None, 0),
    (1, 2, 4, 2, 1.25, 0),
    (2, 2, 4, 1, None, 0),
    (2, 3, 8, 2, None, 0),
    (2, 2, 4, 2, None, 1),
    (2, 3, 8, 1, None, 2),
    (1, 2, 4, 1, None, 3),
    (2, 3, 8, 2, None, 3),
]


@pytest.mark.parametrize(
    "nproc,n_layers,num_experts,grad_accum,capacity_factor,zero_stage",
    CASES,
    ids=[f"ranks{c[0]}-L{c[1]}-E{c[2]}-ga{c[3]}-cf{c[4]}-zero{c[5]}" for c in CASES],
)
def test_training_step_syncs_within_the_budget(
    tmp_path, data_cache, nproc, n_layers, num_experts, grad_accum, capacity_factor, zero_stage
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
        f"deepspeed.zero_stage={zero_stage}",
    ]
    if capacity_factor is not None:
        overrides.append(f"moe.capacity_factor={capacity_factor}")
    done = run_job(
        tmp_path, data_cache, *overrides, nproc=nproc, extra_env=fault_env(SWITCHYARD_TEST_COUNT_SYNCS=str(out))
    )
    assert done.returncode == 0, done.stderr[-3000:]
    per_step = grad_accum * n_layers * per_layer_forward(nproc, capacity_factor) + FIXED_PER_STEP[nproc]
    once = zero3_trace_checks(STEPS * grad_accum) if zero_stage == 3 else 0
    for rank in range(nproc):
        record = json.loads((out / f"rank{rank}.json").read_text())
        assert record["steps"] == STEPS
        events = "\n".join(f"{what} at {where}" for what, where in record["events"])
        want = f"{STEPS} x {per_step} + {once}"
        assert len(record["events"]) == STEPS * per_step + once, f"rank {rank}: want {want}, counted:\n{events}"


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


def test_counter_reads_deepspeed_moves_to_its_device_as_moves_not_host_copies():
    """DeepSpeed's CPU accelerator names the device `cpu`; while counting it names `cpu:0`, so its
    buffers and moves are on the device (as `cuda:0` on a GPU) and its host reads still count."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    counter = SyncCounter()
    device_t = torch.arange(4.0)
    counter.mark(device_t)
    with counter.counting():
        assert accelerator.current_device_name() == accelerator.device_name() == str(COMPUTE_DEVICE)
        moved = device_t.to(accelerator.current_device_name())  # a device tensor stays: no copy, no sync
        assert moved.data_ptr() == device_t.data_ptr()
        buffer = torch.zeros(4, device=accelerator.device_name())  # a buffer on the device
        buffer.copy_(moved)
        uploaded = torch.tensor([1.0, 2.0]).to(accelerator.device_name())  # host -> device: not a sync
        uploaded.sum().item()  # ...but reading it back is one
        buffer.cpu()  # and so is a copy to the host
        torch.tensor(0.5).item()  # a host scalar: not one
    assert [what for what, _ in counter.events] == ["aten._local_scalar_dense.default", "device->host copy"]
    assert accelerator.current_device_name() == "cpu"  # restored


# -- moe.backend=megablocks: the dispatcher's host copy of the counts feeds its grouped GEMM ------------


def stub_megablocks(monkeypatch) -> list[list[int]]:
    """`megablocks.grouped_gemm_util` with a per-expert-loop `gmm` (MegaBlocks needs CUDA; this runs on
    CPU in fp32): like gmm it insists on int64 group sizes on the host. Returns the sizes it was given."""
    import sys
    import types

    given = []

    def gmm(a_ND, b_EDF, batch_sizes_E, trans_b=False):
        assert batch_sizes_E.device == torch.device("cpu") and batch_sizes_E.dtype == torch.int64  # the host
        sizes = batch_sizes_E.tolist()
        given.append(sizes)
        rows = [x @ (w.t() if trans_b else w) for x, w in zip(a_ND.split(sizes), b_EDF)]
        return torch.cat(rows) if rows else a_ND.new_zeros(0, b_EDF.shape[-1])

    grouped_gemm_util = types.ModuleType("megablocks.grouped_gemm_util")
    grouped_gemm_util.ops = types.SimpleNamespace(gmm=gmm)
    grouped_gemm_util.assert_grouped_gemm_is_available = lambda: None
    package = types.ModuleType("megablocks")
    package.grouped_gemm_util = grouped_gemm_util
    monkeypatch.setitem(sys.modules, "megablocks", package)
    monkeypatch.setitem(sys.modules, "megablocks.grouped_gemm_util", grouped_gemm_util)
    monkeypatch.setattr("models.moe.megablocks_experts.require_cuda_bf16", lambda tensors: None)  # fp32 on CPU
    return given


def count_layer_syncs(layer: MoELayer, x_BSD: torch.Tensor):
    """The syncs of one forward and backward of `layer`, its output and its input's gradient."""
    x = x_BSD.clone().requires_grad_()
    counter = SyncCounter()
    counter.mark([*layer.parameters(), *layer.buffers(), x])
    with counter.counting():
        out, stats = layer(x)
        (out.square().sum() + stats.z_loss).backward()
    return counter.events, out.detach(), x.grad


def megablocks_twin(layer: MoELayer) -> MoELayer:
    import copy

    twin = copy.deepcopy(layer, memo={id(layer.dispatcher): layer.dispatcher})  # shared: it holds a process group
    twin.experts.backend = "megablocks"
    return twin


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_megablocks_backend_reuses_the_dispatchers_host_counts(monkeypatch, capacity_factor):
    """One rank: with capacity the dispatcher copied the kept counts to the host, and the backend
    adds nothing to that one copy; dropless, nothing else needs them on the host, and the backend's
    own copy is the layer's one."""
    given = stub_megablocks(monkeypatch)
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden=32, capacity_factor=capacity_factor)
    layer = MoELayer(16, "swiglu", cfg)
    layer.reset_parameters(0.2, 2)
    x = torch.randn(2, 8, 16)
    torch_events, torch_out, torch_grad = count_layer_syncs(layer, x)
    events, out, grad = count_layer_syncs(megablocks_twin(layer), x)
    assert len(events) == 1, events
    assert len(torch_events) == (0 if capacity_factor is None else 1), torch_events
    torch.testing.assert_close(out, torch_out)
    torch.testing.assert_close(grad, torch_grad)
    assert len(given) == 3 and sum(given[0]) == 2 * 8 * 2 - int(layer(x)[1].num_dropped)  # w1, w3, w2


def _megablocks_ep_worker(rank, world_size):
    from parallel.dims import init_parallel
    from parallel.expert_parallel import shard_moe_layer

    monkeypatch = pytest.MonkeyPatch()
    given = stub_megablocks(monkeypatch)
    dims = init_parallel(ep=2, num_experts=4, device=torch.device("cpu"))
    for capacity_factor in (None, 1.0):
        torch.manual_seed(0)  # the same layer on both ranks
        cfg = MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden=32, capacity_factor=capacity_factor)
        layer = MoELayer(16, "swiglu", cfg)
        layer.reset_parameters(0.2, 2)
        shard_moe_layer(layer, dims)
        x = torch.randn(2, 8 + 4 * rank, 16, generator=torch.Generator().manual_seed(rank))
        torch_events, torch_out, torch_grad = count_layer_syncs(layer, x)
        events, out, grad = count_layer_syncs(megablocks_twin(layer), x)
        # The all-to-all's one copy of the counts, for either backend: gmm's sizes come from it.
        assert len(torch_events) == 1, torch_events
        assert len(events) == 1, events
        torch.testing.assert_close(out, torch_out)
        torch.testing.assert_close(grad, torch_grad)
    assert len(given) == 2 * 3
    monkeypatch.undo()


def test_megablocks_backend_adds_no_sync_under_expert_parallelism():
    from tests.ranks import run_ranks

    run_ranks(2, _megablocks_ep_worker)
