"""`python -m train.plan [job overrides] plan.world_size=N ...`: how much memory each rank of a
job will need, and whether it fits, without running it.

The job overrides are those of `python -m train` (composed by Hydra from conf/, validated by the
same `JobConfig.validate`); the planner's own settings start with `plan.` and are kept out of the
job's schema (`PlanConfig` below). The model is built on the meta device (nothing is allocated),
so it answers for Mixtral-sized models on a laptop. Per rank, for the dense part and the experts:

- model states, exact (planner/model_states.py mirrors DeepSpeed's and FSDP2's partitioning;
  tests/test_plan_exact.py checks them byte for byte against live multi-rank jobs): weights,
  gradients (at the accumulation boundary), optimizer state, buffers;
- activations of one micro-batch with each `train.activation_checkpointing` mode, an estimate
  (planner/activations.py; within a few % of the torch profiler's peak on CPU, fp32);
- transients (gathered weights, gradient buckets; estimates) and the all-to-all bytes per step
  (dropless, uniform routing);
- the peak per rank and a verdict against `plan.device_memory_gb` (GiB per rank).

With `parallel.pp` > 1 each rank holds its pipeline stages only (planner/pipeline.py): the figures
are those of the pipeline rank with the highest peak, with the activations of the micro-batches
its schedule keeps in flight and torch's receive buffers.

Bad input exits 2 with one line; a plan that does not fit exits 0 with a "does not fit" verdict.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass

import torch

from train.cli import compose_job, run_tool
from train.config import process_layout
from train.preflight import preflight

PLAN_PREFIX = "plan."
USAGE = "python -m train.plan [job overrides, as for python -m train] [plan.KEY=VALUE ...]"
EXAMPLE = (
    "example: python -m train.plan model.n_layers=32 model.d_model=4096 model.n_heads=32 "
    "moe.expert_ffn_hidden=14336 \\\n"
    "           model.vocab_size=32000 model.tie_embeddings=false train.seq_len=4096 train.micro_batch=1 \\\n"
    "           parallel.ep=8 deepspeed.zero_stage=1 plan.world_size=64 train.dtype=bf16 plan.device_memory_gb=80"
)


@dataclass
class PlanConfig:
    """The planner's own settings. Bytes per element are not among them: they follow the job's
    train.dtype (planner/model_states.py: element_bytes): fp32 weights, gradients and AdamW state;
    2-byte activations and all-to-all tokens under bf16 (and auto, bf16 on a GPU), 4 under fp32."""

    world_size: int = 1  # ranks (processes, one per GPU) the job runs on
    device_memory_gb: float = 80.0  # memory per rank in GiB (2^30 bytes: an "80 GB" GPU has 80 GiB)

    def validate(self) -> None:
        from models.config import require_positive_int, require_positive_number

        require_positive_int("plan.world_size", self.world_size)
        require_positive_number("plan.device_memory_gb", self.device_memory_gb)


def parse_plan_settings(overrides: list[str]) -> PlanConfig:
    """`plan.KEY=VALUE` items -> PlanConfig, each value converted to its field's type."""
    plan = PlanConfig()
    fields = {f.name: f for f in dataclasses.fields(PlanConfig)}
    for item in overrides:
        key, sep, value = item[len(PLAN_PREFIX) :].partition("=")
        if key not in fields:
            allowed = ", ".join(PLAN_PREFIX + name for name in fields)
            raise ValueError(f"{PLAN_PREFIX}{key} is not a planner setting; allowed: {allowed}")
        kind = int if fields[key].type in (int, "int") else float
        try:
            setattr(plan, key, kind(value))
        except ValueError:
            raise ValueError(
                f"{PLAN_PREFIX}{key} must be {'an integer' if kind is int else 'a number'}; got {value!r}"
            ) from None
    plan.validate()
    return plan


def check_layout(job, plan: PlanConfig) -> None:
    """The job's layout on plan.world_size ranks, refused as the job would (train/config.py:
    process_layout), said in the planner's setting."""
    ep, pp = job.parallel.ep, job.parallel.pp
    if plan.world_size % pp:
        raise ValueError(
            f"parallel.pp ({pp}) must divide plan.world_size ({plan.world_size}); "
            f"allowed: divisors of {plan.world_size}"
        )
    if pp > 1 and plan.world_size % (pp * ep):
        raise ValueError(
            f"parallel.pp x parallel.ep ({pp} x {ep}) must divide plan.world_size ({plan.world_size}); "
            f"allowed parallel.ep with parallel.pp={pp}: divisors of {plan.world_size // pp}"
        )
    if plan.world_size % ep:
        raise ValueError(
            f"parallel.ep ({ep}) must divide plan.world_size ({plan.world_size}); "
            f"allowed: divisors of {plan.world_size}"
        )
    job.train.micro_batch, job.train.grad_accum = process_layout(job, plan.world_size)  # with train.global_batch


def plan_layout(job, world_size: int):
    """The planner's Layout of the job on `world_size` ranks (pipeline settings included)."""
    from planner.model_states import Layout, element_bytes

    p = job.parallel
    split = p.split if isinstance(p.split, str) else tuple(int(c) for c in p.split)
    return Layout(
        world_size,
        p.ep,
        job.deepspeed.zero_stage,
        *element_bytes(job.train.dtype),
        pp=p.pp,
        stages_per_rank=p.stages_per_rank,
        schedule=p.schedule,
        split=split,
    )


def main(argv: list[str]) -> int:
    from train.cli import wants_help
    from train.help import job_settings_epilog, render_text, settings

    if wants_help(argv):
        print(f"usage: {USAGE}\n\n{__doc__.split(chr(10) * 2)[0]}\n")
        print(render_text(settings(PlanConfig, PLAN_PREFIX), usage=None))
        print(job_settings_epilog())
        print(EXAMPLE)
        return 0
    # The planner reads DeepSpeed's config defaults only: no accelerator probing (and its log line).
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from planner.report import build_report, render

    def plan_job() -> None:
        plan = parse_plan_settings([a for a in argv if a.startswith(PLAN_PREFIX)])
        job = compose_job([a for a in argv if not a.startswith(PLAN_PREFIX)])
        preflight(job)
        check_layout(job, plan)
        from models.gpt import GPT
        from planner.model_states import check_even_expert_sharding

        with torch.device("meta"):  # shapes only: nothing is allocated
            model = GPT(job.gpt_config())
        layout = plan_layout(job, plan.world_size)
        check_even_expert_sharding(model, layout)
        print(render(build_report(job, plan, model, layout)))

    return run_tool(plan_job)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
