"""`python -m train.plan`: figures against hand-computed values, its activation estimate against
the torch profiler's peak on CPU, and its answers to bad input. (Model states against live
multi-rank jobs: tests/test_plan_exact.py.)"""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from models.config import GPTConfig, ModelConfig, MoEConfig
from models.gpt import GPT
from models.moe.balance import router_losses
from parallel.activation_checkpointing import apply_activation_checkpointing
from parallel.memory import profiled_allocation_peak
from parallel.pipeline_layout import in_flight_micro_batches
from parallel.precision import autocast_dtype
from planner.activations import activation_peak
from planner.model_states import element_bytes, rank_stages
from planner.pipeline import StepShape as PipelineStep
from planner.pipeline import rank_activation_peak
from planner.report import build_report
from tests.jobs import job_env
from train import plan as planner

MIXTRAL = [
    "model.n_layers=32",
    "model.d_model=4096",
    "model.n_heads=32",
    "moe.num_experts=8",
    "moe.top_k=2",
    "moe.expert_ffn_hidden=14336",
    "model.vocab_size=32000",
    "model.tie_embeddings=false",
    "train.seq_len=4096",
    "train.micro_batch=1",
    "parallel.ep=8",
    "deepspeed.zero_stage=1",
    "plan.world_size=64",
    "train.dtype=bf16",
    "plan.device_memory_gb=80",
]


def report_for(*argv: str):
    plan = planner.parse_plan_settings([a for a in argv if a.startswith("plan.")])
    job = planner.compose_job([a for a in argv if not a.startswith("plan.")])
    job.validate()
    planner.check_layout(job, plan)
    with torch.device("meta"):
        model = GPT(job.gpt_config())
    return build_report(job, plan, model, planner.plan_layout(job, plan.world_size))


