"""The layers hold by tool, not by memory (DESIGN.md: models <- parallel <- train <- tools):

- `models/` is plain torch: nothing from torch.distributed, DeepSpeed, Hydra or the other packages;
- `parallel/` applies processes to a built model: it may import `models`, never `planner` or `train`;
- `planner/` computes on the meta device from `models` and `parallel`, never from the job (`train`);
- the job (`train/` less its command-line tools) never imports a tool; tools may import anything;
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
TOOLS = {"train.check", "train.plan", "train.report", "train.specialization", "train.generate", "train.export_hf",
         "train.import_hf"}
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
    assert violations("models") == ["models/bad.py imports parallel.dims (models must not import parallel)",
                                     "models/bad.py imports parallel.dims.ParallelDims (models must not import parallel)"]


def test_every_package_says_what_it_owns():
    for init in [REPO / p / "__init__.py" for p in ("models", "models/moe", "parallel", "planner", "train",
                                                    "train/data", "train/checkpoint", "train/hf")]:
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 40, f"{init.relative_to(REPO)} needs a docstring saying what the package owns"


RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")


@pytest.mark.skipif(RUFF is None, reason="ruff is installed by the dev extra (make test)")
@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(command):
    result = subprocess.run([RUFF, *command, "."], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
