"""The trainer's whole training state (parallel/training_state.py) on 2 ranks whose experts FSDP2
shards from ZeRO-1 on, for every ZeRO stage: weights loaded whole (`load_model_state`, as
model.init_from does) compute the single-process model's logits; the state each stage saves with
torch.distributed.checkpoint after one step is the same; and each stage, loading another stage's
checkpoint, holds exactly what that one saved (weights, AdamW moments, step counts, buffers)."""

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

from models.gpt import GPT
from parallel.dims import init_parallel
from parallel.parallelize import parallelize
from tests.ranks import run_ranks
from train.config import JobConfig

STAGES = (0, 1, 2, 3)


def tiny_job(stage: int) -> JobConfig:
    job = JobConfig()
    job.model.vocab_size, job.model.max_seq_len, job.model.n_layers = 64, 16, 2
    job.model.d_model, job.model.n_heads, job.model.ffn_hidden = 32, 4, 64
    job.moe.num_experts, job.moe.expert_ffn_hidden = 4, 32
    job.train.micro_batch, job.train.seq_len = 2, 16
    job.deepspeed.zero_stage = stage
    job.optim.lr = 0.0  # the step fills AdamW's moments and leaves the weights as loaded
    return job


def reference_weights(job: JobConfig) -> tuple[GPT, dict[str, torch.Tensor]]:
    """A single-process model whose weights differ from what `parallelize` initialises, router
    selection biases included."""
    model = GPT(job.gpt_config())
    torch.manual_seed(99)
    model.init_weights()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("expert_bias"):
                buffer.copy_(torch.randn_like(buffer))
    return model.eval(), {k: v.clone() for k, v in model.state_dict().items()}


def batch(rank: int) -> torch.Tensor:
    return torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(100 + rank))


def build(stage: int, dims):
    job = tiny_job(stage)
    with torch.device("meta"):
        model = GPT(job.gpt_config())
    return parallelize(model, dims, job)


def _save_after_one_step(rank: int, world: int, folder: str) -> None:
    dims = init_parallel(ep=1, num_experts=4, device=torch.device("cpu"))
    for stage in STAGES:
        reference, weights = reference_weights(tiny_job(stage))
        trainer = build(stage, dims)
        assert trainer.experts_sharded == (stage >= 1)
        trainer.load_model_state(weights)
        trainer.train(False)
        idx = batch(rank)
        logits, _ = trainer.forward(idx[:, :-1])
        torch.testing.assert_close(logits, reference(idx[:, :-1])[0], rtol=1e-5, atol=1e-6, msg=f"ZeRO-{stage}")
        trainer.train(True)
        logits, _ = trainer.forward(idx[:, :-1])
        trainer.backward(F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()))
        trainer.step(lr=0.0)
        dcp.save(trainer.state_dict(with_rng=False), checkpoint_id=f"{folder}/zero{stage}")


def _load_another_stage(rank: int, world: int, folder: str) -> None:
    dims = init_parallel(ep=1, num_experts=4, device=torch.device("cpu"))
    for stage in STAGES:
        source = STAGES[(stage + 1) % len(STAGES)]
        trainer = build(stage, dims)
        state = trainer.state_dict(with_rng=False)
        dcp.load(state, checkpoint_id=f"{folder}/zero{source}")
        trainer.load_state_dict(state)
        dcp.save(trainer.state_dict(with_rng=False), checkpoint_id=f"{folder}/zero{stage}-from-zero{source}")


def read_whole(folder) -> dict[str, torch.Tensor]:
    entries = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    state = {name: torch.empty(md.size, dtype=md.properties.dtype) for name, md in entries.items()}
    dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    return state


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # reading in one process is the point
def test_every_zero_stage_saves_and_loads_the_same_state(tmp_path):
    run_ranks(2, _save_after_one_step, str(tmp_path))
    saved = {stage: read_whole(tmp_path / f"zero{stage}") for stage in STAGES}
    zero0 = saved[0]
    assert any(k.startswith("optim.exp_avg_sq.blocks.1.ffn.experts") for k in zero0)
    assert float(zero0["optim.step.dense"]) == 1.0 and float(zero0["optim.step.experts"]) == 1.0
    assert zero0["model.blocks.1.ffn.router.expert_bias"].abs().sum() > 0
    for stage in STAGES[1:]:
        assert saved[stage].keys() == zero0.keys()
        for key in zero0:
            if key.startswith("model."):  # lr 0: the weights loaded, exactly
                assert torch.equal(saved[stage][key], zero0[key]), (stage, key)
            else:  # moments of one step's gradients, reduced in another order
                torch.testing.assert_close(saved[stage][key], zero0[key], rtol=1e-4, atol=1e-9, msg=f"{stage} {key}")

    run_ranks(2, _load_another_stage, str(tmp_path))
    for stage in STAGES:
        source = STAGES[(stage + 1) % len(STAGES)]
        reloaded = read_whole(tmp_path / f"zero{stage}-from-zero{source}")
        assert reloaded.keys() == saved[source].keys()
        for key in reloaded:
            assert torch.equal(reloaded[key], saved[source][key]), (stage, source, key)
