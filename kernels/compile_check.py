"""Compile every Triton kernel variant the engine launches for a CUDA GPU, on a machine without one.

The interpreter (``TRITON_INTERPRET=1``, how CI runs the kernels) accepts code the GPU compiler rejects
(dtype mixes, tl.dot shapes below the tensor-core minimum, register blow-ups), and GPU time is scarce.
This runs Triton's real pipeline — TTIR, TTGIR, LLVM, PTX and ``ptxas`` (shipped in the triton wheel) —
for ``sm_<arch>`` through the public launchers, with the CUDA driver replaced by a stand-in that only
names the target and a JIT that compiles instead of launching. Nothing is executed.

    python -m dfqvit.kernels.compile_check [--arch 90] [--full]

Each compiled kernel's resources are read from its cubin (``cuobjdump`` from the same wheel) and checked
against the target: no register spills (local memory), registers x threads within the register file,
dynamic shared memory within the per-block limit, and the tensor-core instruction a tile is meant to use
(``wgmma`` on sm_90 for tiles of 64 rows or more; a fallback to ``mma.sync`` would halve the MMA rate). A
launch that exceeds a limit fails only on the GPU (Triton's ``OutOfResources``), and a spill only shows
as time there, so these are checked here. ``--tune-space`` compiles what the GEMM autotuner would try for
each weight format and M bucket (its pruned configs) instead of the fixed variants.

Must run in a process where ``TRITON_INTERPRET`` is unset (the kernels are fixed as interpreted or
compiled when ``dfqvit.kernels`` is imported). Prints one line per variant; exit 1 if any fails.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch

REGISTER_FILE = 65536  # 32-bit registers per SM (and per block) on sm_70 .. sm_100
# Largest dynamic shared memory one block may opt in to, by compute capability (CUDA programming guide).
SHARED_PER_BLOCK = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448}


@dataclass(frozen=True)
class Compiled:
    """One compilation: the kernel's name, seconds, and Triton's ``CompiledKernel`` (cubin, PTX, metadata)."""
    name: str
    seconds: float
    kernel: object


@dataclass(frozen=True)
class Resources:
    registers: int  # per thread
    spill_bytes: int  # local memory per thread: register spills (the kernels use no local arrays)
    shared_bytes: int  # dynamic shared memory per block (pipeline buffers, layout conversions)
    num_warps: int
    mma: str  # "wgmma-async" (pipelined across K steps), "wgmma", "mma.sync" or "-" (no tensor-core instruction)

    def describe(self) -> str:
        return (f"regs={self.registers} spill={self.spill_bytes} B smem={self.shared_bytes // 1024} KiB "
                f"warps={self.num_warps} mma={self.mma}")


def _cuobjdump() -> Optional[Path]:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return path if path.exists() else None


def resources(kernel) -> Optional[Resources]:
    """Registers and local memory from the cubin (``cuobjdump --dump-resource-usage``), shared memory and warps
    from Triton's metadata, the MMA instruction from the PTX; None without a ``cuobjdump``."""
    tool = _cuobjdump()
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        dump = subprocess.run([str(tool), "--dump-resource-usage", cubin.name], capture_output=True, text=True,
                              check=True).stdout
    usage = re.search(r"REG:(\d+).*?LOCAL:(\d+)", dump, re.S)
    if usage is None:
        raise RuntimeError(f"cuobjdump printed no resource usage: {dump[-300:]}")
    ptx = kernel.asm.get("ptx", "")
    if "wgmma.mma_async" in ptx:
        # Pipelined (the next K step's wgmma issued before this one completes) when some wait leaves one pending:
        # Triton does so only for fp32 accumulators, an int32 one waits for 0 after every tl.dot.
        waits = {int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)}
        mma = "wgmma-async" if any(waits) else "wgmma"
    else:
        mma = "mma.sync" if re.search(r"\bmma\.sync", ptx) else "-"
    return Resources(int(usage.group(1)), int(usage.group(2)), int(kernel.metadata.shared),
                     int(kernel.metadata.num_warps), mma)