def test_default_config_by_hand():
    """conf/model/small.yaml + conf/moe/default.yaml on one process, ZeRO-0: every tensor whole."""
    r = report_for("train.dtype=fp32")
    D, V, L, E, F_ = 256, 8192, 4, 8, 512
    dense = V * D + L * (3 * D * D + D * D + E * D + 2 * D) + D  # tied embedding, 4 blocks, final norm
    experts = L * 3 * E * D * F_
    assert r.states["dense"] == {
        "weights": 4 * dense,
        "gradients": 4 * dense,
        "optimizer": 8 * dense + 4 * (1 + L * 5 + 1),  # moments + one step per tensor
        "buffers": 2 * 256 * (D // 4 // 2) * 4 + L * E * 4,
    }  # rotary tables, router biases
    assert r.states["experts"] == {
        "weights": 4 * experts,
        "gradients": 4 * experts,
        "optimizer": 8 * experts + 4 * 3 * L,
        "buffers": 0,
    }
    assert r.transients == [] and not r.ranks_differ
    # Activations (fp32, T = 8 x 256 tokens): the cross-entropy phase dominates without checkpointing.
    T = 8 * 256
    assert r.activations["none"].phase == "cross-entropy"
    assert r.activations["none"].peak - r.activations["none"].saved == 2 * T * V * 4
    # Saved by the experts per MoE layer: 2 token copies, their outputs and weighted outputs (3k·T·D),
    # 4 SwiGLU tensors per copy (4k·T·F), 4 int64 index vectors of the k·T copies.
    assert r.activations["none"].saved_by_experts == L * (4 * (3 * 2 * T * D + 4 * 2 * T * F_) + 8 * 4 * 2 * T)
    assert r.activations["full"].saved_by_experts == 0
    assert r.peaks["full"] < r.peaks["moe"] < r.peaks["none"] < 2**30
    assert r.fits("none")


def test_zero3_keeps_a_reduce_bucket_of_d_model_squared():
    # parallel/zero.py sizes DeepSpeed's reduce bucket to d_model² elements; ZeRO-3 allocates it up
    # front (with DeepSpeed's default of 5e8 elements it would be 1.86 GiB on every rank).
    stage0, stage3 = report_for("deepspeed.zero_stage=0"), report_for("deepspeed.zero_stage=3")
    assert stage3.states["dense"]["buffers"] - stage0.states["dense"]["buffers"] == 256 * 256 * 4


def test_mixtral_shaped_on_64_ranks_by_hand():
    r = report_for(*MIXTRAL)
    D, F_, L, V = 4096, 14336, 32, 32000
    assert r.total_params == 2 * V * D + L * (4 * D * D + 8 * D + 2 * D + 8 * 3 * D * F_) + D
    # One local expert per layer (8 experts / ep 8), split over its 8 EDP ranks by FSDP2.
    shard = L * 3 * D * F_ // 8
    assert r.states["experts"] == {
        "weights": 4 * shard,
        "gradients": 4 * shard,
        "optimizer": 8 * shard + 4 * 3 * L,
        "buffers": 0,
    }
    # ZeRO-1 dense: whole fp32 weights in two flat buffers, fp32 master + moments for 1/64 of them.
    dense = r.total_params - r.expert_params
    assert r.states["dense"]["weights"] == pytest.approx(4 * dense, abs=4 * 2 * 64 * 2)
    assert r.states["dense"]["optimizer"] == pytest.approx(12 * dense / 64, rel=1e-3)
    assert r.ranks_differ and r.spread > 0
    # Without checkpointing the activations of 4096 tokens do not fit in 80 GiB; `full` does.
    assert not r.fits("none") and r.fits("full")
    # Tokens cross in bf16 (train.dtype=bf16): 2 bytes per element, half of what fp32 sends.
    assert r.all_to_all["none"]["forward"] == 2 * L * round(4096 * 2 * 7 / 8) * D * 2
    fp32 = report_for(*MIXTRAL, "train.dtype=fp32")
    assert fp32.all_to_all["none"]["forward"] == 2 * r.all_to_all["none"]["forward"]
    assert fp32.states == r.states  # fp32 master weights, gradients and AdamW state either way
    assert fp32.activations["none"].saved > r.activations["none"].saved
    gathered = {t.what: t.bytes for t in r.transients}["experts all-gathered by FSDP2"]  # in bf16 (FSDP2's param_dtype)
    fp32_gathered = {t.what: t.bytes for t in fp32.transients}["experts all-gathered by FSDP2"]
    assert 2 * gathered == fp32_gathered == 4 * L * 3 * D * F_


def test_mixtral_command_prints_the_table_and_a_verdict(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "train.plan", *MIXTRAL],
        cwd=tmp_path,
        env=job_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "47.51B parameters" in out and "model states per rank, exact -- rank" in out
    assert "dropless, assuming uniform routing" in out
    assert (
        out.strip().splitlines()[-1].startswith("verdict: does not fit: ")
        and "activations dominate" in out
        and "fits with train.activation_checkpointing=full" in out
    )


# -- pipeline stages -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule, pp, stages_per_rank, n_micro, counts_by_rank",
    [
        ("gpipe", 4, 1, 8, [[8], [8], [8], [8]]),  # every forward before any backward
        ("1f1b", 4, 1, 8, [[4], [3], [2], [1]]),  # min(pp - stage, n)
        ("1f1b", 4, 1, 2, [[2], [2], [2], [1]]),
        # ScheduleInterleaved1F1B, stages 0 and 2 on rank 0, 1 and 3 on rank 1. n=2: one round of 2;
        # rank 0 warms up with (2-1)·2 + 2·1 = 4 forwards (all of them), rank 1 with 2 (stage 1's)
        # and runs stage 3's first forward before its first backward.
        ("interleaved_1f1b", 2, 2, 2, [[2, 2], [2, 1]]),
        # n=4: two rounds of 2; rank 0 warms up 0,0,2,2 then forwards stage 0 once more before backward.
        ("interleaved_1f1b", 2, 2, 4, [[3, 2], [2, 1]]),
        # pp=4, n=8: rounds of 4; rank r warms up (2-1)·4 + 2·(3-r) forwards, 4 on its first stage, then
        # its second, then its first again (rank 0: 10 = 4 + 4 + 2; rank 2: 6 = 4 + 2), then one more
        # forward (rank 0: op 10 -> stage 0; rank 2: op 6 -> stage 6) before its first backward.
        ("interleaved_1f1b", 4, 2, 8, [[7, 4], [5, 4], [4, 3], [4, 1]]),
    ],
)
def test_micro_batches_in_flight_per_schedule_by_hand(schedule, pp, stages_per_rank, n_micro, counts_by_rank):
    got = [in_flight_micro_batches(schedule, pp, r, stages_per_rank, n_micro) for r in range(pp)]
    assert got == counts_by_rank


