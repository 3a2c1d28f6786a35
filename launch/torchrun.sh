#!/usr/bin/env bash
# One node, N processes: launch/torchrun.sh 4 parallel.ep=2 moe.num_experts=8
# Everything after the process count is passed to `python -m train` as Hydra overrides.
set -euo pipefail
nproc="${1:?usage: launch/torchrun.sh NUM_PROCESSES [overrides...]}"
shift
# Two CPU cores shared by several ranks: one thread each avoids oversubscription.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec torchrun --standalone --nproc_per_node="$nproc" -m train "$@"
