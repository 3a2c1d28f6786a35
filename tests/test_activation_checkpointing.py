"""Activation checkpointing changes memory, not results: with expert parallelism (ep=2) and ZeRO-2,
`full` and `moe` give the same loss, router statistics (counted once) and every gradient as `none`;
end to end, the logged metrics (JSONL and W&B) are the same."""

import torch
import torch.nn.functional as F

from models.gpt import GPT
from models.moe.balance import router_losses
from parallel.dims import init_parallel
from parallel.parallelize import parallelize
from parallel.zero import local_tensor
from tests.jobs import TINY, read_metrics, run_job
from tests.ranks import run_ranks
from tests.wandb_reader import history
from train.config import JobConfig

MODES = ("none", "full", "moe")


# Grouped-query attention 2:1 with head_dim != d_model / n_heads, q/k norms, qkv biases and a gated shared expert.
QWEN_LIKE = {
    "model": {"n_kv_heads": 2, "head_dim": 12, "qk_norm": "head", "qkv_bias": True},
    "moe": {"num_shared_experts": 1, "shared_expert_gate": True},
}


def tiny_job(mode: str, settings: dict | None = None) -> JobConfig:
    job = JobConfig()
    job.model.vocab_size, job.model.max_seq_len, job.model.n_layers = 64, 16, 2
    job.model.d_model, job.model.n_heads, job.model.ffn_hidden = 32, 4, 64
    job.moe.num_experts, job.moe.expert_ffn_hidden, job.moe.jitter = 4, 32, 0.1  # jitter: the RNG must replay
    job.train.micro_batch, job.train.seq_len = 2, 16
    job.train.activation_checkpointing = mode
    job.deepspeed.zero_stage = 2
    for section, values in (settings or {}).items():
        for key, value in values.items():
            setattr(getattr(job, section), key, value)
    return job


def one_step(mode: str, dims, settings: dict | None = None) -> dict:
    job = tiny_job(mode, settings)
    with torch.device("meta"):
        model = GPT(job.gpt_config())
    trainer = parallelize(model, dims, job)
    torch.manual_seed(100 + dims.rank)  # this rank's batch, and the jitter noise after it
    idx = torch.randint(0, 64, (2, 17))
    logits, stats = trainer.forward(idx[:, :-1])
    losses = router_losses(stats, job.moe.aux_loss_coef, job.moe.z_loss_coef, "micro_batch")
    loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()) + losses.total
    trainer.backward(loss)
    dense = trainer.dense
    return {
        "loss": loss.detach(),
        "num_stats": torch.tensor(len(stats)),
        "tokens_per_expert": torch.stack([s.tokens_per_expert for s in stats]),
        "aux": losses.aux_L,
        "prob_mean": torch.stack([s.prob_mean_BE.detach() for s in stats]),
        **{f"dense:{n}": dense.grad(p).clone() for n, p in dense.named_parameters() if dense.grad(p) is not None},
        **{f"expert:{n}": local_tensor(p.grad).clone() for n, p in trainer.named_expert_parameters},
    }


def _worker(rank, world_size, settings=None):
    dims = init_parallel(ep=2, num_experts=4, device=torch.device("cpu"))
    results = {mode: one_step(mode, dims, settings) for mode in MODES}
    reference = results["none"]
    assert reference["num_stats"].item() == 2 and any(k.startswith("expert:") for k in reference)
    assert int(reference["tokens_per_expert"].sum()) == 2 * 2 * 16 * 2  # layers x tokens x top-k
    for mode in ("full", "moe"):
        assert results[mode].keys() == reference.keys(), mode
        for key, want in reference.items():
            torch.testing.assert_close(
                results[mode][key], want, rtol=1e-6, atol=1e-7, msg=lambda m: f"{mode} {key}: {m}"
            )


def test_checkpointed_modes_give_the_same_step_with_ep2_and_zero2():
    run_ranks(2, _worker)


def test_checkpointed_modes_give_the_same_step_with_gqa_qk_norms_biases_and_a_gated_shared_expert():
    run_ranks(2, _worker, QWEN_LIKE)


def test_checkpointed_run_logs_the_same_metrics(tmp_path, data_cache):
    common = [o for o in TINY if not o.startswith("logging.wandb.mode")]
    common += [
        "logging.wandb.mode=offline",
        "train.steps=3",
        "train.eval_interval=3",
        "train.ckpt_interval=3",
        "parallel.ep=2",
        "deepspeed.zero_stage=2",
        "moe.jitter=0.1",
    ]
    logged = {}
    for mode in ("none", "full"):
        done = run_job(
            tmp_path, data_cache, *common, f"run_name={mode}", f"train.activation_checkpointing={mode}", nproc=2
        )
        assert done.returncode == 0, done.stderr[-3000:]
        records = [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_metrics(tmp_path, mode)]
        wandb_rows = list(history(next((tmp_path / f"outputs/{mode}/wandb").glob("offline-run-*/run-*.wandb"))))
        logged[mode] = (
            records,
            [
                {k: v for k, v in row.items() if not k.startswith(("perf/", "_", "moe/expert_load_heatmap"))}
                for row in wandb_rows
            ],
        )
    assert any("moe/layer0/tokens_per_expert" in r for r in logged["none"][0])
    assert logged["full"][0] == logged["none"][0]
    assert logged["full"][1] == logged["none"][1] and len(logged["none"][1]) >= 3
