#!/usr/bin/env bash
# One node, N processes: launch/torchrun.sh 4 parallel.ep=2 moe.num_experts=8
# Everything after the process count is passed to `python -m train` as Hydra overrides.
# The Python that runs it: $SWITCHYARD_PYTHON if set, else the checkout's .venv/bin/python (made by
# `make setup`/`make train`) when it exists, else python (or python3) on PATH.
set -euo pipefail
nproc="${1:?usage: launch/torchrun.sh NUM_PROCESSES [overrides...]}"
shift
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${SWITCHYARD_PYTHON:-}" ]; then python="$SWITCHYARD_PYTHON"
elif [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"
else python="$(command -v python || command -v python3 || echo python3)"
fi
# Two CPU cores shared by several ranks: one thread each avoids oversubscription.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# The settings are checked once, before any worker starts: a mistake stops here with one line
# and exit code 2, instead of N failing workers and torchrun's failure report.
"$python" -m train.check --quiet --nproc "$nproc" -- "$@" || exit $?
exec "$python" -m torch.distributed.run --standalone --nproc_per_node="$nproc" -m train "$@"
