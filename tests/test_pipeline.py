"""Pipeline parallelism (parallel.pp) against one process, and its layout rules.

The single process takes the same global batch as grad_accum micro-batches (the sampler lays a
step's rows out by micro-step, then data-parallel rank), so every micro-batch, and with it every
router loss, is the same; only reduction orders differ. "Every gradient" is read from the
checkpoints: AdamW's first moment after step 1 is exactly (1 - beta1) x the (clipped) gradient of
every dense and expert weight; at step 20 one process takes the step from the pipeline's step-19
state.
"""

from __future__ import annotations

import pytest
import torch

from models.config import GPTConfig, ModelConfig, MoEConfig
from models.gpt import GPT
from parallel.pipeline import AttachLoss, StageModule
from parallel.pipeline_layout import (
    balanced_counts,
    local_stages,
    stage_block_counts,
    validate_micro_batches,
    validate_split,
)
from tests.jobs import TINY, read_metrics, run_job, start_from_checkpoint, train_losses
from train.checkpoint.manager import read_tensors
from train.config import JobConfig

STEPS = 20
COMMON = [
    *TINY,
    "model.n_layers=4",
    f"train.steps={STEPS}",
    "train.eval_interval=100",
    "train.ckpt_interval=1",
    f"train.keep_checkpoints={STEPS}",
    "optim.warmup_steps=2",
    "moe.bias_update_rate=0.01",
]
# name: (processes, the pipeline's overrides): 16 rows a step, as one process with grad_accum 4.
LAYOUTS = {
    "pp2_ep2_zero1_1f1b": (4, ["parallel.pp=2", "parallel.ep=2", "deepspeed.zero_stage=1", "train.grad_accum=2"]),
    "pp4_zero0_gpipe_untied": (
        4,
        ["parallel.pp=4", "parallel.schedule=gpipe", "train.grad_accum=4", "model.tie_embeddings=false"],
    ),
    # dp=2 in each stage: ZeRO-2 partitions the dense weights, FSDP2 shards the experts (edp=2) and
    # reduce-scatters them in each stage's last backward of the step.
    "pp2_interleaved_zero2_fsdp_checkpointed": (
        4,
        [
            "parallel.pp=2",
            "parallel.stages_per_rank=2",
            "parallel.schedule=interleaved_1f1b",
            "deepspeed.zero_stage=2",
            "train.grad_accum=2",
            "train.activation_checkpointing=full",
        ],
    ),
}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data_cache):
    """The single-process runs, by model overrides (shared by the layouts that train the same model)."""
    workdir, done = tmp_path_factory.mktemp("one_process"), set()

    def run(model_overrides: list[str]) -> tuple:
        name = "single" + "".join("_" + o.replace("=", "-") for o in model_overrides)
        if name not in done:
            single = run_job(workdir, data_cache, *COMMON, *model_overrides, f"run_name={name}", "train.grad_accum=4")
            assert single.returncode == 0, single.stderr[-3000:]
            done.add(name)
        return workdir, name

    return run


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pipeline_trains_as_one_process(tmp_path, data_cache, one_process, layout):
    nproc, overrides = LAYOUTS[layout]
    single_dir, single = one_process([o for o in overrides if o.startswith("model.")])
    pipe = run_job(tmp_path, data_cache, *COMMON, *overrides, "run_name=pipe", nproc=nproc)
    assert pipe.returncode == 0, pipe.stderr[-3000:]

    # Losses and the global gradient norm of every step.
    expected, got = read_metrics(single_dir, single), read_metrics(tmp_path, "pipe")
    assert sorted(train_losses(got)) == sorted(train_losses(expected)) == list(range(1, STEPS + 1))
    for step, loss in train_losses(expected).items():
        assert train_losses(got)[step] == pytest.approx(loss, rel=1e-5), step
    norms = [(e["train/grad_norm"], g["train/grad_norm"]) for e, g in zip(expected, got) if "train/grad_norm" in e]
    assert len(norms) == STEPS
    for e, g in norms:
        # The norm is more sensitive than the loss to sums taken in another order (measured up to
        # 2e-5 in single steps, with FSDP's reduce-scatter, while the losses agree to 1e-7).
        assert g == pytest.approx(e, rel=1e-4)

    # Every gradient and weight of step 1 (AdamW's first moment is (1 - beta1) x the gradient), from
    # the same initial weights.
    compare_states(
        single_dir / "outputs" / single / "checkpoints/step_000001", tmp_path / "outputs/pipe/checkpoints/step_000001"
    )
    # And of step 20, from the same weights: one process resumes the pipeline's step-19 checkpoint.
    # (Compared with the 20-step single-process run instead, a token whose top-2 is a near tie can
    # switch experts after enough steps of fp32 roundoff, as 3 of 2048 copies did at step 19 in one
    # layout, and change that expert's gradient while the losses still agree to 1e-7.)
    start_from_checkpoint(tmp_path, "pipe", STEPS - 1, "replay")
    model_overrides = [o for o in overrides if o.startswith("model.")]
    replay = run_job(
        tmp_path, data_cache, *COMMON, *model_overrides, "run_name=replay", "train.grad_accum=4", "train.resume=true"
    )
    assert replay.returncode == 0, replay.stderr[-3000:]
    assert f"resumed from step {STEPS - 1} (resharded" in replay.stdout
    last = f"checkpoints/step_{STEPS:06d}"
    compare_states(tmp_path / "outputs/replay" / last, tmp_path / "outputs/pipe" / last)

    # Every MoE layer's figures are logged, whichever stage holds it, and count every routed copy.
    last = [r for r in got if "moe/layer3/tokens_per_expert" in r][-1]
    copies = 16 * 64 * 2  # rows x seq_len x top_k, one step per log window
    for layer in range(4):
        assert sum(last[f"moe/layer{layer}/tokens_per_expert"]) == copies, layer


