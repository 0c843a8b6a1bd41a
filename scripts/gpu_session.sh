#!/usr/bin/env bash
# One device call of a GPU session (issue 23, docs/performance.md): install the wheels
# scripts/gpu_wheels.sh put in .whl/, check the imports, build real-size random weights once, then
# run the benchmarks named, each under its own time limit so one slow phase cannot eat the call.
# Rows print as they are measured and each JSON is rewritten per row, under $OUT.
#
# Usage (the device tool's run, carry [".whl"]):
#   bash scripts/gpu_session.sh [gpu] [compile] [train]      (default: gpu)
# Limits in seconds, per phase: GPU_S (default 330), COMPILE_S (300), TRAIN_S (240).
# gpu: benchmark_gpu.py --compile off; compile: setup, then the compiled rows alone (a second call
# on the still-warm machine finds the weights built); train: benchmark_train.py at 1024, batch 1.
# GPU_TINY=1 runs the same on the tiny weights, on any machine, to check the script for free
# (GPU_PYTHON, GPU_WHEELS: another interpreter and wheel folder, to imitate the machine here).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/gpu-out}
WEIGHTS=${GPU_WEIGHTS:-/tmp/full-weights}
size=(--full-size) tiny=() resolution=1024
[ -n "${GPU_TINY:-}" ] && size=() tiny=(--tiny --steps 2) resolution=256
PYTHON=${GPU_PYTHON:-python3}
mkdir -p "$OUT"
phases=${*:-gpu}
stamp=$(date -u +%F)

$PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${GPU_WHEELS:-.whl}"/*.whl \
    || { echo "wheel install failed: run scripts/gpu_wheels.sh here first and carry .whl"; exit 1; }
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm --format=csv || true
$PYTHON - <<'EOF' || exit 1
import importlib.metadata as m
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
for name in ("diffusers", "transformers", "huggingface-hub", "compel", "peft", "accelerate", "safetensors", "numpy"):
    print(name, m.version(name))
import engine.generator, weights, training.trainer  # noqa: E401,F401  the project imports on this stack
EOF

if [ ! -f "$WEIGHTS/.built" ]; then
    start=$(date +%s)
    $PYTHON scripts/build_tiny_weights.py "${size[@]}" --out "$WEIGHTS" >"$OUT/build.log" 2>&1 \
        || { tail -20 "$OUT/build.log"; exit 1; }
    touch "$WEIGHTS/.built"
    echo "full-size random weights built in $(($(date +%s) - start)) s ($(du -sh "$WEIGHTS" | cut -f1))"
fi

run_phase() {  # name, limit, command...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | grep -v "^\[transformers\]" | tee "$OUT/$name.log"
    echo "== $name exit ${PIPESTATUS[0]}"
}
for phase in $phases; do
    case $phase in
        gpu) run_phase "gpu-$stamp" "${GPU_S:-330}" $PYTHON scripts/benchmark_gpu.py --weights "$WEIGHTS" \
            "${tiny[@]}" --runs 3 --compile off --json "$OUT/gpu-h200-$stamp.json" ;;
        compile) run_phase "compile-$stamp" "${COMPILE_S:-300}" $PYTHON scripts/benchmark_gpu.py --weights "$WEIGHTS" \
            "${tiny[@]}" --runs 2 --compile only --json "$OUT/gpu-h200-compiled-$stamp.json" ;;
        train) run_phase "train-$stamp" "${TRAIN_S:-240}" $PYTHON scripts/benchmark_train.py --weights "$WEIGHTS" \
            --steps 30 --resolution "$resolution" --batch 1 --model sdxl \
            --optimizer adamw prodigy lion adafactor adamw8bit --json "$OUT/train-h200-$stamp.json" ;;
        *) echo "unknown phase $phase (gpu, compile, train)"; exit 2 ;;
    esac
done
nvidia-smi --query-gpu=memory.used,clocks.sm --format=csv || true
