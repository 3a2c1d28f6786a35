"""Balance-loss scopes: hand-computed values for 2 experts; the global_batch loss does not depend on
how the batch is split; and dp=2/ep=2 on 4 ranks and grad_accum=4 on 1 rank give the loss curve
and every gradient of one process taking the whole global batch at once."""

import pytest
import torch
import torch.nn.functional as F

from models.gpt import GPT
from models.moe.balance import balance_loss, router_losses, routing_summary
from parallel.dims import init_parallel
from parallel.parallelize import materialize, parallelize
from parallel.zero import local_tensor
from tests.jobs import TINY, read_metrics, run_job, train_losses
from tests.ranks import run_ranks
from train.config import JobConfig

# Two sequences of two tokens, two experts, top-1: sequence A sends both tokens to expert 0,
# sequence B both to expert 1.
PROBS_A, PROBS_B = [[0.8, 0.2], [0.6, 0.4]], [[0.1, 0.9], [0.3, 0.7]]
IDS_A, IDS_B = [[0], [0]], [[1], [1]]


def summary(probs, ids):
    return routing_summary(torch.tensor(probs)[None], torch.tensor(ids)[None], 2)


def test_two_experts_by_hand():
    (sel_a, p_a), (sel_b, p_b) = summary(PROBS_A, IDS_A), summary(PROBS_B, IDS_B)
    assert sel_a.tolist() == [[2, 0]] and p_a[0].tolist() == pytest.approx([0.7, 0.3])
    # micro_batch: each micro-batch its own f. A: f=[1,0], P=[.7,.3] -> 2·0.7; B: f=[0,1], P=[.2,.8] -> 2·0.8.
    assert balance_loss(sel_a, p_a, "micro_batch").item() == pytest.approx(1.4)
    assert balance_loss(sel_b, p_b, "micro_batch").item() == pytest.approx(1.6)
    # global_batch: f over both = [1/2, 1/2], so each micro-batch gives 2·(P0 + P1)/2 = 1.
    both = sel_a.sum(0) + sel_b.sum(0)
    assert balance_loss(sel_a, p_a, "global_batch", both).item() == pytest.approx(1.0)
    assert balance_loss(sel_b, p_b, "global_batch", both).item() == pytest.approx(1.0)
    # ...which is the whole batch at once: f=[1/2,1/2], P=[.45,.55] -> 2·(.5·.45 + .5·.55) = 1.
    whole_sel, whole_p = torch.cat([sel_a, sel_b]), torch.cat([p_a, p_b])
    assert balance_loss(whole_sel, whole_p, "micro_batch").item() == pytest.approx(1.0)
    # sequence: each sequence on its own (1.4 and 1.6), averaged.
    assert balance_loss(whole_sel, whole_p, "sequence").item() == pytest.approx(1.5)


@pytest.mark.parametrize("parts", [1, 2, 4, 8])
def test_global_batch_loss_and_gradient_do_not_depend_on_the_split(parts):
    torch.manual_seed(0)
    logits_BSE = torch.randn(8, 5, 4, requires_grad=True)
    probs_BSE = logits_BSE.softmax(-1)
    ids_BSK = probs_BSE.topk(2, dim=-1).indices
    sel_BE, p_BE = routing_summary(probs_BSE, ids_BSK, 4)
    whole = balance_loss(sel_BE, p_BE, "micro_batch")
    (whole_grad,) = torch.autograd.grad(whole, logits_BSE, retain_graph=True)
    global_E = sel_BE.sum(0)
    split = (
        sum(balance_loss(s, p, "global_batch", global_E) for s, p in zip(sel_BE.chunk(parts), p_BE.chunk(parts)))
        / parts
    )
    (split_grad,) = torch.autograd.grad(split, logits_BSE)
    assert split.item() == pytest.approx(whole.item(), rel=1e-6)
    torch.testing.assert_close(split_grad, whole_grad, rtol=1e-5, atol=1e-8)


def tiny_job(micro_batch: int, grad_accum: int, zero_stage: int) -> JobConfig:
    job = JobConfig()
    job.model.vocab_size, job.model.max_seq_len, job.model.n_layers = 64, 16, 2
    job.model.d_model, job.model.n_heads, job.model.ffn_hidden = 32, 4, 64
    job.moe.num_experts, job.moe.expert_ffn_hidden = 4, 32
    job.moe.aux_loss_coef = 1.0  # large, so that a wrong balance gradient cannot hide
    job.train.micro_batch, job.train.grad_accum, job.train.seq_len = micro_batch, grad_accum, 16
    job.deepspeed.zero_stage = zero_stage
    return job


def global_batch():
    torch.manual_seed(7)
    return torch.randint(0, 64, (8, 17))  # 8 sequences: the whole step


