"""End-to-end latency of timm fp16 baselines and the dfqvit engine, side by side in one run (CUDA only).

For DeiT-S, ViT-B and Swin-S at 224 (random weights) and batch 1, 8, 64, 256: timm fp16 eager,
``torch.compile`` fp16, fp16 under CUDA graphs, and the engine at W8A8, W4A8, W4A4, W3A16. Reports the
median latency over many synchronised runs after warm-up, images/s and weight bytes; prints a table and
writes JSON + markdown under ``benchmarks/results/`` with the device name and versions.

    python benchmarks/latency.py [--models deit_small_patch16_224 ...] [--batches 1 8 64 256]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

MODELS = ("deit_small_patch16_224", "vit_base_patch16_224", "swin_small_patch4_window7_224")
BATCHES = (1, 8, 64, 256)
ENGINE_BITS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4), "W3A16": (3, 16)}
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


def bench_model(name: str, batches, warmup: int, iters: int):
    import timm

    import dfqvit
    from dfqvit.engine import build_engine

    rows = []
    float_model = timm.create_model(name, pretrained=False).eval()
    fp16 = timm.create_model(name, pretrained=False).eval().half().cuda()
    fp16.load_state_dict({k: v.half() for k, v in float_model.state_dict().items()})
    compiled = torch.compile(fp16)
    fp16_bytes = fp16_weight_bytes(fp16)
    engines = {}
    for label, bits in ENGINE_BITS.items():
        calib = torch.randn(8, 3, 224, 224)
        qmodel = dfqvit.compile(float_model, bits=bits, calib=calib, recon=None, correction=None, device="cuda",
                                progress=False)
        engine = build_engine(qmodel, backend="triton")
        engine.check_inputs = False  # the NaN check syncs the host; latency measures the model
        engines[label] = engine
    for batch in batches:
        x32 = torch.randn(batch, 3, 224, 224, device="cuda")
        x16 = x32.half()
        variants = [("timm fp16 eager", lambda x: fp16(x), x16, fp16_bytes),
                    ("torch.compile fp16", lambda x: compiled(x), x16, fp16_bytes),
                    ("fp16 CUDA graphs", cuda_graph_fp16(fp16, x16), x16, fp16_bytes)]
        variants += [(f"dfqvit {label}", engine, x32, engine.weight_nbytes()) for label, engine in engines.items()]
        for variant, fn, x, nbytes in variants:
            with torch.no_grad():
                ms = median_ms(fn, x, warmup, iters)
            rows.append({"model": name, "batch": batch, "variant": variant, "latency_ms": ms,
                         "images_per_s": batch / ms * 1e3, "weight_bytes": nbytes,
                         "weight_ratio_vs_fp16": nbytes / fp16_bytes})
            print(f"{name:32s} {batch:4d} {variant:22s} {ms:9.3f} ms {batch / ms * 1e3:10.1f} img/s "
                  f"{nbytes / 2**20:8.1f} MiB", flush=True)
    return rows


def markdown(rows, meta) -> str:
    lines = [f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, timm {meta['timm']}", "",
             "| model | batch | variant | latency (ms) | images/s | weight MiB | weight vs fp16 |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['latency_ms']:.3f} | "
                     f"{r['images_per_s']:.1f} | {r['weight_bytes'] / 2**20:.1f} | {r['weight_ratio_vs_fp16']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/latency.py: no CUDA device; nothing measured (the engine's GPU latency needs a GPU).")
        return 0
    import timm
    import triton

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "timm": timm.__version__, "python": platform.python_version(), "warmup": args.warmup,
            "iters": args.iters}
    rows = []
    for name in args.models:
        rows += bench_model(name, args.batches, args.warmup, args.iters)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"latency-{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (RESULTS / f"latency-{stamp}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
