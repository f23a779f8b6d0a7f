"""``dfqvit`` command line: quantize | eval | synth. Every command calls the same functions as the
Python API (dfqvit.compile, dfqvit.evaluate.evaluate)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

from .errors import DFQViTError


def _bits(text: str):
    """``4`` -> 4; ``4,8`` / ``4/8`` / ``w4a8`` -> (4, 8) (``config.bits_from_text``); anything else is refused."""
    from .config import bits_from_text

    bits = bits_from_text(text)
    if bits is None:
        raise argparse.ArgumentTypeError(f"{text!r}: give 4 (= W4A4) or weight,activation bits such as 4,8 "
                                         "(also 4/8 or w4a8)")
    return bits


def _add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required,
                   help="reference-model JSON (e.g. ../shared/models/vit_mini_c10.json) or a timm model name")
    p.add_argument("--checkpoint", help="state dict (.safetensors/.pth) for a timm model name")
    p.add_argument("--device", default="cpu", help="cpu or cuda")


# Defaults of the flags that configure a quantization (besides --bits): a command that quantizes nothing refuses
# any of them set to something else, rather than ignoring it.
QUANT_DEFAULTS = {"calib": "spdfq", "calib_images": 32, "softmax": "log2", "seed": 0, "synth_iters": None,
                  "recon_iters": 100, "correction": "diag", "stages_dir": None}
EVAL_DEFAULTS = {"limit": None, "batch_size": 128}
# --correction's values: the CorrectionConfig each one means
CORRECTION_CHOICES = {"diag": {"form": "diag"}, "diag-adam": {"form": "diag", "solver": "adam"}, "full": {"form": "full"}}


def _add_quant_args(p: argparse.ArgumentParser, required: bool) -> None:
    d = QUANT_DEFAULTS
    p.add_argument("--bits", type=_bits, required=required, default=None,
                   help="4 (= W4A4) or w,a such as 4,8; activation bits 16 = weight-only")
    p.add_argument("--calib", default=d["calib"],
                   help="data-free method name (spdfq = the default, as in dfqvit.compile; psaq, psaq_v2, dfqvit, "
                        "gaussian), an .npz / image folder of real images, or a saved SyntheticSet (.safetensors)")
    p.add_argument("--calib-images", type=int, default=d["calib_images"],
                   help="number of calibration images (paper: 32)")
    p.add_argument("--softmax", choices=["log2", "uniform"], default=d["softmax"],
                   help="attention-probability quantizer")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--synth-iters", type=int, default=d["synth_iters"],
                   help="Adam steps of the data-free synthesis (paper: 1000; 50-200 is enough on a CPU)")
    p.add_argument("--recon-iters", type=int, default=d["recon_iters"],
                   help="block-reconstruction steps per block and stage (paper: 100); 0 skips reconstruction")
    p.add_argument("--correction", choices=list(CORRECTION_CHOICES) + ["none"], default=d["correction"],
                   help="DFQ-ViT activation correction: diag folds into weights (free), diag-adam fits the same by "
                        "Adam steps (METHODS 4.2 option), full adds a CxC op")
    p.add_argument("--stages-dir", default=d["stages_dir"],
                   help="save each pipeline stage here and resume from it on the next run")


def _refuse_unused(args, defaults: dict, why: str) -> None:
    """Raise for each flag of ``defaults`` that was set to something else: it would have no effect."""
    given = [f"--{name.replace('_', '-')} {getattr(args, name)}" for name, default in defaults.items()
             if getattr(args, name) != default]
    if given:
        raise DFQViTError(f"{', '.join(given)}: no effect here ({why}); drop {'it' if len(given) == 1 else 'them'}")


def _check_batch_size(args) -> None:
    if args.batch_size < 1:
        raise DFQViTError(f"--batch-size {args.batch_size}: give a batch size of at least 1")


def _output_path(path: Optional[str], flag: str) -> Optional[str]:
    """``path`` with ``~`` expanded, its folder created and checked writable before any long work."""
    if path is None:
        return None
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        raise DFQViTError(f"{flag} {path}: is a folder; give the file to write")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise DFQViTError(f"{flag} {path}: cannot create its folder ({exc.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise DFQViTError(f"{flag} {path}: the folder {folder} is not writable")
    return path


def refuse_overwriting_inputs(args, outputs) -> None:
    """An output that is another output or an input: --report over --out left a truncated artifact, and --out
    over the weights a --model .json lists replaced them, both with exit 0."""
    from .models.loading import model_weight_files

    inputs = {"--model": args.model, "--checkpoint": getattr(args, "checkpoint", None),
              "--calib": getattr(args, "calib", None), "--eval": getattr(args, "eval", None)}
    if args.model and args.model.endswith(".json") and os.path.isfile(args.model):
        inputs.update((f"the weights of --model ({os.path.basename(path)})", path)
                      for path in model_weight_files(args.model, getattr(args, "checkpoint", None)))
    seen = {}
    for flag, path in list(outputs.items()) + list(inputs.items()):
        if not path or not os.path.isfile(path) and flag in inputs:
            continue
        key = os.path.realpath(os.path.expanduser(path))
        if key in seen and (seen[key] in outputs or flag in outputs):
            raise DFQViTError(f"{seen[key]} and {flag} are the same file ({path}); give {seen[key]} another path")
        seen.setdefault(key, flag)


def _calibration_source(args, spec):
    """Method name, or real images / a SyntheticSet read from a path."""
    path = os.path.expanduser(args.calib)
    if not os.path.exists(path):
        if os.sep in args.calib or args.calib.endswith((".npz", ".safetensors")):
            raise DFQViTError(f"--calib {args.calib}: no such file or folder (a method name, an .npz / image folder "
                              "of real images, or a saved SyntheticSet)")
        return args.calib
    if path.endswith(".safetensors"):
        from .synth import SyntheticSet
        return SyntheticSet.load(path)
    from .data import stack_images
    dataset = _images_for(path, spec, args.calib_images)
    return stack_images(dataset, args.calib_images)


def _quant_config(args):
    from .config import QuantConfig, parse_bits

    w_bits, a_bits = parse_bits(args.bits)
    return QuantConfig(w_bits=w_bits, a_bits=a_bits, softmax_quantizer=args.softmax, calib_images=args.calib_images)


def _input_spec(model, norm, config):
    """The input shape and normalization the quantized model will expect (from an uncalibrated copy)."""
    from .models import adapt

    return adapt(model, config, normalization=norm).input_spec


def _quantize(model, norm, args, progress=True, backend: str = "fake", spec=None):
    """``spec``: the model's input spec when the caller has it already (``_input_spec`` deep-copies the model)."""
    from .api import compile as dfq_compile

    config = _quant_config(args)
    calib = _calibration_source(args, spec or _input_spec(model, norm, config))
    if not isinstance(calib, str) and args.synth_iters is not None:  # the report claimed it was used
        raise DFQViTError(f"--synth-iters {args.synth_iters}: no effect with --calib {args.calib} (images already "
                          "made, nothing is synthesized); drop it")
    return dfq_compile(model, None, calib, config=config, normalization=norm, seed=args.seed,
                       device=args.device, progress=progress, backend=backend, **_pipeline_configs(args))


