"""End-to-end latency of timm fp16 baselines and the dfqvit engine, side by side in one run (CUDA only).

For DeiT-S, ViT-B and Swin-S at 224 (random weights) and batch 1, 8, 64, 256: timm fp16 eager,
``torch.compile`` fp16, fp16 under CUDA graphs, and the engine at W8A8, W4A8, W4A4, W3A16. Reports the
median latency over many synchronised runs after warm-up, images/s and weight bytes; prints a table and
writes JSON + markdown under ``benchmarks/results/`` with the device name and versions.

    python benchmarks/latency.py [--models deit_small_patch16_224 ...] [--batches 1 8 64 256]
        [--bits W4A8 W8A8 W4A4 W3A16] [--baselines eager graphs compile] [--autotune quick|full]
        [--gemm-paths default fused] [--softmax-maths default exact] [--profile]

The JSON is rewritten after every measured row (``"complete": false`` until the end), so a run cut short
keeps what it measured; ``autotune_choices`` records the GEMM and attention tiles the autotuner picked. Each
engine row also carries its build time (calibration included for the first engine of its bits) and the
engine-vs-fake-quant logits cosine on the GPU. ``--autotune quick`` (default) tries three GEMM tiles per shape
instead of thirteen.
``--gemm-paths default fused`` adds, for int4/int3 weights, a second engine of the same quantized model whose
GEMMs unpack the weights inside the K loop at every batch (``dfqvit.kernels.qgemm.gemm_path(False)``; the
default takes the unpack-first path from 1024 rows): rows "dfqvit W4A8 fused-GEMM", timed in the same run.
``--softmax-maths default exact`` adds rows "dfqvit W4A8 exact-softmax": an engine whose log2 attention runs the
reference's portable softmax math (``dfqvit.kernels.attention.softmax_math_override("exact")``) instead of the
CUDA default, the log-domain codes of ``softmax_math="fast"``.
``--profile`` adds to each engine row ``gpu_ms_per_call``: GPU time per call by kernel group (GEMM, attention,
LayerNorm+quantize, PyTorch ops) and the top kernels, from torch.profiler on the eager forward.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

MODELS = ("deit_small_patch16_224", "vit_base_patch16_224", "swin_small_patch4_window7_224")
BATCHES = (1, 8, 64, 256)
ENGINE_BITS = {"W4A8": (4, 8), "W8A8": (8, 8), "W4A4": (4, 4), "W3A16": (3, 16)}
BASELINES = ("eager", "graphs", "compile")
GEMM_PATHS = {"default": "", "fused": " fused-GEMM"}  # path -> suffix of the row's variant name
SOFTMAX_MATHS = {"default": "", "exact": " exact-softmax"}  # attention softmax math -> suffix
RESULTS = Path(__file__).resolve().parent / "results"


def median_ms(fn, x, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn(x)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# Kernel-name substrings -> the part of the model they are; anything else is a PyTorch op ("torch").
KERNEL_GROUPS = (("_qgemm", "gemm"), ("_attention", "attention"), ("_layernorm_quant", "layernorm_quant"))


def kernel_group(name: str) -> str:
    return next((group for key, group in KERNEL_GROUPS if key in name), "torch")


def group_times(events, iters: int, time_attr: str = "self_device_time_total"):
    """{"by_group": {group: ms per call}, "top": [(kernel name, ms per call, launches per call)]} from the
    profiler's averaged ``events`` (``key_averages()``) over ``iters`` calls; times are ``time_attr`` in us."""
    by_group, top = {}, []
    for event in events:
        us = getattr(event, time_attr, 0) or 0
        if us <= 0 or event.key.startswith("aten::"):  # an op's self time repeats its kernels' (2026-11-30 profile)
            continue
        ms = us / 1e3 / iters
        group = kernel_group(event.key)
        by_group[group] = by_group.get(group, 0.0) + ms
        top.append((event.key[:80], ms, event.count / iters))
    top.sort(key=lambda t: -t[1])
    return {"by_group": {g: round(v, 4) for g, v in sorted(by_group.items(), key=lambda kv: -kv[1])},
            "top": [[name, round(ms, 4), round(n, 2)] for name, ms, n in top[:8]]}


