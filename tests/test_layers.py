"""The layers hold by tool, not by memory (DESIGN.md: models <- parallel <- train <- tools):

- `models/` is plain torch: nothing from torch.distributed, DeepSpeed, Hydra or the other packages;
- `parallel/` applies processes to a built model: it may import `models`, never `planner` or `train`;
- `planner/` computes on the meta device from `models` and `parallel`, never from the job (`train`);
- the job (`train/` less its command-line tools) never imports a tool; tools may import anything;
- DeepSpeed's internals (its private attributes, `deepspeed.runtime`, `deepspeed.ops`, the partition
  accessors of `deepspeed.utils`) are read by parallel/deepspeed_state.py alone: a DeepSpeed upgrade
  that moves them then breaks one module, which the ZeRO tests pin;
- ruff (lint and format, line length 120 in pyproject.toml) passes on the whole tree.

Every import counts, at module level or inside a function (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# `python -m train.<tool>`: the user commands beside the job; they may import everything.
TOOLS = {
    "train.check",
    "train.plan",
    "train.report",
    "train.specialization",
    "train.generate",
    "train.export_hf",
    "train.import_hf",
}
FORBIDDEN = {
    "models": ("torch.distributed", "deepspeed", "hydra", "omegaconf", "parallel", "planner", "train"),
    "parallel": ("planner", "train", "hydra", "omegaconf"),
    "planner": ("train", "hydra", "omegaconf"),
    "train": tuple(sorted(TOOLS)),  # the job's modules only: see module_names_under
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its code (absolute names)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def is_within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(package: str) -> list[str]:
    found = []
    for path in sorted((REPO / package).rglob("*.py")):
        module = module_name(path)
        if module in TOOLS:
            continue
        for name in sorted(imported_modules(path)):
            bad = next((f for f in FORBIDDEN[package] if is_within(name, f)), None)
            if bad is not None:
                found.append(f"{path.relative_to(REPO)} imports {name} ({package} must not import {bad})")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_follow_the_layers(package):
    assert violations(package) == []


def test_the_rule_catches_a_lazy_import(tmp_path, monkeypatch):
    """The checker itself: an import inside a function of a models/ file is found."""
    fake = tmp_path / "models"
    fake.mkdir()
    (fake / "bad.py").write_text("def f():\n    from parallel.dims import ParallelDims\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert violations("models") == [
        "models/bad.py imports parallel.dims (models must not import parallel)",
        "models/bad.py imports parallel.dims.ParallelDims (models must not import parallel)",
    ]


def test_every_package_says_what_it_owns():
    for init in [
        REPO / p / "__init__.py"
        for p in ("models", "models/moe", "parallel", "planner", "train", "train/data", "train/checkpoint", "train/hf")
    ]:
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 40, f"{init.relative_to(REPO)} needs a docstring saying what the package owns"


# -- DeepSpeed's internals in one module ------------------------------------------------------------

SOURCE_PACKAGES = ("models", "parallel", "train", "planner", "launch", "benchmarks", "tools")
DEEPSPEED_OWNER = Path("parallel/deepspeed_state.py")

# Public DeepSpeed that any module may use: the engine, its logger, its MoE layer (a benchmark's peer).
PUBLIC_DEEPSPEED_MODULES = {"deepspeed", "deepspeed.moe.layer"}
PUBLIC_DEEPSPEED_NAMES = {("deepspeed.utils", "logger")}
PUBLIC_DEEPSPEED_ATTRIBUTES = {"initialize", "init_distributed", "__version__", "comm"}
# Attributes DeepSpeed puts on parameters and on its ZeRO optimizers (parallel/deepspeed_state.py reads them).
DEEPSPEED_PRIVATE_ATTRIBUTES = {
    "ds_tensor",
    "ds_numel",
    "ds_shape",
    "ds_id",
    "ds_status",
    "ds_persist",
    "_z3_optimizer",
    "_hp_mapping",
    "_index_in_param_group",
    "hp_fragment",
    "lp_fragment_address",
    "hp_fragment_address",
    "get_lp_grad_fragment",
    "single_partition_of_fp32_groups",
    "fp32_partitioned_groups_flat",
    "bit16_groups",
    "fp16_groups",
    "averaged_gradients",
    "all_grad_tensors",
    "grad_partitions_flat_buffer",
    "ipg_buckets",
    "partition_size",
    "parallel_partitioned_bit16_groups",
    "__compatible_ops__",
}


def source_files() -> list[Path]:
    packages = [REPO / package for package in SOURCE_PACKAGES if (REPO / package).is_dir()]
    return sorted(path for package in packages for path in package.rglob("*.py"))


def deepspeed_internals(tree: ast.AST) -> list[str]:
    """Where a module reaches into DeepSpeed beyond its public surface: `line: what`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [
                f"{node.lineno}: import {a.name}"
                for a in node.names
                if a.name.startswith("deepspeed.") and a.name not in PUBLIC_DEEPSPEED_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "deepspeed":
            if node.module not in PUBLIC_DEEPSPEED_MODULES:
                found += [
                    f"{node.lineno}: from {node.module} import {a.name}"
                    for a in node.names
                    if (node.module, a.name) not in PUBLIC_DEEPSPEED_NAMES
                ]
        elif isinstance(node, ast.Attribute):
            if node.attr in DEEPSPEED_PRIVATE_ATTRIBUTES:
                found.append(f"{node.lineno}: .{node.attr}")
            elif (
                isinstance(node.value, ast.Name)
                and node.value.id == "deepspeed"
                and node.attr not in PUBLIC_DEEPSPEED_ATTRIBUTES
            ):
                found.append(f"{node.lineno}: deepspeed.{node.attr}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in DEEPSPEED_PRIVATE_ATTRIBUTES
        ):
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
    allowed = [
        "import deepspeed\ndeepspeed.initialize(model=m)",
        "from deepspeed.utils import logger",
        "from deepspeed.moe.layer import MoE",
    ]
    for source in allowed:
        assert not deepspeed_internals(ast.parse(source)), source
    assert deepspeed_internals(ast.parse((REPO / DEEPSPEED_OWNER).read_text())), "the owner itself reads them"


RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")


@pytest.mark.skipif(RUFF is None, reason="ruff is installed by the dev extra (make test)")
@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(command):
    result = subprocess.run([RUFF, *command, "."], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
