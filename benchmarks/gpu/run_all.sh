#!/usr/bin/env bash
# The GPU kit: everything Switchyard needs checked on a lent GPU, in one call (see README.md here).
#
#   bash benchmarks/gpu/run_all.sh                  # stage 1, then stage 2 (on the GPU machine)
#   bash benchmarks/gpu/run_all.sh --stage 1        # or one stage per call (stage 2 reuses stage 1's installs)
#   bash benchmarks/gpu/run_all.sh --cpu-rehearsal  # the same steps on a CPU with the repo's venv, CUDA steps skipped
#
# Stage 1 (< 6 min on one H100): install the carried wheels (--no-deps --target), probe the torch
# APIs, check the bf16 grouped_mm against the loop oracle on CUDA, measure the bf16 matmul peak,
# count host syncs per step, time one MoE layer, train the default model in bf16 (ZeRO-0 with eval,
# sample, checkpoint and resume; ZeRO-3 with full activation checkpointing; grad_accum 2), and pack
# the results. Stage 2, only once stage 1's results are saved: compile grouped_gemm and MegaBlocks,
# check moe.backend=megablocks against the oracle, time it beside torch and MegaBlocks' own dMoE,
# and train with it.
#
# Every step is time-boxed (timeout) and logged; a failed step is recorded and the next one runs.
# Results: $KIT_DIR (default /tmp/switchyard-kit); when $OUT is set (the device tool), the summary,
# the status table and one tarball per stage are copied there (it takes back at most 8 files).
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
REHEARSAL=0
STAGES="1 2"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cpu-rehearsal) REHEARSAL=1 ;;
        --stage) STAGES="$2"; shift ;;
        *) echo "run_all.sh: unknown argument $1 (use --cpu-rehearsal, --stage 1|2)" >&2; exit 2 ;;
    esac
    shift
done

KIT_DIR="${KIT_DIR:-/tmp/switchyard-kit}"
WHEELS="${WHEELS:-$HERE/wheels}"
SITE="$HERE/site"  # git-ignored: a warm machine keeps it between calls
mkdir -p "$KIT_DIR/runs"
STATUS="$KIT_DIR/status.tsv"
export SWITCHYARD_CACHE="${SWITCHYARD_CACHE:-$KIT_DIR/cache}"
export PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda
if [[ $REHEARSAL == 1 ]]; then
    PYTHON="${PYTHON:-python3}"  # the repo's environment: nothing is installed
    export PYTHONPATH="$REPO" DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1
    # Toy sizes: the same code paths, in seconds, on a CPU.
    JOB=(model=tiny moe.num_experts=4 moe.expert_ffn_hidden=64 data.tokenizer.kind=bytes train.seq_len=64
         train.micro_batch=4 train.eval_batches=2 logging.wandb.mode=disabled logging.sample_tokens=8 train.device=cpu)
    STEPS=4; HALF=2
else
    PYTHON="${PYTHON:-python3}"  # the image's, which holds torch 2.11
    export PYTHONPATH="$REPO:$SITE"
    JOB=(train.device=cuda)  # the default model and data, as `python -m train` runs them
    STEPS=40; HALF=20
fi
JOB+=(train.dtype=bf16 logging.progress_bar=false train.log_interval=10)
cd "$REPO"

# Each stage has a wall-clock budget; a step gets its own limit or what is left of the stage's,
# whichever is less, and is skipped when under 10 s are left.
if [[ $REHEARSAL == 1 ]]; then  # a shared CPU runs the same steps several times slower
    STAGE1_BUDGET="${STAGE1_BUDGET:-900}"
else
    STAGE1_BUDGET="${STAGE1_BUDGET:-340}"  # stage 1 ends within 6 min with the packing
fi
STAGE2_BUDGET="${STAGE2_BUDGET:-480}"
DEADLINE=0

# step NAME SECONDS COMMAND...: run it time-boxed, log to $KIT_DIR/NAME.log, record the verdict.
step() {
    local name="$1" limit="$2" t0 rc verdict left
    shift 2
    t0=$(date +%s)
    left=$((DEADLINE - t0))
    if ((left < 10)); then skip "$name" "stage budget spent"; return; fi
    ((limit > left)) && limit=$left
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" >"$KIT_DIR/$name.log" 2>&1
    rc=$?
    case $rc in 0) verdict=ok ;; 124 | 137) verdict="timed out" ;; *) verdict="failed (exit $rc)" ;; esac
    printf '%s\t%s\t%s\n' "$name" "$verdict" "$(($(date +%s) - t0))" >>"$STATUS"
    echo "   $verdict in $(($(date +%s) - t0)) s"
    [[ $rc == 0 ]] || tail -5 "$KIT_DIR/$name.log" | sed 's/^/   | /'
}
skip() { printf '%s\t%s\t0\n' "$1" "skipped: $2" >>"$STATUS"; echo "== $1: skipped ($2)"; }
gpu_step() { if [[ $REHEARSAL == 1 ]]; then skip "$1" "needs CUDA"; else step "$@"; fi; }

train_step() {  # train_step STEP SECONDS RUN_NAME OVERRIDES...: one job, its run directory under $KIT_DIR/runs
    local name="$1" limit="$2" run="$3"
    shift 3
    step "$name" "$limit" "$PYTHON" -m train "${JOB[@]}" "run_name=$run" "hydra.run.dir=$KIT_DIR/runs/$run" "$@"
}

