"""Typed job configuration: dataclasses registered in Hydra's ConfigStore; YAML under conf/ only
overrides them, so a misspelt key or a wrong type fails at composition time.

`validate()` checks the cross-field rules once, before any process group or heavy work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore

from models.config import GPTConfig, ModelConfig, MoEConfig, require_choice, require_positive_int
from parallel.zero import validate_zero_stage

CORPORA = ("classics", "files", "hub")
TOKENIZER_KINDS = ("bpe", "file", "hub", "bytes")
WANDB_MODES = ("offline", "online", "disabled")
DTYPES = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ParallelConfig:
    ep: int = 1  # expert-parallel degree: ranks that split moe.num_experts between them


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0  # ZeRO stage for the dense weights: 0, 1, 2 or 3 (experts stay whole on their EP rank)


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
    text_field: str = "text"
    val_fraction: float = 0.01
    cache_dir: str = "~/.cache/switchyard"
    num_proc: int = 2
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = off


@dataclass
class TrainConfig:
    steps: int = 400
    micro_batch: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    seed: int = 1234
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    dtype: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU) | "fp32" | "bf16"
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 8
    ckpt_interval: int = 200
    resume: bool = False
    max_bad_steps: int = 5  # consecutive non-finite-loss steps (each skipped) before the run stops
    stop_at: Optional[int] = None  # end this invocation after this step, with a checkpoint (time-boxed jobs)
    peak_tflops: Optional[float] = None  # for MFU; null = measured table on known GPUs, none on CPU


@dataclass
class WandbConfig:
    mode: str = "offline"  # "offline" | "online" | "disabled"
    project: str = "switchyard"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress_bar: bool = True


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
    run_name: str = "default"
    run_dir: str = "outputs/default"  # set to Hydra's output dir by the entry point

    def gpt_config(self) -> GPTConfig:
        return GPTConfig(model=self.model, moe=self.moe)

    def validate(self) -> None:
        """Every user mistake that can be seen without data or processes -> one ValueError."""
        self.gpt_config().validate()
        require_positive_int("parallel.ep", self.parallel.ep)
        validate_zero_stage(self.deepspeed.zero_stage)
        require_positive_int("train.max_bad_steps", self.train.max_bad_steps)
        t = self.train
        for name in ("steps", "micro_batch", "seq_len", "grad_accum", "log_interval", "eval_interval", "eval_batches", "ckpt_interval"):
            require_positive_int(f"train.{name}", getattr(t, name))
        if t.stop_at is not None:
            require_positive_int("train.stop_at", t.stop_at)
        if t.seq_len > self.model.max_seq_len:
            raise ValueError(f"train.seq_len ({t.seq_len}) must be <= model.max_seq_len ({self.model.max_seq_len})")
        require_choice("train.device", t.device, DEVICES)
        require_choice("train.dtype", t.dtype, DTYPES)
        from train.data.prepare import check_data_config  # local: train.data imports this module

        check_data_config(self.data)
        from train.init_from import check_init_from  # local: it reads run directories through this module

        check_init_from(self)
        require_choice("logging.wandb.mode", self.logging.wandb.mode, WANDB_MODES)
        if self.moe.backend == "megablocks":
            _check_megablocks_available()
        o = self.optim
        if not o.lr > 0:
            raise ValueError(f"optim.lr must be > 0; got {o.lr!r}")
        if not 0 <= o.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1]; got {o.min_lr_ratio!r}")
        if o.warmup_steps < 0 or o.grad_clip < 0 or o.weight_decay < 0:
            raise ValueError("optim.warmup_steps, optim.grad_clip and optim.weight_decay must be >= 0")


def _check_megablocks_available() -> None:
    import importlib.util

    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("megablocks") is None:
        raise ValueError(
            "moe.backend=megablocks needs CUDA and the megablocks package (make setup-gpu); "
            "this machine lacks one of them: use moe.backend=torch"
        )
    raise ValueError("moe.backend=megablocks is not implemented in this version yet: use moe.backend=torch")


def register_configs() -> None:
    ConfigStore.instance().store(name="job_schema", node=JobConfig)