def test_pipeline_resumes_bit_exactly(tmp_path, data_cache):
    layout = [*TINY, "train.steps=6", "train.eval_interval=100", "parallel.pp=2", "train.grad_accum=2"]
    whole = run_job(tmp_path, data_cache, *layout, "run_name=whole", nproc=2)
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = run_job(tmp_path, data_cache, *layout, "run_name=parts", "train.stop_at=3", nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    rest = run_job(tmp_path, data_cache, *layout, "run_name=parts", "train.resume=true", nproc=2)
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert "resumed from step 3 (exact)" in rest.stdout
    assert train_losses(read_metrics(tmp_path, "parts")) == train_losses(read_metrics(tmp_path, "whole"))


# Two layouts refused by real ranks (every rank stops before any collective: no hang, exit 2, one
# line); the others through the same checks (train/config.py: process_layout) in-process.
BAD_LAYOUTS = {
    "pp not dividing the processes": (
        ["parallel.pp=3", "model.n_layers=6", "train.grad_accum=3"],
        "parallel.pp (3) must divide the number of processes (4); allowed: divisors of 4",
    ),
    "pp x ep not dividing the processes": (
        ["parallel.pp=2", "parallel.ep=4", "train.grad_accum=2"],
        "parallel.pp x parallel.ep (2 x 4) must divide the number of processes (4); "
        "allowed parallel.ep with parallel.pp=2: divisors of 2",
    ),
    "stages not dividing the layers": (
        ["parallel.pp=2", "model.n_layers=3", "train.grad_accum=2"],
        "parallel.pp x parallel.stages_per_rank (2 stages) must divide model.n_layers (3) with "
        "parallel.split=layers; use parallel.split=params or a list of block counts",
    ),
    "too few micro-batches for 1f1b": (
        ["parallel.pp=4", "model.n_layers=4", "train.grad_accum=2"],
        "parallel.schedule=1f1b needs train.grad_accum (micro-batches per step) >= parallel.pp (4); got 2",
    ),
    "global batch not split over a stage's ranks": (
        ["parallel.pp=2", "train.global_batch=5"],
        "train.global_batch=5 must be a multiple of processes / parallel.pp (2): each rank takes an equal share",
    ),
}


@pytest.mark.parametrize("case", ["pp x ep not dividing the processes", "stages not dividing the layers"])
def test_bad_layouts_are_refused_before_any_collective(tmp_path, data_cache, case):
    overrides, line = BAD_LAYOUTS[case]
    done = run_job(tmp_path, data_cache, *TINY, *overrides, nproc=4, timeout=180)
    assert done.returncode != 0
    errors = [x for x in done.stderr.splitlines() if x.startswith("switchyard: error:")]
    assert errors == [f"switchyard: error: {line}"]
    assert "exitcode  : 2" in done.stderr


@pytest.mark.parametrize("case", BAD_LAYOUTS)
def test_bad_layouts_are_one_line(case):
    from train.check import check_job
    from train.cli import compose_job

    overrides, line = BAD_LAYOUTS[case]
    with pytest.raises(ValueError) as refused:
        check_job(compose_job([*TINY, *overrides]), world_size=4)
    assert str(refused.value) == line


def compare_states(want_folder, have_folder) -> None:
    """Every weight and AdamW first moment of two checkpoints, within fp32 tolerance (sums taken in
    another order: 1e-4 of each tensor's scale)."""
    want = read_tensors(want_folder, prefixes=("model.", "optim.exp_avg."))
    have = read_tensors(have_folder, prefixes=("model.", "optim.exp_avg."))
    assert want.keys() == have.keys()
    assert any(k.startswith("optim.exp_avg.blocks.3.ffn.experts") for k in want)
    for key in want:
        scale = float(want[key].abs().max())
        torch.testing.assert_close(have[key], want[key], rtol=1e-4, atol=1e-4 * scale, msg=key)


# -- pure parts ------------------------------------------------------------------------------


def test_stage_split_by_layers_params_and_list():
    assert stage_block_counts("layers", [10] * 8, 4, 0, 0) == [2, 2, 2, 2]
    assert stage_block_counts([3, 5], [10] * 8, 2, 0, 0) == [3, 5]
    # A large embedding pushes blocks to the later stage: [2, 4] weighs max(25 + 20, 40) = 45,
    # [1, 5] max(35, 50) = 50, [3, 3] max(55, 30) = 55.
    assert balanced_counts([10] * 6, 2, first_extra=25, last_extra=0) == [2, 4]
    assert balanced_counts([10] * 6, 2, first_extra=0, last_extra=0) == [3, 3]
    assert balanced_counts([1, 1, 1, 100], 2, 0, 0) == [3, 1]
    assert balanced_counts([5, 5, 5, 5, 5], 5, 0, 0) == [1, 1, 1, 1, 1]
    assert local_stages(pp_rank=1, pp=2, stages_per_rank=2) == [1, 3]


@pytest.mark.parametrize(
    "split, n_layers, stages, message",
    [
        ("layers", 6, 4, "must divide model.n_layers (6)"),
        ("params", 3, 4, "exceeds model.n_layers (3)"),
        ([2, 2], 6, 2, "summing to model.n_layers (6)"),
        ([2, 0, 4], 6, 3, "positive block counts"),
        ("blocks", 6, 2, "parallel.split must be 'layers', 'params' or a list"),
    ],
)
def test_bad_split_is_one_line(split, n_layers, stages, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_split(split, n_layers, stages)


def test_micro_batches_per_schedule():
    validate_micro_batches("gpipe", 1, 4)
    validate_micro_batches("1f1b", 4, 4)
    with pytest.raises(ValueError, match="interleaved_1f1b needs train.grad_accum"):
        validate_micro_batches("interleaved_1f1b", 3, 2)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"pp": 2, "schedule": "interleaved_1f1b"}, "interleaved_1f1b needs stages_per_rank > 1"),
        ({"pp": 2, "schedule": "zero_bubble"}, "parallel.schedule must be one of"),
        ({"pp": 2, "stages_per_rank": 2}, "interleaved_1f1b needs stages_per_rank > 1"),
    ],
)
def test_bad_pipeline_settings_are_one_line(overrides, message):
    job = JobConfig()
    for key, value in overrides.items():
        setattr(job.parallel, key, value)
    with pytest.raises(ValueError, match=message):
        job.validate()