pack() {  # pack TARBALL: the results so far (logs, JSON, metrics; no checkpoints) -> $OUT
    "$PYTHON" "$HERE/kit.py" summary --out "$KIT_DIR" >/dev/null 2>&1
    local tarball
    tarball="$(mktemp)"
    tar -czf "$tarball" -C "$KIT_DIR" --exclude='checkpoints' --exclude='cache' --exclude='*.tar.gz' --exclude='wandb' .
    mv "$tarball" "$KIT_DIR/$1"
    if [[ -n "${OUT:-}" ]]; then cp "$KIT_DIR/$1" "$KIT_DIR/summary.md" "$STATUS" "$OUT/"; fi
    echo "packed $KIT_DIR/$1${OUT:+ and copied it to \$OUT}"
}

install_carried() {
    mkdir -p "$SITE" "$SWITCHYARD_CACHE/wheels"
    # Which carried packages the image already had (there should be none: fetch_wheels.sh takes only what it lacks).
    "$PYTHON" - "$WHEELS" <<'PY'
import importlib.metadata as md, pathlib, sys
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*/*.whl")):
    name = wheel.name.split("-")[0]
    try:
        print(f"already in the image: {name} {md.version(name)} (carried {wheel.name})")
    except md.PackageNotFoundError:
        print(f"carried: {wheel.name}")
PY
    # --upgrade: a warm machine may hold an earlier install in $SITE, which --target would otherwise keep
    "$PYTHON" -m pip install --quiet --no-deps --no-index --upgrade --target "$SITE" "$WHEELS"/wheels/*.whl \
        "$WHEELS"/built/*.whl
    cp "$WHEELS"/corpus/*.whl "$SWITCHYARD_CACHE/wheels/"  # the classics corpus reads them as zips
}
export -f install_carried
export PYTHON WHEELS SITE

stage1() {
    : >"$STATUS"
    DEADLINE=$(($(date +%s) + STAGE1_BUDGET))
    if [[ $REHEARSAL == 1 ]]; then skip install "the repo's environment is used"; else step install 120 bash -c install_carried; fi
    step probe_torch_api 60 "$PYTHON" "$HERE/probe_torch_api.py" --json "$KIT_DIR/probe_torch_api.json"
    gpu_step grouped_mm_vs_loop 90 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_experts.py -k grouped_mm \
        --junitxml "$KIT_DIR/grouped_mm_vs_loop.xml"
    step peak 60 "$PYTHON" "$HERE/kit.py" peak --out "$KIT_DIR"
    local peak
    peak=$("$PYTHON" -c "import json; print(round(json.load(open('$KIT_DIR/peak.json'))['bf16_tflops'], 1))" 2>/dev/null)
    [[ $REHEARSAL == 0 && -n "$peak" ]] && JOB+=("train.peak_tflops=$peak")  # MFU over the peak measured here
    train_step zero0_train 120 zero0 "train.steps=$HALF" "train.eval_interval=$HALF" "train.ckpt_interval=$HALF"
    train_step zero0_resume 90 zero0 "train.steps=$STEPS" "train.eval_interval=$HALF" "train.ckpt_interval=$HALF" train.resume=true
    step zero0_sample 60 "$PYTHON" -m train.generate "$KIT_DIR/runs/zero0" --prompt "ROMEO:" --max-new-tokens 32
    train_step zero3_full_ac 120 zero3_full_ac deepspeed=zero3 train.activation_checkpointing=full "train.steps=$HALF" \
        "train.eval_interval=$HALF" "train.ckpt_interval=$HALF"
    train_step grad_accum2 90 grad_accum2 train.grad_accum=2 "train.steps=$HALF" "train.eval_interval=$HALF" \
        "train.ckpt_interval=$HALF"
    step sync_count 90 "$PYTHON" "$HERE/kit.py" sync-count --out "$KIT_DIR" -- "${JOB[@]}"
    step sync_count_accum2 90 "$PYTHON" "$HERE/kit.py" sync-count --name sync_count_accum2 --out "$KIT_DIR" -- \
        "${JOB[@]}" train.grad_accum=2
    step moe_layer 120 "$PYTHON" "$HERE/kit.py" moe-layer --out "$KIT_DIR"
    pack kit_stage1.tar.gz
}

stage2() {
    if [[ $REHEARSAL == 1 ]]; then
        for s in build_megablocks megablocks_vs_loop moe_layer_megablocks megablocks_train; do skip "$s" "needs CUDA"; done
        pack kit_stage2.tar.gz
        return
    fi
    DEADLINE=$(($(date +%s) + STAGE2_BUDGET))
    # Compiled here, on the GPU machine, after stage 1 is saved: sm_90 only, every core.
    step build_megablocks 300 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" "$PYTHON" -m pip install --no-deps \
        --no-build-isolation --no-index --target "$SITE" "$WHEELS"/src/grouped_gemm-*.tar.gz "$WHEELS"/src/megablocks-*.tar.gz
    step megablocks_vs_loop 90 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_experts.py -k megablocks \
        --junitxml "$KIT_DIR/megablocks_vs_loop.xml"
    step moe_layer_megablocks 150 "$PYTHON" "$HERE/kit.py" moe-layer --name moe_layer_megablocks --out "$KIT_DIR" \
        --backends torch megablocks dmoe
    train_step megablocks_train 90 megablocks moe.backend=megablocks "train.steps=$HALF" "train.eval_interval=$HALF" \
        "train.ckpt_interval=$HALF"
    pack kit_stage2.tar.gz
}

for s in $STAGES; do
    case "$s" in 1) stage1 ;; 2) stage2 ;; *) echo "run_all.sh: --stage must be 1 or 2" >&2; exit 2 ;; esac
done
cat "$KIT_DIR/summary.md"
# Exit 1 when any step failed or timed out, so a CI rehearsal notices.
! cut -f2 "$STATUS" | grep -qE '^(failed|timed out)'
