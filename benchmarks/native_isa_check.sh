#!/usr/bin/env bash
# Build the native CPU backend (dfqvit._C) on this host and run its bit-exactness tests for every ISA the CPU
# has: on an AVX2-only host the 92 AVX-512 VNNI and 92 AMX-INT8 tests skip (counts of 2026-12-02). The first VNNI
# GEMM kernel (micro_nibble_vnni) ran on hardware on 2026-12-01 (an AMD EPYC VM with avx512_vnni: 252 passed,
# results/native_isa_check_20261201_vnni/), the AMX one (micro_codes_amx) on 2026-12-02 (a Xeon VM with amx_int8:
# 323 passed, results/native_isa_check_20261202_amx/). Its successor micro_planes_vnni and the AVX-512 attention
# passed the suite on a Zen 5 VM later that day (300 native tests, the 87 AMX ones skipped).
#   OUT=/path/for/results bash benchmarks/native_isa_check.sh        (about 2 min; the log lands in $OUT)
# Exits with the failing step's status (missing cmake / ninja: 1, the pip build, pytest), 0 when all pass.
# CXX=clang++ builds with Clang instead (needs the OpenMP runtime: Debian's libomp-dev); the log names the compiler.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/native_isa_check}
mkdir -p "$OUT"
LOG="$OUT/native_isa_check.log"
# The steps run in a function whose output goes through a pipeline; its status is the script's exit status (an
# `exit 1` in a `{ ...; } | tee` group only left the pipeline's subshell, and the script ended with `head`: exit 0).
checks() {
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)  cores: $(nproc)"
  echo "avx512_vnni: $(grep -q -w avx512_vnni /proc/cpuinfo && echo yes || echo no)"
  echo "amx_int8: $(grep -q -w amx_int8 /proc/cpuinfo && echo yes || echo no)"
  echo "compiler: $(${CXX:-c++} --version | head -1)"
  if ! python3 -c "import cmake, ninja" 2>/dev/null && ! { command -v cmake && command -v ninja; } >/dev/null; then
    echo "cmake / ninja missing: pip install cmake ninja, then run this again"; return 1
  fi
  DFQVIT_BUILD_EXT=1 python3 -m pip install -q --no-deps --no-build-isolation -e . || {
    status=$?; echo "pip install of the extension failed (exit $status)"; return "$status"; }
  python3 -c "import dfqvit.kernels.native as n; print('native ISA detected:', n.detected_isa(), 'active:', n.isa())"
  timeout "${LIMIT:-300}" python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels_native.py
  status=$?
  echo "pytest exit $status"
  return "$status"
}
checks 2>&1 | tee "$LOG" | grep -v "^\s*$" | tail -25
status=${PIPESTATUS[0]}
head -2 "$LOG"
exit "$status"
