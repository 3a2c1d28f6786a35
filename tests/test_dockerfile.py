"""The container recipe, checked without a Docker engine: hadolint, and every package it installs
is one the project declares (pyproject dependencies, or the Makefile's set-up recipes)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

from tests.jobs import REPO


def pip_packages(text: str) -> set[str]:
    """Package names from every `pip install ...` in a Dockerfile or Makefile."""
    names = set()
    for command in re.findall(r"pip install ([^\n&\\]+)", text):
        for word in command.split():
            word = word.strip("\"'")
            if word.startswith(("-", "$", "http")) or word in (".", "${TORCH_INDEX}"):
                continue
            name = re.split(r"[<>=\[ ]", word)[0].lower()
            if name:
                names.add(name)
    return names


def declared_packages() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    names = {re.split(r"[<>=\[ ;]", r)[0].lower() for r in requirements}
    return names | pip_packages((REPO / "Makefile").read_text())


def test_dockerfile_installs_only_declared_packages():
    installed = pip_packages((REPO / "Dockerfile").read_text())
    assert {"torch", "deepspeed", "megablocks", "grouped_gemm"} <= installed
    assert installed <= declared_packages(), installed - declared_packages()


def test_dockerfile_builds_the_cuda_extensions_without_a_gpu():
    """MegaBlocks' and grouped_gemm's setup.py ask the GPU for its compute capability unless
    TORCH_CUDA_ARCH_LIST names the targets; `docker build` has no GPU."""
    dockerfile = (REPO / "Dockerfile").read_text()
    runs = re.split(r"\n(?=[A-Z]+ )", dockerfile)
    build = next(r for r in runs if r.startswith("RUN") and "megablocks==" in r)
    assert "grouped_gemm==" in build
    assert re.search(r'TORCH_CUDA_ARCH_LIST="\$\{TORCH_CUDA_ARCH_LIST\}"', build), build
    assert re.search(r'^ARG TORCH_CUDA_ARCH_LIST="[0-9.;]+"$', dockerfile, re.M)


def test_dockerfile_copies_every_package_pyproject_installs():
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    dockerfile = (REPO / "Dockerfile").read_text()
    missing = [p.rstrip("*") for p in include if f"COPY {p.rstrip('*')} ./{p.rstrip('*')}" not in dockerfile]
    assert not missing, f"pip install -e . in the image would lack {missing}"


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")  # from the dev extra
    done = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
