#!/usr/bin/env bash
# One prepared GPU check for a session lent a CUDA machine for a few minutes: the most important
# measurement first, each step under its own timeout so a slow step cannot eat the others.
#   OUT=/path/for/results bash benchmarks/gpu_session.sh
# Everything (one log, the latency JSON/markdown) lands in $OUT: at most 8 files come back from the device.
# Kernels that fail to compile for the GPU are caught without one: python -m dfqvit.kernels.compile_check.
# The host's CPU may have AVX-512 VNNI (the native VNNI kernel has run on one AVX-512 VM so far): with time
# left, OUT=$OUT bash benchmarks/native_isa_check.sh (a separate command, ~2 min) builds it and runs its tests.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_session}
mkdir -p "$OUT"
LOG="$OUT/session.log"
export PYTHONUNBUFFERED=1 DFQVIT_BUILD_EXT=0 DFQVIT_AUTOTUNE=quick
# The CIFAR reference model and images, when carried as .gpu_shared (the GPU tests read ../shared).
if [ -d .gpu_shared ] && [ ! -e ../shared ]; then ln -s "$PWD/.gpu_shared" ../shared; fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || { tail -5 "$LOG"; exit 1; }
python3 -c "import torch, triton, timm; print('device', torch.cuda.get_device_name(0), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'timm', timm.__version__)" 2>&1 | tee -a "$LOG"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv 2>&1 | tee -a "$LOG"
step() {  # name, seconds, command...
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s) $(date +%T)" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG" | grep -v "^\s*$" | tail -40
    echo "== $name exit ${PIPESTATUS[0]} $(date +%T)" | tee -a "$LOG"
}
LAT="python3 benchmarks/latency.py --warmup 5 --iters 30 --out-dir $OUT"
# Measured 2026-11-30 on an H200: DeiT-S + ViT-B W4A8 with three baselines at batch 64 and 1 took ~170 s.
# The magic-constant rint / exp2 / int->float of kernels/_common.py, compiled (a few seconds).
step gpu_math ${STEP0:-30} python3 -m pytest -q -p no:cacheprovider tests/test_kernels_common.py
step gpu_tests ${STEP1:-140} python3 -m pytest -q -m gpu -p no:cacheprovider -rs tests/test_kernels_qgemm.py tests/test_kernels_attention.py tests/test_engine_model.py
# The engine at W4A8 side by side with its two earlier forms, against fp16 CUDA graphs and torch.compile:
# "fused-GEMM" (in-loop unpack at every batch; unpack-first from 1024 rows is the default since 2026-12-01)
# and "exact-softmax" (the portable softmax math; log-domain codes are the CUDA default since 2026-12-01).
step latency_ab ${STEP2:-200} $LAT --models deit_small_patch16_224 --batches 64 1 --bits W4A8 --gemm-paths default fused --softmax-maths default exact --baselines graphs compile --profile
step latency_vitb_swin ${STEP3:-110} $LAT --models vit_base_patch16_224 swin_small_patch4_window7_224 --batches 64 8 --bits W4A8 --baselines graphs compile
# Not in the 600 s of one command (run next, or in a later session): the other bit widths,
#   $LAT --models deit_small_patch16_224 --batches 64 1 --bits W8A8 W4A4 W3A16 --gemm-paths default fused --baselines graphs
step kernels ${STEP4:-90} python3 benchmarks/kernels.py --models deit_s --batches 64 --out "$OUT"