def _images_for(path: str, spec, limit: Optional[int]):
    """Images of an .npz pack or image folder, resized and normalized for a model's input spec."""
    from .data import load_images

    return load_images(path, (spec.height, spec.width), spec.mean, spec.std, limit=limit)


def _pipeline_configs(args) -> dict:
    """SynthConfig / ReconConfig / CorrectionConfig from the command-line flags."""
    from .config import CorrectionConfig, ReconConfig, SynthConfig

    if args.recon_iters < 0:
        raise DFQViTError(f"--recon-iters must be >= 0 (0 skips reconstruction), got {args.recon_iters}")
    configs = {"recon": ReconConfig(iterations=args.recon_iters) if args.recon_iters else None,
               "correction": None if args.correction == "none" else CorrectionConfig(**CORRECTION_CHOICES[args.correction]),
               "stages_dir": args.stages_dir}
    if args.synth_iters is not None:
        if args.synth_iters < 1:
            raise DFQViTError(f"--synth-iters must be >= 1, got {args.synth_iters}")
        configs["synth"] = SynthConfig(iterations=args.synth_iters)
    return configs


def cmd_quantize(args) -> int:
    from .api import as_backend, preflight_backend
    from .evaluate import evaluate
    from .models.loading import load_model

    if not args.eval:
        _refuse_unused(args, {**EVAL_DEFAULTS, "backend": "auto"}, "used only with --eval, which is not given")
    out, report_path = _output_path(args.out, "--out"), _output_path(args.report, "--report")
    if out is not None and not out.lower().endswith(".safetensors"):  # as `dfqvit synth --out`; x.pt was written as is
        raise DFQViTError(f"--out {out}: the quantized model is saved as a QuantArtifact, a .safetensors file; name it "
                          f"{os.path.splitext(out)[0]}.safetensors")
    refuse_overwriting_inputs(args, {"--out": out, "--report": report_path})
    model, norm = load_model(args.model, args.checkpoint)
    config = _quant_config(args)
    spec = _input_spec(model, norm, config)
    eval_backend = eval_data = None
    if args.eval:  # everything --eval needs is checked (and its images read) before the calibration, not after
        _check_batch_size(args)
        eval_backend = preflight_backend(model, args.backend, config, args.device)
        eval_data = _images_for(args.eval, spec, args.limit)
        eval_data.verify(progress=True)  # a file that is not an image failed after the whole quantization
    start = time.perf_counter()
    qmodel = _quantize(model, norm, args, spec=spec)
    seconds = time.perf_counter() - start
    report = {"model": args.model, "bits": [qmodel.config.w_bits, qmodel.config.a_bits],
              "calib": args.calib, "calib_images": args.calib_images,
              "calib_images_used": getattr(qmodel, "calib_images_used", None), "seed": args.seed,
              "synth_iters": args.synth_iters, "recon_iters": args.recon_iters, "correction": args.correction,
              "quantize_seconds": round(seconds, 2), "float_layers": list(qmodel.skipped)}
    print(f"quantized {args.model} to W{qmodel.config.w_bits}A{qmodel.config.a_bits} "
          f"with {args.calib} calibration in {seconds:.1f} s (float layers: {', '.join(qmodel.skipped) or 'none'})")
    if out:
        from .api import save
        save(qmodel, out)
        report["artifact"] = out
        print(f"wrote {out} ({os.path.getsize(out) / 2**20:.2f} MiB)")
    else:
        print("the quantized model is not saved (--out FILE.safetensors keeps it)")
    if args.eval:
        data = eval_data
        runner = as_backend(qmodel, eval_backend)  # the integer engine by default
        fp = evaluate(model.to(args.device), data, args.batch_size, device=args.device, desc="eval fp32")
        q = evaluate(runner, data, args.batch_size, reference=model, device=args.device, desc="eval quantized")
        report.update(eval_data=args.eval, eval_images=q.images, eval_backend=runner.backend_label,
                      fp32_top1=round(fp.top1, 2), quant_top1=round(q.top1, 2), top1_agreement=round(q.agreement, 2))
        print(f"top-1 on {q.images} images: fp32 {fp.top1:.2f}%  W{qmodel.config.w_bits}A{qmodel.config.a_bits} "
              f"{q.top1:.2f}% on {runner.backend_label}  (agreement with fp32 {q.agreement:.2f}%)")
    if report_path:
        with open(report_path, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {report_path}")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate
    from .models.loading import load_model

    _check_batch_size(args)
    if args.artifact:
        from .api import load
        from .config import parse_bits
        _refuse_unused(args, {**QUANT_DEFAULTS, "checkpoint": None}, "the artifact is quantized already")
        if args.model:
            raise DFQViTError("dfqvit eval takes --model (quantized here when --bits is given) or --artifact (a saved "
                              "model), not both")
        qmodel = load(args.artifact, device=args.device, backend=args.backend or "auto")
        saved = (qmodel.config.w_bits, qmodel.config.a_bits)
        wanted = None if args.bits is None else parse_bits(args.bits)
        if wanted is not None and wanted != saved:
            raise DFQViTError(f"--bits W{wanted[0]}A{wanted[1]} does not match the artifact, which is "
                              f"W{saved[0]}A{saved[1]}: a saved "
                              "model keeps its bits. Drop --bits, or quantize again with `dfqvit quantize --bits "
                              "W,A --out FILE`.")
        data = _images_for(args.data, qmodel.input_spec, args.limit)
        result = evaluate(qmodel, data, args.batch_size, device=args.device)
        print(f"W{qmodel.config.w_bits}A{qmodel.config.a_bits} ({args.artifact}, {qmodel.backend_label}) top-1: "
              f"{result.top1:.2f}% on {result.images} images")
        return 0
    if not args.model:
        raise DFQViTError("dfqvit eval needs --model (a model JSON or timm name) or --artifact (a saved model)")
    model, norm = load_model(args.model, args.checkpoint)
    spec = _input_spec(model, norm, None)  # the input spec does not depend on the bits
    data = _images_for(args.data, spec, args.limit)
    if args.bits is None:
        if args.backend is not None:
            raise DFQViTError(f"--backend {args.backend} runs a quantized model: add --bits (quantize here) or use "
                              "--artifact (a saved model)")
        _refuse_unused(args, QUANT_DEFAULTS, "used only to quantize, and without --bits the model runs fp32")
        result = evaluate(model.to(args.device), data, args.batch_size, device=args.device)
        print(f"fp32 top-1: {result.top1:.2f}% on {result.images} images")
    else:
        qmodel = _quantize(model, norm, args, backend=args.backend or "auto", spec=spec)
        result = evaluate(qmodel, data, args.batch_size, device=args.device)
        print(f"W{qmodel.config.w_bits}A{qmodel.config.a_bits} ({qmodel.backend_label}) top-1: {result.top1:.2f}% "
              f"on {result.images} images")
    return 0


BACKEND_CHOICES = ["auto", "native", "torch", "triton", "fake"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfqvit", description="Data-free low-bit quantization of Vision Transformers")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and optionally compare its top-1 with fp32")
    _add_model_args(q)
    _add_quant_args(q, required=False)
    q.set_defaults(bits=4)
    q.add_argument("--eval", help="evaluation images (.npz of ../shared/data or an image folder)")
    q.add_argument("--limit", type=int, help="evaluate on this many images (evenly spread)")
    q.add_argument("--batch-size", type=int, default=128)
    q.add_argument("--report", help="write the results as JSON here")
    q.add_argument("--out", help="save the quantized model as a QuantArtifact (.safetensors) here")
    q.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help="what --eval runs: the integer engine (auto = Triton on CUDA, native C++ kernels on a CPU "
                        "where they are built for AVX2 or later, else PyTorch; or native / torch / triton) or the "
                        "fake-quant model (fake)")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="top-1 accuracy of a model (quantized when --bits is given)")
    _add_model_args(e, required=False)
    _add_quant_args(e, required=False)
    e.add_argument("--artifact", help="evaluate a model saved by `dfqvit quantize --out` instead of --model")
    e.add_argument("--backend", choices=BACKEND_CHOICES,
                   help="for --artifact and for --model with --bits: the integer engine (auto, the default; native / "
                        "torch / triton) or the fake-quant model (fake)")
    e.add_argument("--data", required=True, help="evaluation images (.npz or image folder)")
    e.add_argument("--limit", type=int)
    e.add_argument("--batch-size", type=int, default=128)
    e.set_defaults(func=cmd_eval)

    from .synth.cli import add_synth_arguments, run_synth
    s = sub.add_parser("synth", help="synthesize calibration images (data-free) and save them / a PNG grid")
    add_synth_arguments(s)
    s.set_defaults(func=run_synth)
    return parser


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as one line: the default names the dfqvit script's own line (``bin/dfqvit:8``) and prints it."""
    return f"dfqvit: warning: {str(message).removeprefix('dfqvit: ')}\n"


def main(argv: Optional[List[str]] = None) -> int:
    import warnings

    args = build_parser().parse_args(argv)
    default_format, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        if getattr(args, "device", None) is not None:  # "cuda" without a GPU / "gpu": torch's raw errors
            from .api import resolve_device
            args.device = str(resolve_device(args.device, "--device"))
        return args.func(args)
    except DFQViTError as exc:
        print(f"dfqvit: error: {exc}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = default_format


if __name__ == "__main__":
    sys.exit(main())