def resource_problems(res: Resources, arch: int, expect_wgmma: bool) -> List[str]:
    """What would fail or slow down on an ``sm_<arch>`` GPU: empty when the kernel fits."""
    problems = []
    if res.spill_bytes:
        problems.append(f"spills {res.spill_bytes} bytes of registers per thread to local memory")
    if res.registers * 32 * res.num_warps > REGISTER_FILE:
        problems.append(f"{res.registers} registers x {32 * res.num_warps} threads exceed the register file "
                        f"({REGISTER_FILE})")
    limit = SHARED_PER_BLOCK.get(arch)
    if limit is not None and res.shared_bytes > limit:
        problems.append(f"{res.shared_bytes} bytes of shared memory exceed sm_{arch}'s {limit} per block")
    if expect_wgmma and arch >= 90 and not res.mma.startswith("wgmma"):
        problems.append(f"uses {res.mma}, not wgmma")
    return problems


def install_compile_only_driver(arch: int) -> List[Compiled]:
    """Make Triton compile for ``sm_<arch>`` without CUDA and turn every launch into a compile; return
    the list that collects a :class:`Compiled` per compilation."""
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
    compiled: List[Compiled] = []
    launch = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        start = time.perf_counter()
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append(Compiled(self.fn.__name__, time.perf_counter() - start, kernel))
        return kernel

    jit.JITFunction.run = compile_only
    return compiled


def _pretend_cuda(modules) -> None:
    """The launchers check that tensors are on CUDA; here they are CPU placeholders that are never read."""
    for module in modules:
        module.require_triton_device = lambda entry, kernel, tensors: torch.device("cuda")


@dataclass(frozen=True)
class Variant:
    name: str
    run: Callable[[], object]  # launches (here: compiles) the kernels of this variant
    wgmma: bool = False  # its GEMM / attention kernel must use Hopper's wgmma (sm_90 and later)


def _wgmma_tile(block_m: int, num_warps: int) -> bool:
    """Whether Triton gives a ``tl.dot`` of this tile Hopper's wgmma: a warpgroup (4 warps) per 64 rows."""
    return block_m >= 64 and num_warps % 4 == 0