PIPELINE = ["plan.world_size=4", "parallel.pp=2", "parallel.ep=2", "deepspeed.zero_stage=1", "train.dtype=fp32"]


def test_pipeline_plan_shows_the_heaviest_stage_by_hand():
    """conf's small model (4 blocks, tied 8192 x 256 embedding) on pp=2 x ep=2, 1F1B with 4
    micro-batches: stage 0 holds blocks 0-1 and the embedding, stage 1 blocks 2-3, the final norm,
    and receives the embedding matrix with each micro-batch."""
    r = report_for(*PIPELINE, "train.grad_accum=4")
    one = report_for("plan.world_size=2", "parallel.ep=2", "deepspeed.zero_stage=1", "train.dtype=fp32")
    D, V, E, F_, B, S = 256, 8192, 8, 512, 8, 256
    block = 3 * D * D + D * D + E * D + 2 * D  # qkv, out, router, two norms
    experts_per_block = 3 * (E // 2) * D * F_  # this rank's 4 experts, whole (one rank per EDP group)
    assert r.stages.stages == [1] and r.stages.ranges == [range(0, 2), range(2, 4)]  # the last stage is heavier
    stage1_dense = 2 * block + D  # no embedding weight: it arrives as an activation
    assert r.states["dense"]["weights"] == 4 * (2 * block + D)  # two flat buffers, each a multiple of 2 x 2
    assert r.states["experts"]["weights"] == 4 * 2 * experts_per_block
    assert r.states["dense"]["optimizer"] == 3 * 4 * stage1_dense // 2 + 2 * 4  # half the masters + moments, 2 steps
    # 1F1B: the last stage has one micro-batch in flight. One micro-batch's activations split between
    # the stages: stage 0 saves those of blocks 0-1, stage 1 those of blocks 2-3 and the output.
    assert r.in_flight == [1]
    layout = planner.plan_layout(r.job, 4)
    with torch.device("meta"):
        model = GPT(r.job.gpt_config())
    shape = PipelineStep(B, S, 1)
    for mode in ("none", "full", "moe"):
        stage_saved = [
            rank_activation_peak(r.job.gpt_config(), layout, rank_stages(model, layout, p), shape, mode, 4, 4).saved
            for p in (0, 1)
        ]
        assert stage_saved[1] == r.activations[mode].saved and stage_saved[0] < stage_saved[1], mode
        assert sum(stage_saved) == one.activations[mode].saved, mode
    # Receive buffers: 4 micro-batches of the hidden state and the tied matrix (fp32), inputs only.
    assert r.receive_buffers == 4 * (B * S * D + V * D) * 4
    transients = {t.what: t.bytes for t in r.transients}
    name = "V x D matrices of the embedding's backward (its gradients; tied: the surrogate's product)"
    assert transients[name] == V * D * 4  # the last stage: the received matrix's gradient
    # One micro-batch's logits and their gradient: none kept for a return value (the job asks for none).
    assert transients["the last stage's output (one micro-batch's logits) and its gradient"] == 2 * B * S * V * 4
    assert len(r.pipeline_peaks) == 2 and r.peaks[r.job.train.activation_checkpointing] == max(r.pipeline_peaks)
    # GPipe keeps all 4 micro-batches' activations on every stage: more than 1F1B.
    g = report_for(*PIPELINE, "train.grad_accum=4", "parallel.schedule=gpipe")
    assert g.in_flight == [4] and g.activations["none"].saved == 4 * r.activations["none"].saved
    assert g.peaks["none"] > r.peaks["none"]


def test_pipeline_command_names_the_stage_in_the_table(capsys):
    argv = [*PIPELINE, "train.grad_accum=4", "parallel.schedule=interleaved_1f1b", "parallel.stages_per_rank=2"]
    assert planner.main(argv) == 0
    out = capsys.readouterr().out
    assert "parallel.pp=2 (4 stages, parallel.schedule=interleaved_1f1b, parallel.split=layers)" in out
    assert "pipeline rank 1 of 2, the highest peak, holds stage 1 (block 1); stage 3 (block 3, norm" in out
    assert "micro-batches in flight on this rank (stage 1: 2, stage 3: 1;" in out
    assert "peak of each pipeline rank" in out and out.strip().splitlines()[-1].startswith("verdict: fits: ")


def test_plan_that_does_not_fit_exits_0_with_the_verdict(capsys):
    assert planner.main(["plan.device_memory_gb=0.25"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("verdict: does not fit: ") and "activations dominate" in last


@pytest.mark.parametrize(
    "argv, line",
    [
        (
            ["parallel.ep=8", "plan.world_size=60"],
            "parallel.ep (8) must divide plan.world_size (60); allowed: divisors of 60",
        ),
        (
            ["moe.num_experts=6", "parallel.ep=4", "plan.world_size=8"],
            "parallel.ep (4) must divide moe.num_experts (6)",
        ),
        (
            ["train.activation_checkpointing=sometimes"],
            "train.activation_checkpointing must be one of 'none', 'full', 'moe'; got 'sometimes'",
        ),
        (
            ["plan.wrld_size=4"],
            "plan.wrld_size is not a planner setting; allowed: plan.world_size, plan.device_memory_gb",
        ),
        (["plan.bytes_per_param=2"], "plan.bytes_per_param is not a planner setting"),  # train.dtype says it
        (["plan.world_size=two"], "plan.world_size must be an integer; got 'two'"),
        (["deepspeed.zero_stage=1", "plan.world_size=3"], "each expert is split over its 3 expert-data-parallel ranks"),
        (
            ["moe.num_expert=4"],
            "moe.num_expert: no such setting (did you mean moe.num_experts",
        ),  # as python -m train says
        (["+train.stepz=50"], "train.stepz: no such setting"),
        (
            ["plan.world_size=6", "parallel.pp=4", "train.grad_accum=4"],
            "parallel.pp (4) must divide plan.world_size (6); allowed: divisors of 6",
        ),
        (
            ["plan.world_size=4", "parallel.pp=2", "parallel.ep=4", "train.grad_accum=2"],
            "parallel.pp x parallel.ep (2 x 4) must divide plan.world_size (4); allowed parallel.ep with parallel.pp=2",
        ),
        (
            ["plan.world_size=3", "parallel.pp=3", "train.grad_accum=3"],
            "parallel.pp x parallel.stages_per_rank (3 stages) must divide model.n_layers (4)",
        ),
        (
            ["plan.world_size=2", "parallel.pp=2", "train.grad_accum=1"],
            "parallel.schedule=1f1b needs train.grad_accum (micro-batches per step) >= parallel.pp (2); got 1",
        ),
        (
            ["plan.world_size=2", "parallel.pp=2", "parallel.split=[1,2]", "train.grad_accum=2"],
            "parallel.split as a list needs 2 positive block counts",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, line):
    assert planner.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("switchyard: error: ") and line in lines[0], lines


# -- the activation estimate against the profiler ------------------------------------------------


@pytest.fixture
def one_thread():
    """One intra-op thread: fast on a shared 2-core machine (two threads there can spin for
    seconds), and kernels' per-thread scratch memory the same everywhere."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def measured_activation_peak(
    cfg: GPTConfig, micro_batch: int, seq_len: int, mode: str, train_dtype: str = "fp32"
) -> int:
    """One forward + backward of the single-process model, with its gradients already allocated
    (so the peak is the activations' and the backward's working set, not new gradient memory),
    under the job's autocast for `train_dtype` (fp32 master weights either way)."""
    torch.manual_seed(0)
    model = GPT(cfg)
    apply_activation_checkpointing(model, mode)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    idx = torch.randint(0, cfg.model.vocab_size, (micro_batch, seq_len + 1))

    compute_dtype = autocast_dtype(train_dtype, torch.device("cpu"))

    def step():
        with torch.autocast("cpu", dtype=compute_dtype or torch.float32, enabled=compute_dtype is not None):
            logits, stats = model(idx[:, :-1])
        # micro_batch scope: the same memory as global_batch, without the step's count pre-pass
        router = router_losses(stats, cfg.moe.aux_loss_coef, cfg.moe.z_loss_coef, "micro_batch").total
        loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()) + router
        del logits, stats  # as train/loop.py: only the loss outlives the forward
        loss.backward()

    return profiled_allocation_peak(step)


ACTIVATION_CONFIGS = {
    # conf/model/small.yaml + conf/moe/default.yaml at 2 x 256 tokens
    "default": (ModelConfig(vocab_size=8192, max_seq_len=256), MoEConfig(), 2, 256),
    # a small vocabulary, so that a block's backward (not the cross-entropy) makes the peak
    "default, vocab 256": (ModelConfig(vocab_size=256, max_seq_len=256), MoEConfig(), 2, 256),
    # alternate dense/MoE blocks, GELU, top-1 with a shared expert
    "every 2, gelu, shared": (
        ModelConfig(vocab_size=512, max_seq_len=128, activation="gelu"),
        MoEConfig(every=2, top_k=1, num_shared_experts=1),
        4,
        128,
    ),
    # grouped-query attention 4:1, head_dim != d_model / n_heads, per-head q/k norms, qkv biases, gated shared expert
    "gqa, head_dim, qk norms, gated shared": (
        ModelConfig(
            vocab_size=256, max_seq_len=128, n_heads=8, n_kv_heads=2, head_dim=48, qk_norm="head", qkv_bias=True
        ),
        MoEConfig(num_shared_experts=1, shared_expert_gate=True),
        4,
        128,
    ),
    # q/k norms over the whole projection (OLMoE)
    "qk norm projection": (ModelConfig(vocab_size=256, max_seq_len=128, qk_norm="projection"), MoEConfig(), 4, 128),
}


@pytest.mark.parametrize("train_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ACTIVATION_CONFIGS)
def test_activation_estimate_is_within_25_percent_of_the_profiled_peak(name, train_dtype, one_thread):
    model_cfg, moe_cfg, micro_batch, seq_len = ACTIVATION_CONFIGS[name]
    cfg = GPTConfig(model_cfg, moe_cfg)
    weight_bytes, activation_bytes = element_bytes(train_dtype)
    phases = set()
    for mode in ("none", "full", "moe"):
        estimate = activation_peak(
            cfg,
            micro_batch,
            seq_len,
            ep=1,
            mode=mode,
            bytes_per_activation=activation_bytes,
            residual_bytes=weight_bytes,
        )
        measured = measured_activation_peak(cfg, micro_batch, seq_len, mode, train_dtype)
        assert estimate.peak == pytest.approx(measured, rel=0.25), (name, train_dtype, mode, estimate, measured)
        phases.add(estimate.phase)
    assert len(phases) > 1 or name == "default"  # the backward phases are exercised, not only the cross-entropy


# -- a pipeline stage's activations against the profiler -------------------------------------------


def measured_stage_peak(cfg: GPTConfig, stage_index: int, ranges: list[range], B: int, S: int, n: int, mode: str):
    """GPipe on one stage of the single-process model, as parallel/pipeline.py runs it: the forwards
    of `n` micro-batches from preallocated receive buffers (the logits kept, as the schedule keeps
    them), then each backward (the last stage's from its loss, the others' from the received output
    gradients through Σ output · gradient), the inputs' gradients dropped once taken."""
    from parallel.pipeline import StageModule

    torch.manual_seed(0)
    model = GPT(cfg)
    m, last = cfg.model, stage_index == len(ranges) - 1
    stage = StageModule(model, stage_index, len(ranges), ranges[stage_index])
    apply_activation_checkpointing(stage, mode)
    for p in stage.parameters():
        p.grad = torch.zeros_like(p)

    def tied(x):
        return (x, torch.randn(m.vocab_size, m.d_model, requires_grad=True)) if m.tie_embeddings else (x,)

    if stage_index == 0:
        inputs = [(torch.randint(0, m.vocab_size, (B, S)),) for _ in range(n)]
    else:
        inputs = [tied(torch.randn(B, S, m.d_model, requires_grad=True)) for _ in range(n)]
    targets = [torch.randint(0, m.vocab_size, (B, S)) for _ in range(n)]
    output_grads = None if last else [tied(torch.randn(B, S, m.d_model)) for _ in range(n)]

    def step():
        outputs = [stage(*x) for x in inputs]
        for i in range(n):
            if last:
                loss = F.cross_entropy(outputs[i].flatten(0, 1), targets[i].flatten())
            else:
                out = outputs[i] if isinstance(outputs[i], tuple) else (outputs[i],)
                loss = sum((o * g).sum() for o, g in zip(out, output_grads[i]))
                outputs[i] = None
            loss.backward()
            del loss
            for t in inputs[i]:
                t.grad = None

    return profiled_allocation_peak(step)


PIPELINE_ACTIVATION_CONFIGS = {
    # 4 blocks in 3 stages (first, middle, last), tied embeddings, 2 micro-batches
    "tied, 3 stages": (ModelConfig(vocab_size=2048, max_seq_len=128), MoEConfig(), [1, 2, 1], 2, 128, 2),
    # untied, alternating dense/MoE blocks, 2 stages, 3 micro-batches
    "untied, every 2": (
        ModelConfig(vocab_size=512, max_seq_len=128, tie_embeddings=False, activation="gelu"),
        MoEConfig(every=2, top_k=1, num_shared_experts=1),
        [2, 2],
        4,
        64,
        3,
    ),
}


@pytest.mark.parametrize("name", PIPELINE_ACTIVATION_CONFIGS)
def test_stage_activation_estimate_is_within_25_percent_of_the_profiled_peak(name, one_thread):
    """What the plan adds for a rank's stage (in-flight activations and the transients of the
    forward/backward) against the profiled GPipe replay of that stage (every micro-batch in flight)."""
    from types import SimpleNamespace

    from parallel.pipeline_layout import stage_ranges
    from planner.model_states import Layout, RankStages
    from planner.pipeline import pipeline_transients

    model_cfg, moe_cfg, split, B, S, n = PIPELINE_ACTIVATION_CONFIGS[name]
    cfg = GPTConfig(model_cfg, moe_cfg)
    ranges = stage_ranges(split)
    layout = Layout(len(split), 1, 0, pp=len(split), schedule="gpipe", split=tuple(split))
    shape = PipelineStep(B, S, n)
    for stage_index in range(len(split)):
        stages = RankStages(stage_index, [stage_index], ranges, len(split), SimpleNamespace())
        for mode in ("none", "full", "moe"):
            activations = rank_activation_peak(cfg, layout, stages, shape, mode, 4, 4)
            during = sum(
                t.bytes for t in pipeline_transients(cfg, layout, stages, shape) if t.when == "forward/backward"
            )
            estimate = activations.peak + during
            measured = measured_stage_peak(cfg, stage_index, ranges, B, S, n, mode)
            assert estimate == pytest.approx(measured, rel=0.25), (name, stage_index, mode, estimate, measured)