def kernel_breakdown(fn, x, iters: int = 3) -> dict:
    """GPU time per call of ``fn(x)`` by kernel group (the engine's GEMM, attention, LayerNorm+quantize kernels and
    PyTorch's own), from torch.profiler over ``iters`` synchronised calls. For the engine, ``fn`` is its eager
    forward (``engine.run``): the same kernels its CUDA graphs replay, each attributed by name."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        fn(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn(x)
            torch.cuda.synchronize()
    return group_times(prof.key_averages(), iters)


def fp16_weight_bytes(model) -> int:
    return sum(m.weight.numel() * 2 for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))


def cuda_graph_fp16(model, example):
    """fp16 timm model captured in one CUDA graph for this batch size."""
    static = example.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            model(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = model(static)

    def run(x):
        static.copy_(x)
        graph.replay()
        return out
    return run


def calibration_images() -> torch.Tensor:
    """8 random 224 px images (seed 0): the calibration set, and the first 4 check the built engine."""
    torch.manual_seed(0)
    return torch.randn(8, 3, 224, 224)


def calibrate_for(float_model, label: str):
    """The fake-quant model at ``label``'s bits: calibration_images(), no reconstruction (the kernels do not care)."""
    import dfqvit

    return dfqvit.compile(float_model, bits=ENGINE_BITS[label], calib=calibration_images(), recon=None,
                          correction=None, device="cuda", progress=False, backend="fake")


def engine_runner(engine, path: str = "default", softmax: str = "default"):
    """The engine as a callable that runs (and captures its CUDA graphs) on GEMM path ``path`` with attention
    softmax math ``softmax`` ("default": the engine's own choice)."""
    from contextlib import ExitStack

    from dfqvit.kernels.attention import softmax_math_override
    from dfqvit.kernels.qgemm import gemm_path

    if path == "default" and softmax == "default":
        return engine

    def run(x):
        with ExitStack() as stack:
            if path == "fused":
                stack.enter_context(gemm_path(False))
            if softmax != "default":
                stack.enter_context(softmax_math_override(softmax))
            return engine(x)
    return run


def build_engine_for(qmodel, path: str = "default", softmax: str = "default"):
    """Build the Triton engine of ``qmodel``; also return the seconds the build took and the engine-vs-fake-quant
    logits cosine on 4 images (correctness at full size on the GPU)."""
    from dfqvit.engine import build_engine
    from dfqvit.kernels.attention import resolve_softmax_math

    start = time.perf_counter()
    engine = build_engine(qmodel, backend="triton")
    engine.check_inputs = False  # the NaN check syncs the host; latency measures the model
    x = calibration_images()[:4].cuda()
    with torch.no_grad():
        got, want = engine_runner(engine, path, softmax)(x).float(), qmodel(x).float()
    torch.cuda.synchronize()
    cosine = float(torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0))
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    math = resolve_softmax_math(torch.device("cuda"), None if softmax == "default" else softmax)
    return engine, {"build_s": time.perf_counter() - start, "cosine_vs_fake": cosine, "top1_agree_vs_fake": agree,
                    "gemm_path": path, "softmax_math": math}


class _EagerEngine:
    """An engine's forward without its CUDA graphs (``engine.run``), for the profiler to name each kernel."""

    def __init__(self, engine):
        self.engine = engine

    def __call__(self, x):
        return self.engine.run(x)


def engine_variants(bits, gemm_paths, softmax_maths=("default",)):
    """(variant name, bits label, GEMM path, softmax math) of each engine row: the default engine, then one row
    per alternative (the fused GEMM path only where weights are packed; softmax math only where A < 16)."""
    rows = []
    for label in bits:
        w_bits, a_bits = ENGINE_BITS[label]
        rows.append((f"dfqvit {label}", label, "default", "default"))
        rows += [(f"dfqvit {label}{GEMM_PATHS[p]}", label, p, "default") for p in gemm_paths
                 if p != "default" and w_bits <= 4]
        rows += [(f"dfqvit {label}{SOFTMAX_MATHS[m]}", label, "default", m) for m in softmax_maths
                 if m != "default" and a_bits < 16]
    return rows