def variants(full: bool) -> List[Variant]:
    """Each kernel variant: GEMM epilogues x storage bits x tiles, attention modes, LN, packing."""
    from . import act_quant, attention, packing, qgemm
    from .qgemm import _TUNE_SPACE, GemmConfig

    _pretend_cuda((act_quant, attention, packing, qgemm))
    m, k, n = 197, 384, 96
    tiles = _TUNE_SPACE if full else [(128, 128, 128, 8, 3), (64, 64, 128, 4, 5), (16, 64, 256, 4, 4)]
    out: List[Variant] = []

    def add(name: str, run: Callable[[], object], wgmma: bool = False) -> None:
        out.append(Variant(name, run, wgmma))

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
            tag, wg = f"{bm}x{bn}x{bk}/w{warps}s{stages}", _wgmma_tile(bm, warps)
            add(f"qgemm W{bits}A8 fp16+residual {tag}", lambda s=storage, p=packed, g=group_k, c=cfg:
                qgemm.qgemm_triton(a8, 0.1, 3, p, scale, zero, sums, bias, residual, s, k, g, False, None,
                                   0, 0, 0, torch.float16, config=c), wg)
            add(f"qgemm W{bits}A8 gelu+requant {tag}", lambda s=storage, p=packed, g=group_k, c=cfg:
                qgemm.qgemm_triton(a8, 0.1, 3, p, scale, zero, sums, bias, None, s, k, g, True, 0.05, 1,
                                   -128, 127, torch.int8, config=c), wg)
            add(f"qgemm W{bits}A8 fp32 {tag}", lambda s=storage, p=packed, g=group_k, c=cfg:
                qgemm.qgemm_triton(a8, 0.1, 3, p, scale, zero, sums, bias, None, s, k, g, False, None,
                                   0, 0, 0, torch.float32, config=c), wg)
            add(f"qgemm W{bits}A8 per-column requant {tag}", lambda s=storage, p=packed, g=group_k, c=cfg:
                qgemm.qgemm_columns_triton(a8, 0.1, 3, p, scale, zero, sums, bias, s, k, g, grid_cols,
                                           torch.float16, config=c), wg)
            add(f"qgemm W{bits}A16 fp16+residual {tag}", lambda s=storage, p=packed, g=group_k, c=cfg:
                qgemm.qgemm_w16_triton(x16, p, scale, zero, bias, residual, s, k, g, False,
                                       torch.float16, config=c), wg)
            if not full:
                break  # one tile per epilogue; --full compiles the whole tune space
        if storage != 8:  # the unpack-first path: the centered-unpack kernel, then the dense int8 / fp16 GEMM
            dense = GemmConfig(128, 128, 128, 8, 8, 3, unpack_first=True)
            add(f"qgemm W{bits}A8 unpack-first fp16+residual", lambda s=storage, p=packed, g=group_k:
                qgemm.qgemm_triton(a8, 0.1, 3, p, scale, zero, sums, bias, residual, s, k, g, False, None,
                                   0, 0, 0, torch.float16, config=dense), True)
            add(f"qgemm W{bits}A8 unpack-first per-column requant", lambda s=storage, p=packed, g=group_k:
                qgemm.qgemm_columns_triton(a8, 0.1, 3, p, scale, zero, sums, bias, s, k, g, grid_cols,
                                           torch.float16, config=dense), True)
            add(f"qgemm W{bits}A16 unpack-first fp16+residual", lambda s=storage, p=packed, g=group_k:
                qgemm.qgemm_w16_triton(x16, p, scale, zero, bias, residual, s, k, g, False, torch.float16,
                                       config=dense), True)
        add(f"qgemm W{bits}A8 accumulator", lambda s=storage, p=packed, g=group_k:
            qgemm.qgemm_accumulator_triton(a8, 3, p, zero, sums, s, k, g,
                                           config=GemmConfig(64, 64, 128, 8, 4, 3)), True)
    for bm, bn, bk, warps, stages in tiles[1:]:
        cfg = GemmConfig(block_m=bm, block_n=bn, block_k=bk, group_m=8, num_warps=warps, num_stages=stages)
        storage, packed = weight(4, 64)
        add(f"qgemm W4A8 fp16 {bm}x{bn}x{bk}/w{warps}s{stages}", lambda p=packed, c=cfg:
            qgemm.qgemm_triton(a8, 0.1, 3, p, scale, zero, sums, bias, None, 4, k, 64, False, None, 0, 0, 0,
                               torch.float16, config=c), _wgmma_tile(bm, warps))

    batch, heads, seq, dim = 2, 3, 197, 64
    q = torch.zeros(batch, heads, seq, dim, dtype=torch.int8)
    windows, wseq = 4, 49
    qw = torch.zeros(batch * windows, heads, wseq, 32, dtype=torch.int8)
    rel_bias, mask = torch.zeros(heads, wseq, wseq), torch.zeros(windows, wseq, wseq)
    # The autotuner's (BLOCK_M, num_warps) tiles: all with --full, else (32, 8) with mma.sync and (64, 4) with wgmma.
    for block_m, warps in (attention.TUNE_BLOCK_M_WARPS if full else attention.TUNE_BLOCK_M_WARPS[2:4]):
        tag = f"block_m={block_m}/w{warps}"
        wg = _wgmma_tile(block_m, warps)
        for p_bits, math in ((4, "fast"), (4, "exact"), (8, "fast"), (8, "exact")):
            add(f"attention log2 P{p_bits} {math} {tag}", lambda b=block_m, w=warps, p=p_bits, m=math:
                attention.attention_log2_triton(q, q, q, 0.1, 0, 0.1, 0, 0.1, 0, 0.125, None, None, 1.0, p,
                                                torch.float16, block_m=b, num_warps=w, softmax_math=m), wg)
        add(f"attention linear P8 {tag}", lambda b=block_m, w=warps:
            attention.attention_linear_triton(q, q, q, 0.1, 0, 0.1, 0, 0.1, 0, 0.125, None, None, 1 / 255, 0,
                                              8, torch.float16, block_m=b, num_warps=w), wg)
    add("attention log2 P7 exact", lambda:  # its ratio floor is an fp32 subnormal (it once failed to compile)
        attention.attention_log2_triton(q, q, q, 0.1, 0, 0.1, 0, 0.1, 0, 0.125, None, None, 1.0, 7, torch.float16,
                                        block_m=32, softmax_math="exact"))
    for p_bits in (4, 8):
        add(f"attention log2 P{p_bits} token-major int8 out", lambda p=p_bits:
            attention.attention_log2_triton(q, q, q, 0.1, 0, 0.1, 0, 0.1, 0, 0.125, None, None, 1.0, p,
                                            torch.float16, block_m=32, out_grid=(0.05, 0, -128, 127),
                                            token_major=True))
    add("attention log2 P4 Swin bias+mask+codes", lambda:
        attention.attention_log2_triton(qw, qw, qw, 0.1, 0, 0.1, 0, 0.1, 0, 0.17, rel_bias, mask, 1.0, 4,
                                        torch.float16, return_codes=True, block_m=64), True)
    for c in (384, 768, 96):
        add(f"layernorm_quant C={c}", lambda c=c:
            act_quant.layernorm_quant_triton(torch.zeros(37, c, dtype=torch.float16), torch.ones(c),
                                             torch.zeros(c), 1e-6, 0.05, 0, -128, 127))
    for bits in (4, 3):  # int8 rows are not packed
        group_k = 128 if bits == 3 else 64
        add(f"pack/unpack {bits}-bit", lambda b=bits, g=group_k:
            packing.unpack_weight_triton(packing.pack_weight_triton(torch.zeros(n, k, dtype=torch.uint8), b, g),
                                         b, k, g))
    return out


