"""The ``dfqvit synth`` subcommand: make a SyntheticSet for a model, save it and/or draw a grid.

``dfqvit/cli.py`` wires it in with ``add_synth_arguments(parser)`` and ``run_synth(args)``."""
from __future__ import annotations

import argparse
import os
import time

import torch

from dfqvit.config import QuantConfig, SynthConfig, parse_bits
from dfqvit.errors import DFQViTError

from .base import available_methods, reads_quantized_model, synthesize

DEFAULT_METHOD = "spdfq"


def _alpha(text: str):
    """alpha1: a number, or a model name looked up in the paper's table."""
    try:
        return float(text)
    except ValueError:
        return text


def _bits(text: str):
    from dfqvit.cli import _bits as parse  # dfqvit.cli imports this module

    return parse(text)


def add_synth_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True,
                        help="reference-model JSON (e.g. ../shared/models/vit_mini_c10.json) or a timm model name")
    parser.add_argument("--checkpoint", default=None, help="state dict (.safetensors/.pth) for a timm model name")
    parser.add_argument("--method", default=DEFAULT_METHOD,
                        help=f"synthesis method, one of {available_methods()} (default {DEFAULT_METHOD})")
    parser.add_argument("--bits", type=_bits, default=None,
                        help="the quantized model the psaq_v2 / dfqvit methods make images against (their student / "
                             "adversary): 4 (= W4A4, the default) or w,a such as 4,8; quantize with the same --bits")
    parser.add_argument("--num-images", type=int, default=32, help="images to make (paper: 32)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="optimisation steps (paper: 1000); lower it for quick CPU runs")
    parser.add_argument("--alpha-apa", type=_alpha, default=None,
                        help="SPDFQ alpha1: a number or a model name such as deit_small (default: by model name)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="where to save the SyntheticSet (.safetensors)")
    parser.add_argument("--grid", default=None, help="where to write a labelled PNG grid of the images")
    parser.add_argument("--class-names", default=None, help="comma-separated class names for the grid labels")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _device(name) -> torch.device:
    """``--device``, checked as ``compile(device=)`` checks it; none given: CUDA when there is one."""
    from dfqvit.api import resolve_device

    return resolve_device(name if name is not None else ("cuda" if torch.cuda.is_available() else "cpu"), "--device")


GRID_FORMATS = (".png", ".jpg", ".jpeg", ".pdf", ".svg")


def run_synth(args: argparse.Namespace) -> int:
    """Load the model, synthesize, write --out and/or --grid. Returns the exit code."""
    from dfqvit.cli import _output_path, refuse_overwriting_inputs
    from dfqvit.models import adapt
    from dfqvit.models.loading import load_model

    if not args.out and not args.grid:
        raise DFQViTError("dfqvit synth needs --out PATH.safetensors and/or --grid PATH.png to write its result")
    # Checked before the synthesis (minutes), not after it.
    if args.num_images < 1:
        raise DFQViTError(f"--num-images {args.num_images}: make at least 1 image")
    if args.out and not args.out.lower().endswith(".safetensors"):
        raise DFQViTError(f"--out {args.out}: a SyntheticSet is a .safetensors file; name it PATH.safetensors")
    if args.grid and os.path.splitext(args.grid)[1].lower() not in GRID_FORMATS:
        raise DFQViTError(f"--grid {args.grid}: give an image file name ending in one of {', '.join(GRID_FORMATS)}")
    args.out, args.grid = _output_path(args.out, "--out"), _output_path(args.grid, "--grid")
    refuse_overwriting_inputs(args, {"--out": args.out, "--grid": args.grid})  # --out over --checkpoint: exit 0
    changes = {}
    if args.iterations is not None:
        changes["iterations"] = args.iterations
    if args.alpha_apa is not None:
        changes["alpha_apa"] = args.alpha_apa
    config = SynthConfig(**changes)
    if args.bits is not None and not reads_quantized_model(args.method):
        raise DFQViTError(f"--bits: the {args.method} method does not read the quantized model (only "
                          f"{', '.join(m for m in available_methods() if reads_quantized_model(m))} do); drop it")
    quant = QuantConfig(*parse_bits(args.bits)) if args.bits is not None else None
    model, normalization = load_model(args.model, args.checkpoint)
    qmodel = adapt(model, quant, normalization=normalization).to(_device(args.device))
    start = time.perf_counter()
    result = synthesize(args.method, qmodel, num_images=args.num_images, seed=args.seed, config=config,
                        progress=not args.quiet)
    seconds = time.perf_counter() - start
    print(f"synthesized {len(result)} {args.method} images for {args.model} in {seconds:.1f} s (seed {args.seed})")
    if args.out:
        result.save(args.out)
        print(f"saved the SyntheticSet to {args.out}")
    if args.grid:
        from .grid import save_grid

        names = [n.strip() for n in args.class_names.split(",")] if args.class_names else None
        spec = qmodel.input_spec
        save_grid(result, args.grid, spec.mean, spec.std, class_names=names)
        print(f"wrote the image grid to {args.grid}")
    return 0