def test_zero3_is_refused_with_a_pipeline():
    job = JobConfig()
    job.parallel.pp, job.train.grad_accum, job.deepspeed.zero_stage = 2, 2, 3
    with pytest.raises(ValueError, match="parallel.pp=2 runs with deepspeed.zero_stage 0, 1, 2; got 3"):
        job.validate()


def test_attached_loss_gets_its_gradient_once():
    torch.manual_seed(0)
    w = torch.randn(3, requires_grad=True)
    x = torch.randn(4, requires_grad=True)
    y = AttachLoss.apply(x, (w**2).sum(), 0.25)
    assert torch.equal(y, x)
    (y * 2).sum().backward()
    torch.testing.assert_close(w.grad, 0.25 * 2 * w.detach())  # d(0.25 · Σw²)/dw
    torch.testing.assert_close(x.grad, torch.full((4,), 2.0))


def test_stages_together_are_the_model():
    """Chaining the stage modules of a 4-stage split gives the whole model's logits."""
    torch.manual_seed(0)
    cfg = GPTConfig(
        model=ModelConfig(vocab_size=50, d_model=32, n_layers=4, n_heads=4, max_seq_len=16),
        moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden=16, aux_loss_scope="micro_batch"),
    )
    model = GPT(cfg)
    idx = torch.randint(0, 50, (2, 16))
    whole, _ = model(idx)
    stages = [StageModule(model, s, 4, range(s, s + 1)) for s in range(4)]
    out = stages[0](idx)
    for stage in stages[1:]:
        out = stage(*out) if isinstance(out, tuple) else stage(out)
    torch.testing.assert_close(out, whole)
    assert [r.moe_index for s in stages for r in s.records] == [0, 1, 2, 3]
