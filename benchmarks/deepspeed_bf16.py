"""What DeepSpeed 0.19.8's own bf16 mode would do to the dense weights, against our recipe, ZeRO 0-3.

    python benchmarks/deepspeed_bf16.py            # see benchmarks/README.md and README "Mixed precision"

Two ranks over gloo on CPU; a 2-layer MLP (1,072 parameters) takes 2 optimizer steps of 2
micro-batches each, with the DeepSpeed config Switchyard uses (parallel/zero.py: deepspeed_config,
our AdamW, no clipping, DeepSpeed's norm off where its config allows), under three precisions:
- ours: the module stays fp32 and runs under bf16 autocast (train.dtype=bf16 today);
- ds-bf16: DeepSpeed's `"bf16": {"enabled": true}` as it comes (bf16 gradients, bf16 reduction);
- ds-bf16-fp32-grads: the same with `data_types.grad_accum_dtype: fp32` and
  `communication_data_type: fp32` (fp32 accumulation and reduction).
For each it prints whether DeepSpeed accepts it (else its error and where it is raised), the
optimizer DeepSpeed wraps ours in, the dtype the module's weights are kept in, and the elements
every collective carried during the steps, by collective and dtype (from a TorchDispatchMode on
the c10d ops: what goes on the wire). Counts, not timings: they do not depend on the machine.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

PRECISIONS = {
    "ours": None,
    "ds-bf16": {"bf16": {"enabled": True}},
    "ds-bf16-fp32-grads": {
        "bf16": {"enabled": True},
        "data_types": {"grad_accum_dtype": "fp32"},
        "communication_data_type": "fp32",
    },
}
STEPS, GRAD_ACCUM, MICRO_BATCH = 2, 2, 2


class WireCounter(TorchDispatchMode):
    """Elements each collective carries, by (collective, dtype)."""

    def __init__(self):
        super().__init__()
        self.elements: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            tensors = [t for t in tree_leaves(args) if isinstance(t, torch.Tensor)]
            if tensors:
                key = f"{func.__name__.split('.')[0].strip('_')} {str(tensors[0].dtype).removeprefix('torch.')}"
                self.elements[key] = self.elements.get(key, 0) + tensors[0].numel()
        return func(*args, **(kwargs or {}))


def _rank(rank: int, world_size: int, zero_stage: int, precision: str, out: dict) -> None:
    import deepspeed
    import torch.distributed as dist

    from parallel.deepspeed_state import skip_deepspeed_shm_op, skip_zero3_grad_norm
    from parallel.zero import deepspeed_config

    dist.init_process_group("gloo")
    skip_deepspeed_shm_op()
    deepspeed.init_distributed(dist_init_required=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = deepspeed_config(zero_stage, MICRO_BATCH, GRAD_ACCUM, world_size, d_model=16)
    config.update(PRECISIONS[precision] or {})
    try:
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False
        )
        skip_zero3_grad_norm(engine)
        weight_dtype = next(engine.module.parameters()).dtype
        wire = WireCounter()
        with wire:
            for _ in range(STEPS * GRAD_ACCUM):
                x = torch.randn(MICRO_BATCH, 16, dtype=weight_dtype)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "ours"):
                    loss = engine(x).float().square().mean()
                engine.backward(loss)
                engine.step()
        result = {
            "optimizer": type(engine.optimizer).__name__,
            "weights": str(weight_dtype).removeprefix("torch."),
            "wire": ", ".join(f"{k} {v:,}" for k, v in sorted(wire.elements.items())),
        }
    except Exception as error:  # what DeepSpeed refuses, and where
        where = traceback.extract_tb(error.__traceback__)[-1]
        line = str(error).splitlines()[0]
        result = {
            "error": f"{type(error).__name__}: {line} ({where.filename.split('site-packages/')[-1]}:{where.lineno})"
        }
    if rank == 0:
        out.update(result)


def _entry(rank, world_size, zero_stage, precision, path):
    import json

    out: dict = {}
    _rank(rank, world_size, zero_stage, precision, out)
    if rank == 0:
        Path(path).write_text(json.dumps(out))


def main() -> None:
    import json
    import tempfile

    from parallel.local_launch import run_local_ranks

    print(f"2 ranks, {STEPS} steps x {GRAD_ACCUM} micro-batches, 1,072 dense parameters; elements on the wire")
    for zero_stage in (0, 1, 2, 3):
        for precision in PRECISIONS:
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                run_local_ranks(2, _entry, zero_stage, precision, f.name)
                result = json.loads(Path(f.name).read_text())
            if "error" in result:
                print(f"ZeRO-{zero_stage} {precision}: {result['error']}")
            else:
                kept = f"{result['optimizer']}, weights {result['weights']}"
                print(f"ZeRO-{zero_stage} {precision}: {kept}; {result['wire']}")


if __name__ == "__main__":
    main()
