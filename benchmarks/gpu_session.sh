#!/usr/bin/env bash
# One prepared GPU check for a session that is lent a CUDA machine for a few minutes: the most important
# measurement first, each step under its own timeout so a slow Triton JIT cannot eat the others.
#   OUT=/path/for/logs bash benchmarks/gpu_session.sh [seconds per step, default 150]
# Results (JSON/markdown) land in benchmarks/results/ and are copied to $OUT with every log.
set -uo pipefail
cd "$(dirname "$0")/.."
STEP=${1:-150}
OUT=${OUT:-benchmarks/results/gpu_session_logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DFQVIT_BUILD_EXT=0
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { tail -5 "$OUT/install.log"; exit 1; }
python3 -c "import torch, triton, timm; print('device', torch.cuda.get_device_name(0), 'torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)" | tee "$OUT/env.log"
step() {  # name, command...
    local name=$1; shift
    echo "== $name (limit ${STEP}s)"
    timeout "$STEP" "$@" 2>&1 | tee "$OUT/$name.log" | tail -25
    echo "== $name exit ${PIPESTATUS[0]}"
}
step latency python3 benchmarks/latency.py --models deit_small_patch16_224 --batches 1 64 --warmup 5 --iters 20
step kernels python3 benchmarks/kernels.py --models deit_s --batches 64 256
step gpu_tests python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/
step synthesis python3 benchmarks/synthesis.py --shape deit_s --iterations 100
# only what this run wrote (the device tool brings back at most 8 files)
find benchmarks/results -maxdepth 1 -type f -newer "$OUT/env.log" \( -name '*.json' -o -name '*.md' \) -exec cp {} "$OUT"/ \;
