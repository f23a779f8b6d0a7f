"""Compile every Triton kernel variant the engine launches for a CUDA GPU, on a machine without one.

The interpreter (``TRITON_INTERPRET=1``, how CI runs the kernels) accepts code the GPU compiler rejects
(dtype mixes, tl.dot shapes below the tensor-core minimum, register blow-ups), and GPU time is scarce.
This runs Triton's real pipeline — TTIR, TTGIR, LLVM, PTX and ``ptxas`` (shipped in the triton wheel) —
for ``sm_<arch>`` through the public launchers, with the CUDA driver replaced by a stand-in that only
names the target and a JIT that compiles instead of launching. Nothing is executed.

    python -m dfqvit.kernels.compile_check [--arch 90] [--full]

Must run in a process where ``TRITON_INTERPRET`` is unset (the kernels are fixed as interpreted or
compiled when ``dfqvit.kernels`` is imported). Prints one line per variant; exit 1 if any fails.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import Callable, List, Tuple

import torch


def install_compile_only_driver(arch: int) -> List[Tuple[str, float]]:
    """Make Triton compile for ``sm_<arch>`` without CUDA and turn every launch into a compile; return
    the list that collects (kernel name, seconds) per compilation."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime import driver, jit

    class CompileOnlyDriver(CudaDriver):
        def __init__(self):  # no libcuda: only the target is needed to compile
            self.target = GPUTarget("cuda", arch, 32)

        def get_current_target(self):
            return self.target

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(CompileOnlyDriver())
    compiled: List[Tuple[str, float]] = []
    launch = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        start = time.perf_counter()
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, time.perf_counter() - start))
        return kernel

    jit.JITFunction.run = compile_only
    return compiled


def _pretend_cuda(modules) -> None:
    """The launchers check that tensors are on CUDA; here they are CPU placeholders that are never read."""
    for module in modules:
        module.require_triton_device = lambda entry, kernel, tensors: torch.device("cuda")


