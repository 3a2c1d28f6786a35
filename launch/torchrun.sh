#!/usr/bin/env bash
# One node, N processes: launch/torchrun.sh 4 parallel.ep=2 moe.num_experts=8
# Everything after the process count is passed to `python -m train` as Hydra overrides.
set -euo pipefail
nproc="${1:?usage: launch/torchrun.sh NUM_PROCESSES [overrides...]}"
shift
python="${PYTHON:-python}"
# Two CPU cores shared by several ranks: one thread each avoids oversubscription.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# The settings are checked once, before any worker starts: a mistake stops here with one line
# and exit code 2, instead of N failing workers and torchrun's failure report.
"$python" -m train.check --nproc "$nproc" -- "$@" || exit $?
exec "$python" -m torch.distributed.run --standalone --nproc_per_node="$nproc" -m train "$@"