def tune_space_variants() -> List[Variant]:
    """What the GEMM autotuner would compile on a GPU: for each weight format (int4 / int3 packed or unpacked
    first, int8; int8 or fp16 activations) and M bucket of a ViT (batch 1, 8, 64, 256 at 197 tokens), the
    configs left by its pruning (``qgemm._prune_configs``, the "full" autotune mode), each with the epilogues
    the engine launches (residual add, GELU + re-quantize, per-column re-quantize for qkv). Configs shared by
    several buckets compile once."""
    import triton

    from . import packing, qgemm
    from ._common import m_bucket

    _pretend_cuda((packing, qgemm))
    k, n = 384, 128
    scale, zero, sums = torch.ones(n), torch.zeros(n, dtype=torch.int32), torch.zeros(n, dtype=torch.int32)
    residual = torch.zeros(256, n, dtype=torch.float16)
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
               for bm, bn, bk, w, st in qgemm._TUNE_SPACE]
    out: List[Variant] = []
    for bits, group_k in ((4, 64), (3, 128), (8, 1)):
        codes = torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8)
        packed = (codes.to(torch.int8) if bits == 8 else
                  packing.pack_weight(codes, scale, zero, bits, group_k=group_k).data)
        for float_a in (False, True):
            a = torch.zeros(256, k, dtype=torch.float16 if float_a else torch.int8)
            for dense in ((False, True) if bits != 8 else (False,)):
                seen = set()
                for batch in (1, 8, 64, 256):
                    named = dict(STORAGE_BITS=8 if dense else bits, GROUP_K=1 if dense or bits == 8 else group_k,
                                 FLOAT_A=float_a, W_DENSE=dense, M_BUCKET=m_bucket(batch * 197))
                    for c in qgemm._prune_configs(configs, named):
                        kw = c.kwargs
                        cfg = qgemm.GemmConfig(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["GROUP_M"], c.num_warps,
                                               c.num_stages, unpack_first=dense if bits != 8 else None)
                        if cfg in seen:
                            continue
                        seen.add(cfg)
                        fmt = f"W{bits}{'A16' if float_a else 'A8'}{' unpack-first' if dense else ''}"
                        tag = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}/w{cfg.num_warps}s{cfg.num_stages}"
                        wg = _wgmma_tile(cfg.block_m, cfg.num_warps)
                        out.extend(_engine_epilogues(fmt, tag, wg, a, packed, scale, zero, sums, residual, bits, k,
                                                     group_k, float_a, cfg))
    return out


