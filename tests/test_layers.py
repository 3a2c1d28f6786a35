"""Import rules, read from the source (AST), so that a change that breaks a layer fails here.

DeepSpeed's internals (its private attributes, `deepspeed.runtime`, `deepspeed.ops`, the partition
accessors of `deepspeed.utils`) are read by parallel/deepspeed_state.py alone: a DeepSpeed upgrade
that moves them then breaks one module, which the ZeRO tests pin."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "parallel", "train", "planner", "launch", "benchmarks", "tools")
DEEPSPEED_OWNER = Path("parallel/deepspeed_state.py")

# Public DeepSpeed that any module may use: the engine, its logger, its MoE layer (a benchmark's peer).
PUBLIC_DEEPSPEED_MODULES = {"deepspeed", "deepspeed.moe.layer"}
PUBLIC_DEEPSPEED_NAMES = {("deepspeed.utils", "logger")}
PUBLIC_DEEPSPEED_ATTRIBUTES = {"initialize", "init_distributed", "__version__", "comm"}
# Attributes DeepSpeed puts on parameters and on its ZeRO optimizers (parallel/deepspeed_state.py reads them).
DEEPSPEED_PRIVATE_ATTRIBUTES = {
    "ds_tensor", "ds_numel", "ds_shape", "ds_id", "ds_status", "ds_persist", "_z3_optimizer", "_hp_mapping",
    "_index_in_param_group", "hp_fragment", "lp_fragment_address", "hp_fragment_address", "get_lp_grad_fragment",
    "single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "bit16_groups", "fp16_groups",
    "averaged_gradients", "all_grad_tensors", "grad_partitions_flat_buffer", "ipg_buckets", "partition_size",
    "parallel_partitioned_bit16_groups", "__compatible_ops__",
}


def source_files() -> list[Path]:
    return sorted(path for package in PACKAGES if (REPO / package).is_dir() for path in (REPO / package).rglob("*.py"))


def deepspeed_internals(tree: ast.AST) -> list[str]:
    """Where a module reaches into DeepSpeed beyond its public surface: `line: what`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names
                      if a.name.startswith("deepspeed.") and a.name not in PUBLIC_DEEPSPEED_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "deepspeed":
            if node.module not in PUBLIC_DEEPSPEED_MODULES:
                found += [f"{node.lineno}: from {node.module} import {a.name}" for a in node.names
                          if (node.module, a.name) not in PUBLIC_DEEPSPEED_NAMES]
        elif isinstance(node, ast.Attribute):
            if node.attr in DEEPSPEED_PRIVATE_ATTRIBUTES:
                found.append(f"{node.lineno}: .{node.attr}")
            elif isinstance(node.value, ast.Name) and node.value.id == "deepspeed" \
                    and node.attr not in PUBLIC_DEEPSPEED_ATTRIBUTES:
                found.append(f"{node.lineno}: deepspeed.{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr") \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                and node.args[1].value in DEEPSPEED_PRIVATE_ATTRIBUTES:
            found.append(f"{node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
    return found


def test_only_deepspeed_state_reads_deepspeed_internals():
    offenders = {}
    for path in source_files():
        relative = path.relative_to(REPO)
        if relative == DEEPSPEED_OWNER:
            continue
        found = deepspeed_internals(ast.parse(path.read_text(), filename=str(path)))
        if found:
            offenders[str(relative)] = found
    assert not offenders, f"DeepSpeed internals outside {DEEPSPEED_OWNER}: {offenders}"


def test_the_rule_sees_what_it_forbids():
    """The check above would flag each way of reaching in (a rule that cannot fail is no rule)."""
    forbidden = [
        "from deepspeed.runtime.zero.config import DeepSpeedZeroConfig",
        "import deepspeed.ops",
        "from deepspeed.utils import safe_get_local_fp32_param",
        "n = p.ds_tensor.numel()",
        "m = p._hp_mapping",
        "b = getattr(opt, 'ipg_buckets', {})",
        "import deepspeed\ndeepspeed.ops.x = 1",
    ]
    for source in forbidden:
        assert deepspeed_internals(ast.parse(source)), source
    allowed = ["import deepspeed\ndeepspeed.initialize(model=m)", "from deepspeed.utils import logger",
               "from deepspeed.moe.layer import MoE"]
    for source in allowed:
        assert not deepspeed_internals(ast.parse(source)), source
    assert deepspeed_internals(ast.parse((REPO / DEEPSPEED_OWNER).read_text())), "the owner itself reads them"