def variants(full: bool) -> List[Tuple[str, Callable[[], object]]]:
    """(name, thunk) for each kernel variant: GEMM epilogues x storage bits x tiles, attention modes, LN."""
    from . import act_quant, attention, packing, qgemm
    from .qgemm import _TUNE_SPACE, GemmConfig

    _pretend_cuda((act_quant, attention, packing, qgemm))
    m, k, n = 197, 384, 96
    tiles = _TUNE_SPACE if full else [(128, 128, 128, 8, 3), (64, 64, 128, 4, 5), (16, 64, 256, 4, 4)]
    out: List[Tuple[str, Callable[[], object]]] = []

    def weight(bits, group_k):
        codes = torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8)
        storage = 8 if bits == 8 else bits
        packed = (codes.to(torch.int8) if bits == 8 else
                  packing.pack_weight(codes, torch.ones(n), torch.zeros(n, dtype=torch.int32), bits,
                                      group_k=group_k).data)
        return storage, packed

    scale, zero, sums = torch.ones(n), torch.zeros(n, dtype=torch.int32), torch.zeros(n, dtype=torch.int32)
    bias, residual = torch.zeros(n, dtype=torch.float32), torch.zeros(m, n, dtype=torch.float16)
    a8, x16 = torch.zeros(m, k, dtype=torch.int8), torch.zeros(m, k, dtype=torch.float16)
    grid_cols = torch.ones(4, n)
    for bits, group_k in ((4, 64), (3, 128), (8, 64)):
        storage, packed = weight(bits, group_k)
        for bm, bn, bk, warps, stages in tiles:
            cfg = GemmConfig(block_m=bm, block_n=bn, block_k=bk, group_m=8, num_warps=warps, num_stages=stages)
            tag = f"{bm}x{bn}x{bk}/w{warps}s{stages}"
            out.append((f"qgemm W{bits}A8 fp16+residual {tag}", lambda s=storage, p=packed, g=group_k, c=cfg:
                        qgemm.qgemm_triton(a8, 0.1, 3, p, scale, zero, sums, bias, residual, s, k, g, False, None,
                                           0, 0, 0, torch.float16, config=c)))
            out.append((f"qgemm W{bits}A8 gelu+requant {tag}", lambda s=storage, p=packed, g=group_k, c=cfg:
                        qgemm.qgemm_triton(a8, 0.1, 3, p, scale, zero, sums, bias, None, s, k, g, True, 0.05, 1,
                                           -128, 127, torch.int8, config=c)))
            out.append((f"qgemm W{bits}A8 fp32 {tag}", lambda s=storage, p=packed, g=group_k, c=cfg:
                        qgemm.qgemm_triton(a8, 0.1, 3, p, scale, zero, sums, bias, None, s, k, g, False, None,
                                           0, 0, 0, torch.float32, config=c)))
            out.append((f"qgemm W{bits}A8 per-column requant {tag}", lambda s=storage, p=packed, g=group_k, c=cfg:
                        qgemm.qgemm_columns_triton(a8, 0.1, 3, p, scale, zero, sums, bias, s, k, g, grid_cols,
                                                   torch.float16, config=c)))
            out.append((f"qgemm W{bits}A16 fp16+residual {tag}", lambda s=storage, p=packed, g=group_k, c=cfg:
                        qgemm.qgemm_w16_triton(x16, p, scale, zero, bias, residual, s, k, g, False,
                                               torch.float16, config=c)))
            if not full:
                break  # one tile per epilogue; --full compiles the whole tune space
        if storage != 8:  # the unpack-first path: the centered-unpack kernel, then the dense int8 / fp16 GEMM
            dense = GemmConfig(128, 128, 128, 8, 8, 3, unpack_first=True)
            out.append((f"qgemm W{bits}A8 unpack-first fp16+residual", lambda s=storage, p=packed, g=group_k:
                        qgemm.qgemm_triton(a8, 0.1, 3, p, scale, zero, sums, bias, residual, s, k, g, False, None,
                                           0, 0, 0, torch.float16, config=dense)))
            out.append((f"qgemm W{bits}A8 unpack-first per-column requant", lambda s=storage, p=packed, g=group_k:
                        qgemm.qgemm_columns_triton(a8, 0.1, 3, p, scale, zero, sums, bias, s, k, g, grid_cols,
                                                   torch.float16, config=dense)))
            out.append((f"qgemm W{bits}A16 unpack-first fp16+residual", lambda s=storage, p=packed, g=group_k:
                        qgemm.qgemm_w16_triton(x16, p, scale, zero, bias, residual, s, k, g, False, torch.float16,
                                               config=dense)))
        out.append((f"qgemm W{bits}A8 accumulator", lambda s=storage, p=packed, g=group_k:
                    qgemm.qgemm_accumulator_triton(a8, 3, p, zero, sums, s, k, g,
                                                   config=GemmConfig(64, 64, 128, 8, 4, 3))))
    for bm, bn, bk, warps, stages in tiles[1:]:
        cfg = GemmConfig(block_m=bm, block_n=bn, block_k=bk, group_m=8, num_warps=warps, num_stages=stages)
        storage, packed = weight(4, 64)
        out.append((f"qgemm W4A8 fp16 {bm}x{bn}x{bk}/w{warps}s{stages}", lambda p=packed, c=cfg:
                    qgemm.qgemm_triton(a8, 0.1, 3, p, scale, zero, sums, bias, None, 4, k, 64, False, None, 0, 0, 0,
                                       torch.float16, config=c)))

    batch, heads, seq, dim = 2, 3, 197, 64
    q = torch.zeros(batch, heads, seq, dim, dtype=torch.int8)
    windows, wseq = 4, 49
    qw = torch.zeros(batch * windows, heads, wseq, 32, dtype=torch.int8)
    rel_bias, mask = torch.zeros(heads, wseq, wseq), torch.zeros(windows, wseq, wseq)
    # The autotuner's (BLOCK_M, num_warps) tiles: all with --full, else (32, 8) with mma.sync and (64, 4) with wgmma.
    for block_m, warps in (attention.TUNE_BLOCK_M_WARPS if full else attention.TUNE_BLOCK_M_WARPS[2:4]):
        tag = f"block_m={block_m}/w{warps}"
        for p_bits, math in ((4, "fast"), (4, "exact"), (8, "fast"), (8, "exact")):
            out.append((f"attention log2 P{p_bits} {math} {tag}", lambda b=block_m, w=warps, p=p_bits, m=math:
                        attention.attention_log2_triton(q, q, q, 0.1, 0, 0.1, 0, 0.1, 0, 0.125, None, None, 1.0, p,
                                                        torch.float16, block_m=b, num_warps=w, softmax_math=m)))
        out.append((f"attention linear P8 {tag}", lambda b=block_m, w=warps:
                    attention.attention_linear_triton(q, q, q, 0.1, 0, 0.1, 0, 0.1, 0, 0.125, None, None, 1 / 255, 0,
                                                      8, torch.float16, block_m=b, num_warps=w)))
    for p_bits in (4, 8):
        out.append((f"attention log2 P{p_bits} token-major int8 out", lambda p=p_bits:
                    attention.attention_log2_triton(q, q, q, 0.1, 0, 0.1, 0, 0.1, 0, 0.125, None, None, 1.0, p,
                                                    torch.float16, block_m=32, out_grid=(0.05, 0, -128, 127),
                                                    token_major=True)))
    out.append(("attention log2 P4 Swin bias+mask+codes", lambda:
                attention.attention_log2_triton(qw, qw, qw, 0.1, 0, 0.1, 0, 0.1, 0, 0.17, rel_bias, mask, 1.0, 4,
                                                torch.float16, return_codes=True, block_m=64)))
    for c in (384, 768, 96):
        out.append((f"layernorm_quant C={c}", lambda c=c:
                    act_quant.layernorm_quant_triton(torch.zeros(37, c, dtype=torch.float16), torch.ones(c),
                                                     torch.zeros(c), 1e-6, 0.05, 0, -128, 127)))
    for bits in (4, 3):  # int8 rows are not packed
        group_k = 128 if bits == 3 else 64
        out.append((f"pack/unpack {bits}-bit", lambda b=bits, g=group_k:
                    packing.unpack_weight_triton(
                        packing.pack_weight_triton(torch.zeros(n, k, dtype=torch.uint8), b, g), b, k, g)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    parser.add_argument("--full", action="store_true", help="every autotune tile, not one per epilogue")
    parser.add_argument("--only", default="", help="compile only variants whose name contains this")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        print("compile_check: unset TRITON_INTERPRET; interpreted kernels cannot be compiled for a GPU")
        return 2
    compiled = install_compile_only_driver(args.arch)
    failures = 0
    start = time.perf_counter()
    for name, thunk in variants(args.full):
        if args.only not in name:
            continue
        before = len(compiled)
        try:
            thunk()
            seconds = sum(t for _, t in compiled[before:])
            print(f"ok    sm_{args.arch} {name} ({seconds:.1f} s)", flush=True)
        except Exception as exc:  # report every failing variant, not just the first
            failures += 1
            print(f"FAIL  sm_{args.arch} {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", flush=True)
            traceback.print_exc(limit=-3)
    print(f"compile_check: {len(compiled)} compilations, {failures} failed, {time.perf_counter() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