def _engine_epilogues(fmt, tag, wg, a, packed, scale, zero, sums, residual, bits, k, group_k, float_a, cfg):
    """The GEMM launches the engine makes with one weight format and tile."""
    from . import qgemm

    if float_a:  # weight-only layers: proj / fc2 with the residual add, fc1 with GELU
        return [Variant(f"tune {fmt} fp16+residual {tag}", lambda: qgemm.qgemm_w16_triton(
                    a, packed, scale, zero, None, residual, bits, k, group_k, False, torch.float16, config=cfg), wg),
                Variant(f"tune {fmt} gelu {tag}", lambda: qgemm.qgemm_w16_triton(
                    a, packed, scale, zero, None, None, bits, k, group_k, True, torch.float16, config=cfg), wg)]
    grid = torch.ones(4, scale.numel())
    return [Variant(f"tune {fmt} fp16+residual {tag}", lambda: qgemm.qgemm_triton(
                a, 0.1, 3, packed, scale, zero, sums, None, residual, bits, k, group_k, False, None, 0, 0, 0,
                torch.float16, config=cfg), wg),
            Variant(f"tune {fmt} gelu+requant {tag}", lambda: qgemm.qgemm_triton(
                a, 0.1, 3, packed, scale, zero, sums, None, None, bits, k, group_k, True, 0.05, 1, -128, 127,
                torch.int8, config=cfg), wg),
            Variant(f"tune {fmt} per-column requant {tag}", lambda: qgemm.qgemm_columns_triton(
                a, 0.1, 3, packed, scale, zero, sums, None, bits, k, group_k, grid, torch.float16, config=cfg), wg)]


# The kernels a variant's ``wgmma`` expectation is about (the unpack kernel of the unpack-first path has no dot).
_MMA_KERNELS = ("_qgemm_kernel", "_attention_kernel")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    parser.add_argument("--full", action="store_true", help="every autotune tile, not one per epilogue")
    parser.add_argument("--tune-space", action="store_true",
                        help="the GEMM autotuner's pruned configs per weight format and M bucket (~300 compilations)")
    parser.add_argument("--only", default="", help="compile only variants whose name contains this")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        print("compile_check: unset TRITON_INTERPRET; interpreted kernels cannot be compiled for a GPU")
        return 2
    compiled = install_compile_only_driver(args.arch)
    if _cuobjdump() is None:
        print("compile_check: no cuobjdump in the triton wheel: compiling only, resources not checked")
    failures = 0
    start = time.perf_counter()
    for variant in tune_space_variants() if args.tune_space else variants(args.full):
        if args.only not in variant.name:
            continue
        before = len(compiled)
        try:
            variant.run()
            problems, summary = [], ""
            for c in compiled[before:]:
                res = resources(c.kernel)
                if res is None:
                    continue
                wgmma = variant.wgmma and c.name in _MMA_KERNELS
                problems += [f"{c.name} {p}" for p in resource_problems(res, args.arch, wgmma)]
                summary = res.describe()  # the last kernel: the GEMM after an unpack, else the only one
            seconds = sum(c.seconds for c in compiled[before:])
            if problems:
                failures += 1
                print(f"FAIL  sm_{args.arch} {variant.name}: {'; '.join(problems)} [{summary}]", flush=True)
            else:
                print(f"ok    sm_{args.arch} {variant.name} ({seconds:.1f} s) {summary}", flush=True)
        except Exception as exc:  # report every failing variant, not just the first
            failures += 1
            print(f"FAIL  sm_{args.arch} {variant.name}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                  flush=True)
            traceback.print_exc(limit=-3)
    print(f"compile_check: {len(compiled)} compilations, {failures} failed, {time.perf_counter() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
