"""``QuantizedModel``: a deep copy of a timm model with quantizable modules swapped in, plus the
switches every stage needs (quantizer state, attention taps, input checks)."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from dfqvit.config import QuantConfig
from dfqvit.errors import DFQViTError, InputShapeError, NonFiniteInputError, warn_user
from dfqvit.nn import AttentionTap, QuantAttentionBase
from dfqvit.nn.linear import _QuantWeightLayer
from dfqvit.quant.quantizers import _Quantizer

from .base import Adapter, InputSpec, find_adapter


def validate_images(x, spec: InputSpec, what: str = "input", finite: bool = True) -> None:
    """Raise a typed error unless ``x`` is a float (B, C, H, W) tensor the model accepts, and (``finite``, the
    ``check_inputs`` setting) holds no NaN / Inf."""
    validate_image_shape(x, spec, what)
    if not finite:
        return
    # A NaN or Inf anywhere makes the sum NaN or Inf: one reduction (~0.07 ms for a 64 x 3 x 32 x 32 batch on 2 CPU
    # cores, against 0.5 ms for isfinite().all()); a sum that overflows from finite values gets the full check.
    x = x.detach()  # a check, not part of the graph (and no warning for inputs that require grad)
    if not math.isfinite(float(x.sum())) and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteInputError(f"{what} contains {bad} NaN/Inf values; clean or re-normalize the images")


def validate_image_shape(x, spec: InputSpec, what: str = "input") -> None:
    """The checks of :func:`validate_images` that read no data (no device sync): type, shape, size, dtype, meta.
    They run even with ``check_inputs=False``: the integer engine has no timm assert behind it, and a Swin of
    another image size ran its windows over the wrong grid without a word."""
    if not isinstance(x, torch.Tensor):
        raise InputShapeError(f"{what} must be a torch.Tensor of shape (B, {spec.channels}, H, W), got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != spec.channels:
        raise InputShapeError(
            f"{what} has shape {tuple(x.shape)}; expected (B, {spec.channels}, {spec.height}, {spec.width}) "
            f"normalized images")
    if spec.strict_size and tuple(x.shape[2:]) != (spec.height, spec.width):
        raise InputShapeError(
            f"{what} has spatial size {tuple(x.shape[2:])} but the model was built for "
            f"{(spec.height, spec.width)}; resize the images (or build the model with that img_size)")
    if not spec.strict_size and any(n % m for n, m in zip(x.shape[2:], spec.size_multiple)):
        raise InputShapeError(
            f"{what} has spatial size {tuple(x.shape[2:])}; this model takes any size that is a multiple of its "
            f"patch size {spec.size_multiple}: resize or crop the images")
    if not x.is_floating_point():
        raise InputShapeError(f"{what} has dtype {x.dtype}; expected float images normalized with mean/std")
    if x.is_meta:  # the finiteness check below failed with "Tensor.item() cannot be called on meta tensors"
        raise InputShapeError(f"{what} is on the meta device (no data); give images on the model's device")


class QuantizedModel(nn.Module):
    """Fake-quant model. ``model`` is the swapped timm model; the original is never touched.

    Attributes:
        config: the QuantConfig it was built with.
        skipped: fqns of layers kept in floating point (by config), reported, never silent.
        input_spec: expected input shape and normalization.
        backend_label: what runs it, as the engine's ``QuantizedViT.backend_label`` says for the engine.
    """

    backend_label = "fake-quant"

    def __init__(self, model: nn.Module, adapter: Adapter, config: QuantConfig, skipped: Sequence[str],
                 input_spec: InputSpec):
        super().__init__()
        self.calib_images_used: Optional[int] = None  # set by the pipeline when it reads the images
        self.model = model
        self.adapter = adapter
        self.config = config
        self.skipped = tuple(skipped)
        self.input_spec = input_spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        refuse_export()
        validate_images(x, self.input_spec, finite=self.config.check_inputs)
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float32:
            x = x.float()  # the model is float32 (adapt); fp16 / bf16 / fp64 images are read as the engine reads them
        if x.shape[0] == 0:  # timm's Swin cannot reshape an empty batch; the engine and timm's ViT give (0, classes)
            width = getattr(self.model, "num_classes", 0) or self.model.num_features
            return x.new_zeros((0, width))
        return self.model(x)

    # -- structure -------------------------------------------------------------------------------------

    @property
    def blocks(self) -> List[nn.Module]:
        return self.adapter.blocks(self.model)

    @property
    def num_prefix_tokens(self) -> int:
        return self.adapter.num_prefix_tokens(self.model)

    @property
    def family(self) -> str:
        return self.adapter.name

    def attention_modules(self) -> List[QuantAttentionBase]:
        return [m for m in self.model.modules() if isinstance(m, QuantAttentionBase)]

    def weight_layers(self) -> Iterator[Tuple[str, _QuantWeightLayer]]:
        for name, m in self.model.named_modules():
            if isinstance(m, _QuantWeightLayer):
                yield name, m

    def quantizers(self) -> Iterator[Tuple[str, _Quantizer]]:
        for name, m in self.model.named_modules():
            if isinstance(m, _Quantizer):
                yield name, m

    def activation_quantizers(self) -> Iterator[Tuple[str, _Quantizer]]:
        return ((n, q) for n, q in self.quantizers() if not n.endswith("weight_quantizer"))

    def __prepare_scriptable__(self):  # torch.jit.script calls this first
        raise DFQViTError(EXPORT_HELP)

    # -- switches --------------------------------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        """Device moves pass; dtype casts (``.half()``, ``.to(torch.float64)``) are refused: the quantizers' grids
        and the calibrated weights are float32, a cast rounds them (another model, which the engine would then be
        built from without a word) and the model cannot run mixed dtypes. Inputs of any float dtype are cast."""
        try:
            probe = fn(torch.zeros((), dtype=torch.float32))
        except (RuntimeError, AssertionError) as exc:  # .cuda() without a driver, or on a CPU-only torch
            raise DFQViTError(f"cannot move the model: {str(exc).splitlines()[0]}") from None
        if probe.dtype != torch.float32:
            raise DFQViTError(
                f"the fake-quant model stays float32 (its grids and calibrated weights would be rounded to "
                f"{probe.dtype}); it takes images of any float dtype as they are. For half-precision activations "
                "build the integer engine: dfqvit.engine.build_engine(qmodel, dtype=torch.float16 or bfloat16)")
        return super()._apply(fn, recurse)

    def uncalibrated_quantizers(self) -> list:
        """Names of the quantizers no calibration has set (empty after dfqvit.compile)."""
        return [n for n, q in self.quantizers() if not bool(q.initialized)]

    def set_quant_state(self, weights: bool, activations: bool) -> None:
        """Turn weight and activation quantization on or off (both off = the float model)."""
        for name, value in (("weights", weights), ("activations", activations)):
            if not isinstance(value, bool):  # a truthy string such as "off" turned quantization on
                raise DFQViTError(f"{name}={value!r}: give True or False")
        for name, q in self.quantizers():
            q.enabled = weights if name.endswith("weight_quantizer") else activations

    @contextlib.contextmanager
    def quant_state(self, weights: bool, activations: bool):
        saved = [(q, q.enabled) for _, q in self.quantizers()]
        self.set_quant_state(weights, activations)
        try:
            yield self
        finally:
            for q, enabled in saved:
                q.enabled = enabled

    @contextlib.contextmanager
    def record_attention(self, probs: bool = True, context: bool = False):
        """Yield one AttentionTap per attention module (model order), refreshed by every forward. Nested uses
        see the innermost taps; on exit the enclosing ones are put back (they used to be cleared)."""
        modules = self.attention_modules()
        taps = [AttentionTap(keep_probs=probs, keep_context=context) for _ in modules]
        previous = [m.tap for m in modules]
        for m, tap in zip(modules, taps):
            m.tap = tap
        try:
            yield taps
        finally:
            for m, tap in zip(modules, previous):
                m.tap = tap

    def extra_repr(self) -> str:
        c = self.config
        return (f"family={self.family}, W{c.w_bits}A{c.a_bits}, softmax={c.softmax_quantizer.value}, "
                f"float_layers={list(self.skipped)}")


EXPORT_HELP = ("torch.export / ONNX export / TorchScript of a dfqvit model is not supported: the engine runs dfqvit's "
               "own kernels, which have no export rules, and the fake-quant model uses ops ONNX lacks (frexp). "
               "torch.jit.trace(model, images) records it (the same logits at other batch sizes); to ship a "
               "quantized model use dfqvit.save(model, path) and dfqvit.load(path)")


def refuse_export() -> None:
    """Raised at the first op instead of deep inside the exporter ("'dict' object has no attribute 'detach'",
    "Could not guard on data-dependent expression")."""
    if torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting():
        raise DFQViTError(EXPORT_HELP)


def checked_normalization(normalization, channels: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """``(mean, std)`` as two tuples of ``channels`` floats: each given as one number or one per channel (a single
    value is every channel's). Refuses other shapes, non-finite values and std <= 0 (it divides)."""
    usage = ("normalization must be (mean, std) of the model's input space, each one number or one per input "
             f"channel ({channels}), e.g. ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))")
    if isinstance(normalization, torch.Tensor):
        normalization = normalization.tolist()
    if isinstance(normalization, (str, bytes)) or not isinstance(normalization, Sequence) or len(normalization) != 2:
        raise DFQViTError(f"{usage}; got {normalization!r}")
    parts = []
    for name, value in zip(("mean", "std"), normalization):
        values = [value] if not isinstance(value, (Sequence, torch.Tensor)) or isinstance(value, str) else value
        try:
            floats = tuple(float(v) for v in values)
        except (TypeError, ValueError):
            raise DFQViTError(f"{usage}; its {name} {value!r} is not numbers") from None
        if len(floats) == 1:
            floats = floats * channels
        if len(floats) != channels:
            raise DFQViTError(f"{usage}; its {name} has {len(floats)} values")
        if not all(math.isfinite(v) for v in floats) or (name == "std" and min(floats) <= 0):
            raise DFQViTError(f"{usage}; its {name} {floats} must be finite" + (" and > 0" if name == "std" else ""))
        parts.append(floats)
    return parts[0], parts[1]


@torch.no_grad()  # a model built under inference_mode: isfinite on its tensors failed under grad mode
def check_finite_weights(model: nn.Module) -> None:
    """Refuse a model to be calibrated whose weights hold NaN / Inf: they spread into other layers' scales through the
    calibration (NaN logits), or failed late in the weight packing. (Not in ``adapt``: a skeleton whose weights an
    artifact replaces may hold anything.)"""
    # meta tensors hold no values: adapt names a model on the meta device
    bad = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
           if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all())]
    if bad:
        raise DFQViTError(f"the model's {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''} hold NaN or Inf values; "
                          "load finite weights (a diverged or damaged checkpoint?)")


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def _drop_hooks(model: nn.Module) -> None:
    """Remove the caller's forward / backward hooks that deepcopy carried over, with a warning: the fake-quant model
    ran them (in the calibration too) and the integer engine did not, so the two gave different logits."""
    hooked = []
    for name, module in model.named_modules():
        dicts = [getattr(module, attr, None) for attr in _HOOK_DICTS]
        if any(dicts):
            hooked.append(name or "the model")
            for d in dicts:
                if d:
                    d.clear()
    if hooked:
        warn_user(f"dfqvit: the hooks registered on {', '.join(hooked[:4])}{' ...' if len(hooked) > 4 else ''} are "
                  "not copied into the quantized model (the integer engine cannot run them); register them on the "
                  "returned model's .model if you need them on the fake-quant model")