def whole_batch_gradients(job: JobConfig) -> tuple[float, dict[str, torch.Tensor]]:
    """The oracle: one process, the whole global batch in one forward, balanced over all of it."""
    with torch.device("meta"):
        model = GPT(job.gpt_config())
    materialize(model, torch.device("cpu"), job.train.seed)
    idx = global_batch()
    logits, stats = model(idx[:, :-1])
    losses = router_losses(stats, job.moe.aux_loss_coef, job.moe.z_loss_coef, "micro_batch")
    loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()) + losses.total
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}


def split_step_gradients(job: JobConfig, dims, rows: list[slice]) -> dict[str, tuple]:
    """This rank's micro-batches `rows` of the global batch through the parallel trainer, balanced
    over the global batch; returns each gradient piece with where it sits in the whole parameter."""
    with torch.device("meta"):
        model = GPT(job.gpt_config())
    trainer = parallelize(model, dims, job)
    idx = global_batch()
    with torch.no_grad():  # the step's expert counts: every micro-batch of every rank
        counts = sum(torch.stack([s.selected_BE.sum(0) for s in trainer.forward(idx[r, :-1])[1]]) for r in rows)
    if dims.distributed:
        torch.distributed.all_reduce(counts)
    for r in rows:
        logits, stats = trainer.forward(idx[r, :-1])
        losses = router_losses(stats, job.moe.aux_loss_coef, job.moe.z_loss_coef, "global_batch", counts)
        trainer.backward(F.cross_entropy(logits.flatten(0, 1), idx[r, 1:].flatten()) + losses.total)
    pieces = {}
    for name, p in trainer.dense.named_parameters():
        piece = trainer.dense.piece(p)
        if piece is not None:
            pieces[name] = ("flat", piece.start, trainer.dense.grad(p).clone())
    for name, p in trainer.named_expert_parameters:
        experts = trainer.experts[name.rsplit(".", 1)[0]]
        pieces[name] = ("experts", experts.first_expert, local_tensor(p.grad).clone(), trainer.experts_sharded)
    return pieces


def assert_pieces_match(pieces, whole, dims):
    assert pieces
    for name, piece in pieces.items():
        want = whole[name]
        if piece[0] == "flat":
            _, start, got = piece
            want = want.flatten()[start : start + got.numel()]
        else:
            _, first, got, sharded = piece
            want = want[first : first + got.shape[0]]
            if sharded:  # FSDP keeps a dim-1 slice per EDP rank (torch.chunk sizes)
                want = want.chunk(dims.edp, dim=1)[dims.edp_rank]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def _dp2_ep2_worker(rank, world_size):
    dims = init_parallel(ep=2, num_experts=4, device=torch.device("cpu"))
    job = tiny_job(micro_batch=2, grad_accum=1, zero_stage=2)
    pieces = split_step_gradients(job, dims, [slice(2 * rank, 2 * rank + 2)])
    _, whole = whole_batch_gradients(tiny_job(8, 1, 0))
    assert_pieces_match(pieces, whole, dims)


def test_every_gradient_of_dp2_ep2_equals_the_whole_batch():
    run_ranks(4, _dp2_ep2_worker)


def _accumulation_worker(rank, world_size):
    dims = init_parallel(ep=1, num_experts=4, device=torch.device("cpu"))
    job = tiny_job(micro_batch=2, grad_accum=4, zero_stage=0)
    pieces = split_step_gradients(job, dims, [slice(2 * m, 2 * m + 2) for m in range(4)])
    _, whole = whole_batch_gradients(tiny_job(8, 1, 0))
    assert_pieces_match(pieces, whole, dims)


def test_every_gradient_of_grad_accum4_equals_the_whole_batch():
    run_ranks(1, _accumulation_worker)


def test_loss_curves_of_every_split_equal_the_whole_batch(tmp_path, data_cache):
    """16 rows a step: one process taking them at once; 4 ranks (dp=2, ep=2) of 4; 1 rank, 4 x 4."""
    common = [*TINY, "train.steps=5", "train.eval_interval=5", "train.ckpt_interval=5", "moe.aux_loss_coef=0.1"]
    layouts = {
        "whole": (["train.micro_batch=16"], 1),
        "dp2_ep2": (["parallel.ep=2"], 4),
        "accum4": (["train.grad_accum=4"], 1),
    }
    curves, aux = {}, {}
    for name, (overrides, nproc) in layouts.items():
        done = run_job(tmp_path, data_cache, *common, *overrides, f"run_name={name}", nproc=nproc)
        assert done.returncode == 0, done.stderr[-3000:]
        records = read_metrics(tmp_path, name)
        curves[name] = train_losses(records)
        aux[name] = {r["step"]: r["moe/layer0/aux_loss"] for r in records if "moe/layer0/aux_loss" in r}
    for name in ("dp2_ep2", "accum4"):
        for step, want in curves["whole"].items():
            assert curves[name][step] == pytest.approx(want, rel=1e-5), (name, step)
            assert aux[name][step] == pytest.approx(aux["whole"][step], rel=1e-5), (name, step)
