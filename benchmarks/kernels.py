"""Kernel benchmark: packed low-bit GEMMs and log2 attention against cuBLAS fp16, fp8 ``_scaled_mm`` and SDPA.

    python benchmarks/kernels.py [--out benchmarks/results] [--batches 1 8 64 256] [--models deit_s vit_b]
    python benchmarks/kernels.py --cpu [--quick]      # the native CPU backend (benchmarks/kernels_cpu.py)

One run times, side by side on the same GPU, at the linear shapes of DeiT-S and ViT-B (M = batch x 197):
cuBLAS fp16 (``torch.matmul``), cuBLAS fp8 (``torch._scaled_mm``, e4m3), our W8A8 / W4A8 / W3A8 GEMMs
(int8 activations, fused dequant + bias epilogue, fp16 out) and W4A16 (weight-only) — the int4/int3 ones on
both paths, ``fused`` (unpacked inside the K loop) and ``unpack_first`` (a dense W - w_zero first, see
``dfqvit.kernels.qgemm``), with the path the engine takes at that M recorded as ``default_path`` — and for
attention SDPA fp16 against our log2-quantized attention (P4 and P8 codes, each with softmax math ``fast``, the
CUDA default, and ``exact``; the target reads P4 ``fast``). Times are ``triton.testing.do_bench`` medians (20th and
80th percentiles kept) after a warm-up call that also runs the autotuner. It prints a table and writes
JSON (device, torch / triton / CUDA versions, ``DFQVIT_AUTOTUNE`` as ``autotune``, shapes, every timing, the
weight-byte ratios and the issue's targets with pass/fail) to ``--out``; a second run in the same second gets a
``-2`` name, never the first one's.

Without CUDA it says that every GPU figure is unmeasured, still writes the packed weight-byte ratios
(they need no GPU), and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import triton

from dfqvit.environment import describe_environment
from dfqvit.errors import DFQViTError
from dfqvit.kernels import autotune_choices, pack_weight, packed_nbytes
from dfqvit.kernels.attention import attention_log2_triton
from dfqvit.kernels.qgemm import autotune_mode, gemm_path, qgemm_triton, qgemm_w16_triton, use_unpack_first
from dfqvit.paths import output_folder, unique_stem, write_json

TOKENS = 197  # 224 px / 16 px patches + class token


@dataclass(frozen=True)
class ModelShape:
    name: str
    dim: int
    mlp_dim: int
    heads: int

    def linear_layers(self) -> dict[str, tuple[int, int]]:
        """(out_features N, in_features K) of each Linear in one transformer block."""
        d, h = self.dim, self.mlp_dim
        return {"qkv": (3 * d, d), "proj": (d, d), "fc1": (h, d), "fc2": (d, h)}


MODELS = {"deit_s": ModelShape("deit_s", 384, 1536, 6), "vit_b": ModelShape("vit_b", 768, 3072, 12)}
BATCHES = (1, 8, 64, 256)


@dataclass(frozen=True)
class GemmExperiment:
    model: str
    layer: str
    batch: int
    m: int
    n: int
    k: int


@dataclass(frozen=True)
class AttentionExperiment:
    model: str
    batch: int
    heads: int
    seq: int
    head_dim: int


@dataclass(frozen=True)
class Timing:
    provider: str
    median_ms: float | None
    p20_ms: float | None = None
    p80_ms: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class ExperimentResult:
    experiment: dict
    timings: list[Timing] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# Weight bytes (no GPU needed)
# ---------------------------------------------------------------------------------------------------

WEIGHT_BYTE_TARGETS = {4: 0.27, 3: 0.21}  # issue 6: packed bytes incl. scales vs fp16


def weight_byte_ratios(models) -> list[dict]:
    rows = []
    for model in models:
        for layer, (n, k) in MODELS[model].linear_layers().items():
            for bits in (8, 4, 3):
                codes = torch.zeros(n, k, dtype=torch.int8 if bits == 8 else torch.uint8)
                weight = pack_weight(codes, torch.ones(n), torch.zeros(n, dtype=torch.int32), bits)
                ratio = packed_nbytes(weight) / (n * k * 2)
                rows.append(dict(model=model, layer=layer, n=n, k=k, bits=bits, packed_bytes=packed_nbytes(weight),
                                 fp16_bytes=n * k * 2, ratio_vs_fp16=round(ratio, 4),
                                 target=WEIGHT_BYTE_TARGETS.get(bits),
                                 meets_target=None if bits not in WEIGHT_BYTE_TARGETS
                                 else ratio <= WEIGHT_BYTE_TARGETS[bits]))
    return rows


# ---------------------------------------------------------------------------------------------------
# GPU timings
# ---------------------------------------------------------------------------------------------------


def _bench(provider: str, fn) -> Timing:
    try:
        fn()  # warm-up; runs the autotuner for our kernels
        torch.cuda.synchronize()
        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return Timing(provider, med, p20, p80)
    except Exception as exc:  # a baseline unsupported on this GPU/torch must not hide the others
        return Timing(provider, None, error=f"{type(exc).__name__}: {exc}"[:300])


PATHS = (("fused", False), ("unpack_first", True))


def _bench_paths(label: str, fn) -> list[Timing]:
    """``fn`` timed on each packed-GEMM path, as ``{label}_fused`` and ``{label}_unpack_first``."""
    timings = []
    for path, unpack_first in PATHS:
        with gemm_path(unpack_first):
            timings.append(_bench(f"{label}_{path}", fn))
    return timings


def time_gemm(exp: GemmExperiment) -> ExperimentResult:
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    m, n, k = exp.m, exp.n, exp.k
    a16 = torch.randn(m, k, device=dev, dtype=torch.float16, generator=gen)
    w16 = torch.randn(n, k, device=dev, dtype=torch.float16, generator=gen)
    bias = torch.randn(n, device=dev, dtype=torch.float32, generator=gen)
    timings = [_bench("cublas_fp16", lambda: torch.matmul(a16, w16.T))]

    # fp8 e4m3 cuBLASLt; _scaled_mm wants dims that are multiples of 16, so M is padded (noted in JSON).
    m_pad = -(-m // 16) * 16
    a8 = torch.randn(m_pad, k, device=dev, generator=gen).to(torch.float8_e4m3fn)
    w8 = torch.randn(n, k, device=dev, generator=gen).to(torch.float8_e4m3fn)
    one = torch.tensor(1.0, device=dev)
    timings.append(_bench("scaled_mm_fp8", lambda: torch._scaled_mm(a8, w8.T, scale_a=one, scale_b=one,
                                                                     out_dtype=torch.float16)))

    a_int8 = torch.randint(-128, 128, (m, k), device=dev, dtype=torch.int8, generator=gen)
    # int4/int3: both GEMM paths (the weight unpacked inside the K loop, or first into a dense int8 W - w_zero
    # by a separate kernel, timed together); the engine takes the one use_unpack_first picks for this M.
    for bits, label in ((8, "ours_w8a8"), (4, "ours_w4a8"), (3, "ours_w3a8")):
        high = 128 if bits == 8 else 2 ** bits
        low = -128 if bits == 8 else 0
        codes = torch.randint(low, high, (n, k), device="cpu", dtype=torch.int32)
        codes = codes.to(torch.int8 if bits == 8 else torch.uint8)
        zero = torch.zeros(n, dtype=torch.int32) if bits == 8 else torch.full((n,), 2 ** (bits - 1), dtype=torch.int32)
        w = pack_weight(codes, torch.rand(n) * 0.01, zero, bits).to(dev)
        call = lambda w=w: qgemm_triton(  # noqa: E731
            a_int8, 0.02, 3, w.data, w.w_scale, w.w_zero, w.w_col_sums, bias, None, w.storage_bits, k, w.group_k,
            False, None, 0, 0, 0, torch.float16)
        if bits == 8:
            timings.append(_bench(label, call))
            continue
        timings += _bench_paths(label, call)
        if bits == 4:
            timings += _bench_paths("ours_w4a16", lambda w=w: qgemm_w16_triton(
                a16, w.data, w.w_scale, w.w_zero, bias, None, w.storage_bits, k, w.group_k, False, torch.float16))
    default = "unpack_first" if use_unpack_first(None, m, 4) else "fused"
    return ExperimentResult(asdict(exp) | {"scaled_mm_m_padded_to": m_pad, "default_path": default}, timings)


def time_attention(exp: AttentionExperiment) -> ExperimentResult:
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    shape = (exp.batch, exp.heads, exp.seq, exp.head_dim)
    q16, k16, v16 = (torch.randn(shape, device=dev, dtype=torch.float16, generator=gen) for _ in range(3))
    q8, k8, v8 = (torch.randint(-128, 128, shape, device=dev, dtype=torch.int8, generator=gen) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    timings = [_bench("sdpa_fp16", lambda: sdpa(q16, k16, v16))]
    # P4 is W4A4's softmax, P8 W4A8's; both softmax maths ("fast", the CUDA default, and "exact").
    for p_bits, math in ((4, "fast"), (4, "exact"), (8, "fast"), (8, "exact")):
        timings.append(_bench(f"ours_log2_p{p_bits}_{math}", lambda p=p_bits, m=math: attention_log2_triton(
            q8, k8, v8, 0.03, 0, 0.03, 0, 0.05, 0, exp.head_dim ** -0.5, None, None, 1.0, p, torch.float16,
            softmax_math=m)))
    return ExperimentResult(asdict(exp), timings)


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def _median(result: ExperimentResult, provider: str):
    for t in result.timings:
        if t.provider == provider:
            return t.median_ms
    return None


def evaluate_targets(gemm: list[ExperimentResult], attention: list[ExperimentResult]) -> dict:
    w4a8 = []
    for r in gemm:
        if r.experiment["batch"] >= 64:
            base = _median(r, "cublas_fp16")
            ours = _median(r, f"ours_w4a8_{r.experiment['default_path']}")
            if base and ours:
                w4a8.append(base / ours)
    attn = []
    for r in attention:
        base, ours = _median(r, "sdpa_fp16"), _median(r, "ours_log2_p4_fast")
        if base and ours:
            attn.append(base / ours)
    return {
        "w4a8_speedup_vs_fp16_at_batch_ge_64": {"target": ">= 1.5", "min": min(w4a8, default=None),
                                                "met": bool(w4a8) and min(w4a8) >= 1.5},
        "log2_attention_speed_vs_sdpa_fp16": {"target": ">= 1.0", "min": min(attn, default=None),
                                              "met": bool(attn) and min(attn) >= 1.0},
    }


def print_table(title: str, results: list[ExperimentResult], keys: list[str], baseline: str) -> None:
    providers = [t.provider for t in results[0].timings] if results else []
    head = keys + [f"{p} ms" for p in providers] + [f"{p} x" for p in providers if p != baseline]
    print(f"\n{title}\n" + " | ".join(head))
    for r in results:
        base = _median(r, baseline)
        cells = [str(r.experiment[k]) for k in keys]
        cells += ["err" if t.median_ms is None else f"{t.median_ms:.4f}" for t in r.timings]
        cells += ["-" if (t.median_ms is None or not base) else f"{base / t.median_ms:.2f}"
                  for t in r.timings if t.provider != baseline]
        print(" | ".join(cells))


def environment() -> dict:
    """dfqvit's environment record of the GPU with its capability; "device" is None without one."""
    if not torch.cuda.is_available():
        return {**describe_environment(torch.device("cpu")), "device": None}
    return {**describe_environment(torch.device("cuda")), "capability": list(torch.cuda.get_device_capability())}


