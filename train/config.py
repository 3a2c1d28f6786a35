"""Typed job configuration: dataclasses registered in Hydra's ConfigStore; YAML under conf/ only
overrides them, so a misspelt key or a wrong type fails at composition time.

`validate()` checks the settings and their cross-field rules once, before any process group or
heavy work. It is pure: it reads no file and writes none (train/preflight.py looks at the machine).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore

from models.config import (
    MAX_EXPERTS,
    MAX_SEED,
    MAX_SEQ_LEN,
    GPTConfig,
    ModelConfig,
    MoEConfig,
    require_choice,
    require_finite,
    require_int_in,
    require_non_negative_number,
    require_number_in,
    require_positive_int,
    require_positive_number,
)
from parallel.activation_checkpointing import ACTIVATION_CHECKPOINTING
from parallel.pipeline_layout import (
    PIPELINE_SCHEDULES,
    PIPELINE_ZERO_STAGES,
    validate_micro_batches,
    validate_split,
)
from parallel.zero import validate_zero_stage
from train.data.prepare import check_data_config

WANDB_MODES = ("offline", "online", "disabled")
DTYPES = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
ON_SAVE_FAILURE = ("stop", "continue")
MAX_STEPS = 2**40  # steps and step intervals: far beyond any run, small enough for every integer type on the way
MAX_BATCH = 2**20  # micro_batch, grad_accum, eval_batches: rows or passes per step


@dataclass
class ParallelConfig:
    ep: int = 1  # expert-parallel degree: ranks that split moe.num_experts between them
    # Pipeline stages: the blocks are split into pp x stages_per_rank stages, the processes into pp
    # slices of world / pp (parallel/pipeline.py); train.grad_accum micro-batches fill the pipeline.
    pp: int = 1
    schedule: str = "1f1b"  # pipeline schedule: "gpipe" | "1f1b" | "interleaved_1f1b" (stages_per_rank > 1)
    stages_per_rank: int = 1  # pipeline stages each rank holds (virtual stages; > 1 needs interleaved_1f1b)
    # How blocks are split into stages: "layers" (the same number in each; must divide model.n_layers),
    # "params" (balanced by parameter count, the embedding in the first stage and the output head in
    # the last), or a list of block counts, one per stage (e.g. [3, 5]).
    split: typing.Any = "layers"

    def validate(self) -> None:
        require_positive_int("parallel.ep", self.ep)
        require_positive_int("parallel.pp", self.pp)
        require_choice("parallel.schedule", self.schedule, PIPELINE_SCHEDULES)
        require_positive_int("parallel.stages_per_rank", self.stages_per_rank)
        if (self.stages_per_rank > 1) != (self.schedule == "interleaved_1f1b"):
            raise ValueError(
                f"parallel.schedule={self.schedule!r} with parallel.stages_per_rank={self.stages_per_rank}: "
                "interleaved_1f1b needs stages_per_rank > 1, gpipe and 1f1b need stages_per_rank = 1"
            )


@dataclass
class DeepSpeedConfig:
    # ZeRO stage 0-3: DeepSpeed partitions the dense weights, FSDP2 the routed experts over the ranks
    # that hold the same experts (parallel/zero.py); the name is DeepSpeed's, as users know it.
    zero_stage: int = 0


@dataclass
class TokenizerConfig:
    kind: str = "bpe"  # "bpe" (trained on the training split) | "file" | "hub" | "bytes"
    vocab_size: int = 8192  # for bpe
    path: Optional[str] = None  # tokenizer.json, for kind=file
    name: Optional[str] = None  # hub tokenizer, for kind=hub (needs a network)


@dataclass
class DataConfig:
    corpus: str = "classics"  # "classics" (Shakespeare + KJV Bible) | "files" | "hub"
    paths: list[str] = field(default_factory=list)  # .txt/.json/.jsonl/.parquet, for corpus=files
    hub_name: Optional[str] = None  # for corpus=hub (needs a network)
    text_field: str = "text"  # the column holding the text, for .json/.jsonl/.parquet files and hub datasets
    # The column holding each row's domain (e.g. "source"), for corpus=files (.json/.jsonl/.parquet)
    # or hub; read by the specialisation report (python -m train.specialization), never tokenized.
    domain_field: Optional[str] = None
    val_fraction: float = 0.01  # share held out for validation (classics: each document's tail; files: the last rows)
    cache_dir: str = "~/.cache/switchyard"  # where prepared token files are cached (shared by runs and ranks)
    num_proc: int = 2  # processes that tokenize the corpus (datasets.map)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass
class OptimConfig:
    lr: float = 3e-3  # peak learning rate (AdamW), reached after warmup_steps
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30  # linear warm-up from 0 to lr
    weight_decay: float = 0.1  # AdamW's decoupled weight decay
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay
    eps: float = 1e-8  # AdamW's denominator epsilon
    grad_clip: float = 1.0  # max global grad norm; 0 = off

    def validate(self) -> None:
        # Checked here under their Hydra names: torch's own checks would only say "Invalid beta parameter".
        require_positive_number("optim.lr", self.lr)
        require_number_in("optim.min_lr_ratio", self.min_lr_ratio, 0, 1)
        require_int_in("optim.warmup_steps", self.warmup_steps, 0)
        require_non_negative_number("optim.weight_decay", self.weight_decay)
        require_number_in("optim.beta1", self.beta1, 0, 1, high_open=True)
        require_number_in("optim.beta2", self.beta2, 0, 1, high_open=True)
        require_positive_number("optim.eps", self.eps)  # 0 divides by zero for a weight whose gradient is 0
        require_non_negative_number("optim.grad_clip", self.grad_clip)


@dataclass
class TrainConfig:
    steps: int = 400  # optimizer steps of the whole run
    # Sequences per rank per forward pass; with global_batch set, the most per forward (see there).
    micro_batch: int = 8
    seq_len: int = 256  # tokens per sequence
    # Micro-batches per optimizer step (global batch = micro_batch x grad_accum x data-parallel
    # ranks); derived when global_batch is set.
    grad_accum: int = 1
    # Sequences per optimizer step over all ranks, kept whatever the number of processes: each rank
    # takes global_batch / world_size of them, in grad_accum micro-batches of the largest size that
    # divides its share and is at most micro_batch; the validation set is then eval_batches x
    # global_batch sequences. So a job trains the same run on 1, 2 or 4 processes (and after a
    # requeue onto fewer nodes). null = micro_batch x grad_accum per rank (the global batch grows
    # with the number of processes).
    global_batch: Optional[int] = None
    seed: int = 1234  # seeds the weights, the batches and the router noise: the same seed gives the same run
    device: str = "auto"  # where the job computes: "auto" (CUDA when available, else CPU) | "cpu" | "cuda"
    dtype: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU) | "fp32" | "bf16"
    log_interval: int = 10  # steps between metric records (metrics.jsonl, W&B, console)
    eval_interval: int = 100  # steps between validation-loss measurements
    eval_batches: int = 8  # micro-batches of the validation split per measurement (see global_batch)
    ckpt_interval: int = 200  # steps between checkpoints (and one at the end)
    # Write the periodic checkpoints in the background (torch.distributed.checkpoint async_save):
    # training waits only while the state is copied to host memory; the checkpoint is published
    # (latest, meta.json) once every rank finished writing; at most one save in flight. The final
    # save and a preemption's are written at once.
    async_save: bool = False
    keep_checkpoints: int = 2  # complete checkpoints kept in the run folder (the newest ones; at least 1)
    # A checkpoint that cannot be saved (not enough free space, a failed write): "stop" the job
    # (one line, exit 4) or "continue" training (a warning line; the next save tries again).
    # Either way the checkpoints saved before are left as they were.
    on_save_failure: str = "stop"
    resume: bool = False  # continue the run directory's latest checkpoint instead of starting afresh
    max_bad_steps: int = 5  # consecutive non-finite-loss steps (each skipped) before the run stops
    stop_at: Optional[int] = None  # end this invocation after this step, with a checkpoint (time-boxed jobs)
    peak_tflops: Optional[float] = None  # for MFU; null = measured table on known GPUs, none on CPU
    activation_checkpointing: str = "none"  # "none" | "full" (every block) | "moe" (only MoE feed-forwards)

    def validate(self, max_seq_len: int) -> None:
        for name in ("steps", "log_interval", "eval_interval", "ckpt_interval", "max_bad_steps", "keep_checkpoints"):
            require_positive_int(f"train.{name}", getattr(self, name), MAX_STEPS)
        for name in ("micro_batch", "grad_accum", "eval_batches"):
            require_positive_int(f"train.{name}", getattr(self, name), MAX_BATCH)
        require_positive_int("train.seq_len", self.seq_len, MAX_SEQ_LEN)
        if self.global_batch is not None:
            require_positive_int("train.global_batch", self.global_batch, MAX_BATCH)
            if self.grad_accum != 1:
                raise ValueError(
                    f"train.grad_accum={self.grad_accum}: with train.global_batch set, grad_accum follows "
                    "from it "
                    "(global_batch / processes / micro_batch): leave train.grad_accum at 1"
                )
        if self.seq_len > max_seq_len:
            raise ValueError(f"train.seq_len ({self.seq_len}) must be <= model.max_seq_len ({max_seq_len})")
        require_int_in("train.seed", self.seed, 0, MAX_SEED)
        if self.stop_at is not None:
            require_positive_int("train.stop_at", self.stop_at, MAX_STEPS)
        if self.peak_tflops is not None:
            require_positive_number("train.peak_tflops", self.peak_tflops)
        require_choice("train.on_save_failure", self.on_save_failure, ON_SAVE_FAILURE)
        require_choice("train.device", self.device, DEVICES)
        require_choice("train.dtype", self.dtype, DTYPES)
        require_choice("train.activation_checkpointing", self.activation_checkpointing, ACTIVATION_CHECKPOINTING)


def process_layout(job: "JobConfig", world_size: int) -> tuple[int, int]:
    """The checks of the job's layout on `world_size` processes (pure arithmetic: every rank refuses
    alike, before any collective); returns each rank's (micro_batch, grad_accum)."""
    from parallel.dims import validate_degrees  # imports torch.distributed: only where needed

    p = job.parallel
    validate_degrees(world_size, p.ep, job.moe.num_experts, p.pp)
    micro_batch, grad_accum = batch_layout(job.train, world_size // p.pp, p.pp)
    if p.pp > 1:
        validate_micro_batches(p.schedule, grad_accum, p.pp)
    return micro_batch, grad_accum


def batch_layout(t: TrainConfig, world_size: int, pp: int = 1) -> tuple[int, int]:
    """(micro_batch, grad_accum) of each rank, `world_size` data-parallel ranks (the processes, or
    under pipeline parallelism the ranks of one stage; see TrainConfig.global_batch)."""
    if t.global_batch is None:
        return t.micro_batch, t.grad_accum
    if t.global_batch % world_size:
        ranks = f"the number of processes ({world_size})" if pp == 1 else f"processes / parallel.pp ({world_size})"
        raise ValueError(
            f"train.global_batch={t.global_batch} must be a multiple of {ranks}: each rank takes an equal share"
        )
    share = t.global_batch // world_size
    micro_batch = max(d for d in range(1, min(share, t.micro_batch) + 1) if share % d == 0)
    return micro_batch, share // micro_batch


@dataclass
class WandbConfig:
    # "offline" (a W&B run directory in the run directory, synced later with wandb sync) | "online" | "disabled"
    mode: str = "offline"
    project: str = "switchyard"  # W&B project
    entity: Optional[str] = None  # W&B team or user (null: your default)
    group: Optional[str] = None  # W&B group (a sweep sets it to the sweep's name)
    tags: list[str] = field(default_factory=list)  # W&B tags


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress_bar: bool = True  # a progress bar on a terminal; one plain line per log_interval otherwise
    sample_tokens: int = 48  # at each evaluation, log a sampled continuation of sample_prompt this long; 0 = off
    sample_prompt: str = "ROMEO:"  # the prompt of that sample

    def validate(self) -> None:
        require_int_in("logging.sample_tokens", self.sample_tokens, 0, MAX_SEQ_LEN)
        if self.sample_tokens and not self.sample_prompt:
            raise ValueError("logging.sample_prompt must be non-empty text when logging.sample_tokens > 0")


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run_name: str = "default"  # the run directory is outputs/<run_name>
    # where the run writes: Hydra's hydra.run.dir (outputs/<run_name>); set hydra.run.dir to move it
    run_dir: str = "outputs/default"

    def gpt_config(self) -> GPTConfig:
        return GPTConfig(model=self.model, moe=self.moe)

    def validate(self) -> None:
        """Every user mistake that can be seen without data or processes -> one ValueError."""
        require_finite_numbers(self)
        self.train.validate(self.model.max_seq_len)  # first: model.max_seq_len follows train.seq_len in conf/
        self.gpt_config().validate()
        require_positive_int("parallel.ep", self.parallel.ep, MAX_EXPERTS)
        validate_zero_stage(self.deepspeed.zero_stage)
        self.parallel.validate()
        if self.parallel.pp > 1:
            num_stages = self.parallel.pp * self.parallel.stages_per_rank
            validate_split(self.parallel.split, self.model.n_layers, num_stages)
            if self.train.global_batch is None:  # else grad_accum is derived per layout (train/setup.py)
                validate_micro_batches(self.parallel.schedule, self.train.grad_accum, self.parallel.pp)
            if (
                self.moe.jitter > 0
                and self.parallel.schedule == "interleaved_1f1b"
                and self.moe.aux_loss_scope == "global_batch"
            ):
                # The routing pass runs micro-batch by micro-batch, the interleaved schedule in its own
                # order: with noise, the routing it counts would not be the routing it trains.
                raise ValueError(
                    "moe.jitter > 0 with parallel.schedule=interleaved_1f1b needs moe.aux_loss_scope micro_batch or "
                    "sequence; got moe.aux_loss_scope='global_batch' (or use parallel.schedule=1f1b)"
                )
            if self.deepspeed.zero_stage not in PIPELINE_ZERO_STAGES:
                raise ValueError(
                    f"parallel.pp={self.parallel.pp} runs with deepspeed.zero_stage "
                    f"{', '.join(map(str, PIPELINE_ZERO_STAGES))}; got {self.deepspeed.zero_stage}"
                )
        self.optim.validate()
        check_data_config(self.data)
        split_init_from(self.model.init_from)
        require_choice("logging.wandb.mode", self.logging.wandb.mode, WANDB_MODES)
        self.logging.validate()
        if self.moe.backend == "megablocks":  # its kernels are CUDA and bf16 (the machine: train/preflight.py)
            if self.train.device == "cpu":
                raise ValueError(
                    "moe.backend=megablocks runs on CUDA only; got train.device='cpu': "
                    "use train.device=cuda (or auto), or moe.backend=torch"
                )
            if self.train.dtype == "fp32":
                raise ValueError(
                    "moe.backend=megablocks runs bf16 only (grouped_gemm's kernels); got "
                    "train.dtype='fp32': use train.dtype=bf16 (or auto), or moe.backend=torch"
                )


INIT_FROM_KINDS = ("hf", "upcycle")


def split_init_from(value: str | None) -> tuple[str, str] | None:
    """model.init_from as written -> (kind, path), None when unset; a malformed value -> ValueError."""
    if value is None:
        return None
    kind, sep, path = str(value).partition(":")
    if not sep or kind not in INIT_FROM_KINDS or not path:
        raise ValueError(
            "model.init_from must be null, 'hf:<transformers dir>' or "
            f"'upcycle:<run dir or dense transformers dir>'; got {value!r}"
        )
    return kind, path


def require_finite_numbers(node, prefix: str = "") -> None:
    """No inf or nan anywhere in the job config, whatever the setting (a net under the per-setting checks)."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            require_finite_numbers(value, f"{prefix}{f.name}.")
        else:
            require_finite(f"{prefix}{f.name}", value)


def refuse_unknown_keys(cfg, schema: type | None = None, prefix: str = "") -> None:
    """Hydra's `+key=value` adds a key even to a typed node (it opens the node for the addition), and
    OmegaConf then carries it along silently: a typo like `+train.stepz=50` would change nothing and
    say nothing. Every key of the composed config must be a field of its dataclass."""
    schema = schema or JobConfig
    hints = typing.get_type_hints(schema)
    for key in cfg.keys():
        if key not in hints:
            raise ValueError(unknown_setting_message(f"{prefix}{key}"))
        if dataclasses.is_dataclass(hints[key]):
            refuse_unknown_keys(cfg[key], hints[key], f"{prefix}{key}.")


def unknown_setting_message(path: str) -> str:
    """`train.stepz: no such setting (did you mean train.steps?)`, from the schema."""
    *parents, key = path.split(".")
    schema: type = JobConfig
    for part in parents:
        hint = typing.get_type_hints(schema).get(part)
        if not dataclasses.is_dataclass(hint):
            return f"{path}: no such setting"
        schema = hint
    known = [f.name for f in dataclasses.fields(schema)]
    prefix = "".join(f"{p}." for p in parents)
    close = difflib.get_close_matches(key, known, n=2)
    if close:
        return f"{path}: no such setting (did you mean {' or '.join(prefix + c for c in close)}?)"
    return f"{path}: no such setting; {'.'.join(parents) or 'the top level'} has: {', '.join(known)}"


def register_configs() -> None:
    ConfigStore.instance().store(name="job_schema", node=JobConfig)
