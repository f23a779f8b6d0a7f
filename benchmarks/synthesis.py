"""Wall time of one data-free synthesis run (issue 4's speed figures); prints a table, writes JSON.

Two shapes:
  cpu-target  DeiT-Tiny-sized ViT at 32x32 (patch 4, dim 192, depth 6, 3 heads, 10 classes),
              32 images x 200 iterations -- the CPU target is under 10 minutes on 2 cores;
  deit_s      timm deit_small_patch16_224 at 224 (random weights), 32 images x 1000 iterations
              (the paper's setting) -- meant for a GPU.

    python benchmarks/synthesis.py [--shape cpu-target|deit_s] [--method spdfq] [--iterations N] [--device cuda]

Writes ``synthesis_<shape>_<device>_<method>_<timestamp>.json`` (``-2`` etc. when that name is taken).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dfqvit.errors import DFQViTError
from dfqvit.paths import output_folder, unique_stem, write_json

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {
    "cpu-target": {"iterations": 200, "kwargs": dict(img_size=32, patch_size=4, embed_dim=192, depth=6,
                                                      num_heads=3, num_classes=10)},
    "deit_s": {"iterations": 1000, "timm_name": "deit_small_patch16_224"},
}


def build_model(shape: str) -> torch.nn.Module:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    spec = SHAPES[shape]
    if "timm_name" in spec:
        return timm.create_model(spec["timm_name"], pretrained=False).eval()
    return VisionTransformer(**spec["kwargs"]).eval()


def time_synthesis(shape: str, method: str, iterations: int, num_images: int, device: torch.device) -> dict:
    import dfqvit
    from dfqvit.config import SynthConfig
    from dfqvit.synth import synthesize

    qmodel = dfqvit.adapt(build_model(shape), normalization=((0.5,) * 3, (0.5,) * 3)).to(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    synthesize(method, qmodel, num_images=num_images, seed=0, config=SynthConfig(iterations=iterations))
    sync()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"shape": shape, "method": method, "images": num_images, "iterations": iterations,
            "wall_s": round(wall, 1), "process_cpu_s": round(cpu, 1), "s_per_iteration": round(wall / iterations, 3)}


def check_args(args) -> torch.device:
    """The flags, checked before the model is built (they failed with tracebacks after it); returns the device."""
    from dfqvit.api import resolve_device
    from dfqvit.synth import available_methods

    if args.method not in available_methods():
        raise DFQViTError(f"--method {args.method!r} is not a synthesis method; choose from "
                          f"{', '.join(available_methods())}")
    for flag, value in (("--iterations", args.iterations), ("--images", args.images)):
        if value is not None and value < 1:  # --iterations 0 used to run the shape's default instead
            raise DFQViTError(f"{flag} must be >= 1, got {value}")
    return resolve_device(args.device)  # cpu or cuda only: "meta" was recorded as cpu


def run(args) -> int:
    device = check_args(args)
    out_dir = output_folder(args.out)  # before the synthesis, not after
    iterations = SHAPES[args.shape]["iterations"] if args.iterations is None else args.iterations
    row = time_synthesis(args.shape, args.method, iterations, args.images, device)
    from dfqvit.environment import describe_environment

    meta = describe_environment(device)
    print(f"{row['shape']:<11} {row['method']:<7} {row['images']} images x {row['iterations']} iterations on "
          f"{meta['device']}: {row['wall_s']:.1f} s wall ({row['s_per_iteration']:.3f} s/iteration, "
          f"{row['process_cpu_s']:.1f} s process CPU)")
    stamp = time.strftime("%Y%m%d_%H%M%S")
    # the method is in the name: runs of different methods in the same second wrote one file
    stem = unique_stem(out_dir, f"synthesis_{args.shape}_{device.type}_{args.method}_{stamp}")
    out = out_dir / f"{stem}.json"
    write_json(out, {"benchmark": "synthesis", "timestamp": stamp, "env": meta, "result": row})
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu-target")
    parser.add_argument("--method", default="spdfq", help="spdfq, psaq, dfqvit or gaussian")
    parser.add_argument("--iterations", type=int, help="default: 200 (cpu-target) or 1000 (deit_s)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except DFQViTError as exc:  # bad arguments (checked first) or a refusal from the synthesis
        parser.error(str(exc))


if __name__ == "__main__":
    raise SystemExit(main())