CPU_ONLY_FLAGS = ("quick", "engine_batch", "default_malloc")  # what kernels_cpu.run takes
GPU_ONLY_FLAGS = ("batches", "models")  # the CPU benchmark times fixed shapes (kernels_cpu.GEMM_CASES)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_args(args) -> None:
    """Refuse, before any timing, flags the chosen benchmark would ignore and counts below 1."""
    if args.cpu:
        ignored = [_flag(n) for n in GPU_ONLY_FLAGS if getattr(args, n) is not None]
        if ignored:
            raise DFQViTError(f"{' and '.join(ignored)} {'has' if len(ignored) == 1 else 'have'} no effect with --cpu "
                              "(the CPU benchmark times fixed shapes: the CIFAR reference ViT and DeiT-S); drop it")
    else:
        ignored = [_flag(n) for n in CPU_ONLY_FLAGS if getattr(args, n) not in (None, False)]
        if ignored:
            raise DFQViTError(f"{' and '.join(ignored)} {'applies' if len(ignored) == 1 else 'apply'} only with --cpu; "
                              "add --cpu or drop it")
    if args.batches is not None and min(args.batches) < 1:
        raise DFQViTError(f"--batches must be >= 1, got {' '.join(map(str, args.batches))}")
    if args.engine_batch is not None and args.engine_batch < 1:
        raise DFQViTError(f"--engine-batch must be >= 1, got {args.engine_batch}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    # None = not given: with --cpu, --batches / --models are refused instead of silently ignored
    parser.add_argument("--batches", type=int, nargs="+", help=f"default: {' '.join(map(str, BATCHES))}")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help=f"default: {' '.join(MODELS)}")
    parser.add_argument("--cpu", action="store_true", help="benchmark the native CPU backend instead (no GPU needed)")
    parser.add_argument("--quick", action="store_true", help="with --cpu: few repetitions (smoke test)")
    parser.add_argument("--engine-batch", type=int, help="with --cpu: batch of the whole-model run (default 64)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="with --cpu: keep glibc's malloc thresholds (default: raised, see kernels_cpu.py)")
    args = parser.parse_args(argv)
    try:
        check_args(args)
        autotune = None if args.cpu else autotune_mode()  # a bad DFQVIT_AUTOTUNE: before the timing
        out_dir = output_folder(args.out)  # before minutes of timing, not after
    except DFQViTError as exc:
        parser.error(str(exc))
    if args.cpu:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from kernels_cpu import run
        engine_batch = 64 if args.engine_batch is None else args.engine_batch
        return run(str(out_dir), engine_batch=engine_batch, quick=args.quick, steady_malloc=not args.default_malloc)
    batches, models = args.batches or list(BATCHES), args.models or list(MODELS)

    # autotune: DFQVIT_AUTOTUNE (quick = 3 GEMM tiles per shape, full = all), so runs can be told apart
    report = {"benchmark": "kernels", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "env": environment(),
              "autotune": autotune, "tokens": TOKENS, "batches": batches,
              "models": {m: asdict(MODELS[m]) for m in models}, "weight_bytes": weight_byte_ratios(models)}
    print("packed weight bytes (incl. scales, zero points, column sums) / fp16 bytes:")
    for row in report["weight_bytes"]:
        verdict = ""
        if row["target"] is not None:
            verdict = f" (target <= {row['target']}: {'ok' if row['meets_target'] else 'MISSED'})"
        print(f"  {row['model']:7s} {row['layer']:5s} ({row['n']}x{row['k']}) int{row['bits']}: "
              f"{row['ratio_vs_fp16']:.4f}{verdict}")

    if not torch.cuda.is_available():
        print("\nNo CUDA device: every GPU figure (GEMM and attention timings, speed-ups, targets) is UNMEASURED "
              "in this run; only the weight-byte ratios above are measured.")
        report["gemm"] = report["attention"] = None
        report["targets"] = "unmeasured: no CUDA device"
    else:
        gemm_exps = [GemmExperiment(m, layer, b, b * TOKENS, n, k) for m in models
                     for b in batches for layer, (n, k) in MODELS[m].linear_layers().items()]
        attn_exps = [AttentionExperiment(m, b, MODELS[m].heads, TOKENS, MODELS[m].dim // MODELS[m].heads)
                     for m in models for b in batches]
        gemm = [time_gemm(e) for e in gemm_exps]
        attention = [time_attention(e) for e in attn_exps]
        print_table("GEMM (median ms; x = speed-up over cuBLAS fp16)", gemm, ["model", "layer", "batch", "m", "n", "k"],
                    "cublas_fp16")
        print_table("Attention (median ms; x = speed-up over SDPA fp16)", attention,
                    ["model", "batch", "heads", "seq", "head_dim"], "sdpa_fp16")
        report["gemm"] = [asdict(r) for r in gemm]
        report["attention"] = [asdict(r) for r in attention]
        report["targets"] = evaluate_targets(gemm, attention)
        report["autotune_choices"] = autotune_choices()
        print("\ntargets:", json.dumps(report["targets"], indent=1))

    device_tag = (report["env"]["device"] or "nogpu").lower().replace(" ", "_")
    path = out_dir / (unique_stem(out_dir, f"kernels_{device_tag}_{time.strftime('%Y%m%d_%H%M%S')}") + ".json")
    write_json(path, report)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
