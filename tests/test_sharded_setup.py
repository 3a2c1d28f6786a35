"""At scale no rank materialises weights it will not keep: under ZeRO-3 each of 4 ranks (ep=2, so
experts sharded over EDP groups of 2) holds at most its share of the dense weights, its shards of
its experts and one initialisation unit while setting up, far below the whole dense model, and
still starts from exactly the single-process initial weights."""

import torch
from torch import nn

from models.gpt import GPT
from models.moe.experts import GroupedExperts
from parallel.dims import init_parallel
from parallel.expert_parallel import apply_expert_parallel
from parallel.memory import profiled_allocation_peak
from parallel.parallelize import materialize, materialize_expert_shards
from parallel.zero import EXPERT_SHARD_DIM, deepspeed_config, detach_experts, local_tensor, shard_experts
from tests.ranks import run_ranks
from train.config import JobConfig

WORLD, EP = 4, 2


def wide_dense_job() -> JobConfig:
    """Dense weights of 11.1M (44.5 MB fp32) in 24 blocks; the largest single initialisation unit (a
    dense feed-forward, 0.4M) is a small part of it."""
    job = JobConfig()
    job.model.vocab_size, job.model.max_seq_len, job.model.n_layers = 256, 16, 24
    job.model.d_model, job.model.n_heads, job.model.ffn_hidden = 256, 4, 512
    job.moe.num_experts, job.moe.expert_ffn_hidden, job.moe.every = 4, 32, 2
    job.deepspeed.zero_stage = 3
    return job


def dense_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    experts = {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    return {name: p for name, p in model.named_parameters() if id(p) not in experts}


def nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def build(job, dims) -> GPT:
    with torch.device("meta"):
        model = GPT(job.gpt_config())
    apply_expert_parallel(model, dims)
    return model


def _setup_worker(rank, world_size):
    import deepspeed

    job = wide_dense_job()
    dims = init_parallel(ep=EP, num_experts=job.moe.num_experts, device=torch.device("cpu"))
    config = deepspeed_config(3, job.train.micro_batch, job.train.grad_accum, dims.world_size, job.model.d_model)
    model = build(job, dims)
    dense = dense_parameters(model)
    dense_bytes = nbytes(dense.values())
    largest_unit = max(
        nbytes(p for p in unit.parameters() if any(p is d for d in dense.values())) for unit, _ in model.init_units()
    )
    local_expert_bytes = nbytes(p for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters())
    assert largest_unit < dense_bytes / 25

    def set_up():  # parallelize's steps 1, 2 and 4: the weights this rank keeps, initialised
        materialize(model, dims.device, job.train.seed, zero3_config=config, experts_stay_meta=True)
        experts.update(detach_experts(model))
        assert shard_experts(experts, dims, zero_stage=3)
        materialize_expert_shards(experts, dims)

    experts = {}
    peak = profiled_allocation_peak(set_up)
    # This rank's quarter of the dense weights, half of its experts (its EDP shard), and room for the
    # unit being initialised and for what DeepSpeed allocates while it broadcasts and partitions
    # (measured on 16 blocks: about 1 MB of transient copies, 1.6 MB it keeps besides the partitions).
    budget = dense_bytes / WORLD + local_expert_bytes / 2 + 4 * largest_unit
    print(f"rank {rank}: set-up peak {peak} bytes, budget {budget:.0f}, whole dense model {dense_bytes}", flush=True)
    assert peak <= budget, (peak, budget, dense_bytes)
    assert peak < dense_bytes / 2, (peak, dense_bytes)

    # The control: materialising the whole model first, as before, takes at least all of it.
    whole_first = build(job, dims)
    assert profiled_allocation_peak(lambda: materialize(whole_first, dims.device, job.train.seed)) >= dense_bytes

    # The same initial model as one process's: every dense weight (gathered) and the local experts.
    with torch.device("meta"):
        single = GPT(job.gpt_config())
    materialize(single, torch.device("cpu"), job.train.seed)
    want = dict(single.named_parameters())
    for name, p in model.named_parameters():
        if name in dense:
            assert p.numel() == 0 or p.numel() < want[name].numel()  # partitioned, not whole
            with deepspeed.zero.GatheredParameters([p]):
                torch.testing.assert_close(p.data, want[name].data, rtol=0, atol=0, msg=name)
    for prefix, module in experts.items():  # this rank's FSDP shard of its experts of the whole layer
        for name, p in module.named_parameters():
            whole = want[f"{prefix}.{name}"][module.first_expert : module.first_expert + module.num_experts]
            shard = whole.chunk(dims.edp, dim=EXPERT_SHARD_DIM)[dims.edp_rank]
            torch.testing.assert_close(local_tensor(p), shard, rtol=0, atol=0, msg=f"{prefix}.{name}")


def test_zero3_setup_holds_far_less_than_the_dense_model_and_the_same_initial_weights():
    run_ranks(WORLD, _setup_worker)