def bench_model(name: str, batches, bits, baselines, warmup: int, iters: int, on_row, gemm_paths=("default",),
                softmax_maths=("default",), profile: bool = False):
    """Time each variant at each batch; ``on_row`` gets every row as soon as it is measured (the JSON is
    rewritten then, so a run cut short keeps what it measured)."""
    import timm

    float_model = timm.create_model(name, pretrained=False).eval()
    fp16 = timm.create_model(name, pretrained=False).eval().half().cuda()
    fp16.load_state_dict({k: v.half() for k, v in float_model.state_dict().items()})
    compiled = torch.compile(fp16) if "compile" in baselines else None
    fp16_bytes = fp16_weight_bytes(fp16)
    qmodels, engines, checks = {}, {}, {}
    for batch in batches:
        x32 = torch.randn(batch, 3, 224, 224, device="cuda")
        x16 = x32.half()
        # Fast-to-build variants first, torch.compile (the slowest to build) last.
        variants = []
        if "eager" in baselines:
            variants.append(("timm fp16 eager", lambda: (lambda x: fp16(x)), x16, fp16_bytes))
        if "graphs" in baselines:
            variants.append(("fp16 CUDA graphs", lambda: cuda_graph_fp16(fp16, x16), x16, fp16_bytes))
        engine_info = {v[0]: v[1:] for v in engine_variants(bits, gemm_paths, softmax_maths)}
        for variant, (label, path, softmax) in engine_info.items():
            variants.append((variant, lambda v=variant, p=path, m=softmax: engine_runner(engines[v], p, m), x32, None))
        if compiled is not None:
            variants.append(("torch.compile fp16", lambda: (lambda x: compiled(x)), x16, fp16_bytes))
        for variant, make, x, nbytes in variants:
            if variant in engine_info and variant not in engines:
                label, path, softmax = engine_info[variant]
                calibrate_s = 0.0
                if label not in qmodels:
                    start = time.perf_counter()
                    qmodels[label] = calibrate_for(float_model, label)
                    calibrate_s = time.perf_counter() - start
                engines[variant], checks[variant] = build_engine_for(qmodels[label], path, softmax)
                checks[variant]["build_s"] += calibrate_s
                print(f"{name:32s} built {variant}: {checks[variant]}", flush=True)
            fn = make()
            nbytes = nbytes if nbytes is not None else engines[variant].weight_nbytes()
            first = time.perf_counter()
            with torch.no_grad():
                fn(x)  # first call: compilation / autotuning / graph capture, timed separately
                torch.cuda.synchronize()
                first_s = time.perf_counter() - first
                ms = median_ms(fn, x, warmup, iters)
            row = {"model": name, "batch": batch, "variant": variant, "latency_ms": ms,
                   "images_per_s": batch / ms * 1e3, "weight_bytes": nbytes,
                   "weight_ratio_vs_fp16": nbytes / fp16_bytes, "first_call_s": first_s}
            row.update(checks.get(variant, {}))
            if profile and variant in engine_info:  # where the engine's time goes (eager: kernels by name)
                label, path, softmax = engine_info[variant]
                eager = engine_runner(_EagerEngine(engines[variant]), path, softmax)
                row["gpu_ms_per_call"] = kernel_breakdown(eager, x)
            on_row(row)
            print(f"{name:32s} {batch:4d} {variant:22s} {ms:9.3f} ms {batch / ms * 1e3:10.1f} img/s "
                  f"{nbytes / 2**20:8.1f} MiB  (first call {first_s:.1f} s)", flush=True)
            if "gpu_ms_per_call" in row:
                groups = row["gpu_ms_per_call"]["by_group"]
                print(f"{'':32s} GPU ms per call: " + ", ".join(f"{g} {v:.3f}" for g, v in groups.items()),
                      flush=True)


def markdown(rows, meta) -> str:
    lines = [f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, timm {meta['timm']}", "",
             "| model | batch | variant | latency (ms) | images/s | weight MiB | weight vs fp16 |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['latency_ms']:.3f} | "
                     f"{r['images_per_s']:.1f} | {r['weight_bytes'] / 2**20:.1f} | {r['weight_ratio_vs_fp16']:.3f} |")
    lines += ["", "| model | batch | dfqvit | best fp16 (same run) | images/s ratio |", "|---|---:|---|---|---:|"]
    for r in ratios(rows):
        lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['best_fp16']} | "
                     f"{r['speedup_vs_best_fp16']:.2f}x |")
    return "\n".join(lines) + "\n"