def adapt(model: nn.Module, config: Optional[QuantConfig] = None,
          normalization: Optional[Tuple[Sequence[float], Sequence[float]]] = None) -> QuantizedModel:
    """Deep-copy ``model``, swap its quantizable modules and return an (uncalibrated) QuantizedModel. The copy
    is float32 whatever ``model``'s dtype (an fp16 / bf16 model is calibrated from its weights in fp32)."""
    config = config or QuantConfig()
    adapter = find_adapter(model)
    adapter.check(model)
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        raise DFQViTError("the model's weights are on the meta device (built without storage); load its weights "
                          "first, e.g. model.to_empty(device='cpu') then model.load_state_dict(state)")
    copied = copy.deepcopy(model).eval().float()
    _drop_hooks(copied)
    spec = adapter.input_spec(copied)
    if normalization is not None:
        mean, std = checked_normalization(normalization, spec.channels)
        spec = dataclasses.replace(spec, mean=mean, std=std)
    skipped = adapter.swap(copied, config)
    for p in copied.parameters():  # stages that train (reconstruction) opt in explicitly
        p.requires_grad_(False)
    # Eval mode, swapped modules included (they are made in training mode): attention dropout ran in the float
    # path (weight-only models, the pipeline's float reference) and made every call and every compile differ.
    return _without_inference_tensors(QuantizedModel(copied, adapter, config, skipped, spec).eval())


def _without_inference_tensors(module: nn.Module) -> nn.Module:
    """Replace the inference tensors of ``module`` (a model built, or adapted, under torch.inference_mode()) by normal
    copies: calibration updates them in place and reconstruction trains them outside inference mode, which failed
    ("Inplace update to inference tensor outside InferenceMode", "Inference tensors cannot be saved for backward")."""
    with torch.inference_mode(False), torch.no_grad():
        for m in module.modules():
            for name, p in m._parameters.items():
                if p is not None and p.is_inference():
                    m._parameters[name] = nn.Parameter(p.clone(), requires_grad=p.requires_grad)
            for name, b in m._buffers.items():
                if b is not None and b.is_inference():
                    m._buffers[name] = b.clone()
    return module