def ratios(rows):
    """dfqvit images/s over the best fp16 baseline measured at the same model and batch in this run."""
    out = []
    for r in rows:
        if not r["variant"].startswith("dfqvit"):
            continue
        base = [b for b in rows if b["model"] == r["model"] and b["batch"] == r["batch"]
                and not b["variant"].startswith("dfqvit")]
        if base:
            best = max(base, key=lambda b: b["images_per_s"])
            out.append({"model": r["model"], "batch": r["batch"], "variant": r["variant"],
                        "best_fp16": best["variant"], "speedup_vs_best_fp16": r["images_per_s"] / best["images_per_s"],
                        "latency_ratio_vs_best_fp16": r["latency_ms"] / best["latency_ms"]})
    return out


def check_counts(args) -> None:
    """Before any model is built: --iters 0 ended in a StatisticsError (median of no timings) after the builds."""
    from dfqvit.errors import DFQViTError

    for flag, value, low in (("--iters", args.iters, 1), ("--warmup", args.warmup, 0),
                             ("--batches", min(args.batches), 1)):
        if value < low:
            raise DFQViTError(f"{flag} must be >= {low}, got {value}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--bits", nargs="*", default=list(ENGINE_BITS), choices=list(ENGINE_BITS))
    parser.add_argument("--baselines", nargs="+", default=list(BASELINES), choices=list(BASELINES))
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--autotune", choices=("quick", "full"), default="quick",
                        help="GEMM tiles tried per shape: quick = 3 (minutes saved on a lent GPU), full = all")
    parser.add_argument("--gemm-paths", nargs="+", default=["default"], choices=list(GEMM_PATHS),
                        help="'fused' adds engine rows whose int4/int3 GEMMs unpack inside the K loop at every batch")
    parser.add_argument("--softmax-maths", nargs="+", default=["default"], choices=list(SOFTMAX_MATHS),
                        help="'exact' adds engine rows whose attention runs the reference's softmax math (the "
                             "default on CUDA is the log-domain 'fast' one)")
    parser.add_argument("--profile", action="store_true",
                        help="also record each engine row's GPU time per call by kernel group (GEMM, attention, "
                             "LayerNorm+quantize, PyTorch ops) from torch.profiler, eager, 3 calls")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from dfqvit.errors import DFQViTError
    from dfqvit.paths import output_folder, unique_stem, write_json
    try:
        check_counts(args)
        out_dir = output_folder(args.out_dir, "--out-dir")
    except DFQViTError as exc:
        parser.error(str(exc))
    if not torch.cuda.is_available():
        print("benchmarks/latency.py: no CUDA device; nothing measured (the engine's GPU latency needs a GPU).")
        return 0
    os.environ["DFQVIT_AUTOTUNE"] = args.autotune
    from dfqvit.environment import describe_environment

    meta = {**describe_environment(torch.device("cuda")), "warmup": args.warmup, "iters": args.iters,
            "autotune": args.autotune, "input": "224x224 fp32 (engine) / fp16 (baselines), random weights and images",
            "timing": "median of iters synchronised calls after warmup; first_call_s is the first call alone "
                      "(compile, autotune, graph capture)"}
    device_tag = meta["device"].lower().replace(" ", "_")
    base = f"latency_{device_tag}_{time.strftime('%Y%m%d_%H%M%S')}"
    stem = out_dir / unique_stem(out_dir, base, (".json", ".md"))  # a run in the same second gets "-2"
    rows = []

    def write_report(complete: bool):
        from dfqvit.kernels import autotune_choices

        write_json(f"{stem}.json", {"meta": meta, "complete": complete, "rows": rows, "ratios": ratios(rows),
                                    "autotune_choices": autotune_choices()}, indent=2)

    def on_row(row):
        rows.append(row)
        write_report(complete=False)

    write_report(complete=False)  # the reserved file is never left empty

    for name in args.models:
        bench_model(name, args.batches, args.bits, args.baselines, args.warmup, args.iters, on_row,
                    args.gemm_paths, args.softmax_maths, args.profile)
    write_report(complete=True)
    Path(f"{stem}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
