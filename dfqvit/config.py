"""Frozen configuration dataclasses. Every research constant is a named field whose default is the
paper's value, with the equation or table it comes from (see ../shared/design/METHODS.md)."""
from __future__ import annotations

import dataclasses
import enum
import math
import operator
import re
from typing import Any, Dict, Optional, Tuple, Union

from .errors import CalibrationError, DFQViTError, UnsupportedBitsError

WEIGHT_BITS = (3, 4, 5, 6, 7, 8)
ACTIVATION_BITS = (4, 5, 6, 7, 8, 16)  # 16 = activations stay floating point (weight-only)
IMAGE_BITS = (4, 5, 6, 7, 8)  # the image quantizer of a quantized patch embedding

# [I&S] weight percentile candidates (METHODS §1.2); SPDFQ runs the I&S pipeline.
IS_WEIGHT_PERCENTILES = (0.97, 0.98, 0.99, 0.995, 0.9995, 0.9997, 0.9999, 0.99995, 0.99999)
# [RepQ, I&S] activation percentile candidates (METHODS §1.2).
ACT_PERCENTILES = (0.999, 0.9999, 0.99999)


class SoftmaxQuantizer(str, enum.Enum):
    """How post-softmax attention probabilities are quantized."""

    LOG2 = "log2"        # SPDFQ eq. 2, levels delta * 2^-k, underflow -> 0 (main tables)
    UNIFORM = "uniform"  # SPDFQ supplementary Table 3 (W8A8 / W4A8 rows)


def as_int(value) -> Optional[int]:
    """``value`` as a plain int when it is an integer (numpy integers included; bools and floats are not)."""
    if isinstance(value, bool) or getattr(value, "dtype", None) == bool:
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.manual_seed takes


def check_seed(seed) -> int:
    """``seed`` as an int that torch.manual_seed takes (2**64 raised "Overflow when unpacking long long")."""
    value = as_int(seed)
    if value is None:
        raise CalibrationError(f"seed={seed!r}: give an int (it seeds the synthesis and the reconstruction's batches)")
    if not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise CalibrationError(f"seed={seed}: give an int from -2**63 to 2**64 - 1 (what torch.manual_seed takes)")
    return value


# The written forms of bits (the CLI's --bits, the accuracy benchmark's settings): 4, 4,8 (or 4/8), w4a8.
_BITS_TEXT_FORMS = (re.compile(r"^(\d+)$"), re.compile(r"^(\d+)\s*[,/]\s*(\d+)$"), re.compile(r"^w(\d+)a(\d+)$"))


def bits_from_text(text: str) -> Optional[Union[int, Tuple[int, int]]]:
    """``4`` -> 4; ``4,8`` / ``4/8`` / ``w4a8`` (any case) -> (4, 8); None for any other text. The values are checked
    by :func:`parse_bits`. (Stripping letters instead read ``a8`` as W8A8 and ``w4a`` as W4A4.)"""
    for form in _BITS_TEXT_FORMS:
        match = form.match(str(text).strip().lower())
        if match:
            parts = [int(p) for p in match.groups()]
            return parts[0] if len(parts) == 1 else tuple(parts)
    return None


def parse_bits(bits: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    """``4`` -> (4, 4); ``(4, 8)`` -> (4, 8). Raises UnsupportedBitsError with the allowed values."""
    if as_int(bits) is not None:
        w_bits = a_bits = as_int(bits)
    elif isinstance(bits, (tuple, list)):
        if len(bits) != 2 or any(as_int(b) is None for b in bits):
            raise UnsupportedBitsError(f"bits={bits!r}: a tuple must be two ints (weight_bits, activation_bits)")
        w_bits, a_bits = (as_int(b) for b in bits)
    else:
        raise UnsupportedBitsError(
            f"bits={bits!r}: give an int (same bits for weights and activations, e.g. 4) "
            f"or a (weight_bits, activation_bits) tuple, e.g. (4, 8)")
    _check_bits(w_bits, a_bits)
    return w_bits, a_bits


def _check_bits(w_bits: int, a_bits: int) -> None:
    if as_int(w_bits) not in WEIGHT_BITS:
        raise UnsupportedBitsError(
            f"weight bits {w_bits!r} not supported; allowed: {WEIGHT_BITS} "
            f"(packed storage for 3 and 4 bits, int8 storage for 5..8)")
    if as_int(a_bits) not in ACTIVATION_BITS:
        raise UnsupportedBitsError(
            f"activation bits {a_bits!r} not supported; allowed: {ACTIVATION_BITS} "
            f"(16 keeps activations in floating point, i.e. weight-only quantization)")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """What is quantized and how (METHODS §1).

    Args:
        w_bits: weight bits, channel-wise asymmetric uniform quantizer (SPDFQ eq. 1, §4.1).
        a_bits: activation bits, layer-wise asymmetric uniform quantizer; 16 = weight-only.
        softmax_quantizer: quantizer of the attention probabilities (left operand of attn @ v),
            at ``a_bits``. LOG2 is SPDFQ eq. 2; UNIFORM reproduces the supplementary W8A8/W4A8 table.
        weight_percentiles: candidate upper percentiles for the weight range search (I&S list).
        act_percentiles: candidate upper percentiles for the activation range search (RepQ/I&S).
        quantize_patch_embed: quantize the patch-embedding conv (RepQ: yes; I&S: no): its weights at ``w_bits``,
            the image in front of it at ``image_bits`` (unless activations stay float, A16).
        image_bits: bits of that image quantizer (RepQ: 8, whatever ``a_bits``; METHODS §1.5). Configs saved before
            this field quantized the image at ``a_bits`` and read back so.
        quantize_head: quantize the classifier head(s) at the same bits (every nn.Linear, METHODS §1.5).
        calib_images: how many calibration images are used (SPDFQ §4.1: 32 in total). Each unit is calibrated
            on all of them in one forward (its percentiles are over all images), so this also bounds memory.
        search_max_elements: activation tensors larger than this are range-searched on a fixed,
            evenly strided subsample (torch.quantile / sort cost, Pitfall 5).
        check_inputs: check that every input of the quantized model is finite (a reduction and a device sync per
            call). Type, shape, size and dtype are checked either way.
    """

    w_bits: int = 4
    a_bits: int = 4
    softmax_quantizer: SoftmaxQuantizer = SoftmaxQuantizer.LOG2
    weight_percentiles: Tuple[float, ...] = IS_WEIGHT_PERCENTILES
    act_percentiles: Tuple[float, ...] = ACT_PERCENTILES
    quantize_patch_embed: bool = False
    image_bits: int = 8
    quantize_head: bool = True
    calib_images: int = 32
    search_max_elements: int = 1 << 24
    check_inputs: bool = True

    version = 1  # class attribute, written into saved configs

    def __post_init__(self):
        # Plain ints (numpy integers accepted) so the config saves as JSON; a float or string count is refused here,
        # not deep inside the calibration.
        _check_bits(self.w_bits, self.a_bits)
        for name in ("w_bits", "a_bits", "calib_images", "search_max_elements"):
            value = as_int(getattr(self, name))
            if value is None or value < 1:
                raise DFQViTError(f"{name}={getattr(self, name)!r}: must be an integer >= 1")
            object.__setattr__(self, name, value)
        if as_int(self.image_bits) not in IMAGE_BITS:
            raise UnsupportedBitsError(f"image_bits={self.image_bits!r} not supported; allowed: {IMAGE_BITS} (the image "
                                       "quantizer of a quantized patch embedding; RepQ: 8)")
        object.__setattr__(self, "image_bits", as_int(self.image_bits))
        try:
            object.__setattr__(self, "softmax_quantizer", SoftmaxQuantizer(self.softmax_quantizer))
        except ValueError:
            raise DFQViTError(f"softmax_quantizer={self.softmax_quantizer!r}; allowed: "
                              f"{[q.value for q in SoftmaxQuantizer]} (or dfqvit.SoftmaxQuantizer)") from None
        if self.a_bits == 16 and self.softmax_quantizer != SoftmaxQuantizer.LOG2:  # it gave the same model
            raise DFQViTError(f"softmax_quantizer='{self.softmax_quantizer.value}': no effect at a_bits=16 (weight-only "
                              "quantization keeps the attention probabilities in float); drop it")
        for name in ("weight_percentiles", "act_percentiles"):
            try:
                values = tuple(float(p) for p in getattr(self, name))
            except (TypeError, ValueError):
                values = ()
            if not values or not all(0.5 < p <= 1.0 for p in values):
                raise DFQViTError(f"{name}={getattr(self, name)!r}: need a non-empty list of percentiles in (0.5, 1]")
            object.__setattr__(self, name, values)

    @property
    def quantize_activations(self) -> bool:
        return self.a_bits < 16

    def to_dict(self) -> Dict[str, Any]:
        return config_to_dict(self)


_CONFIG_CLASSES: Dict[str, type] = {}


def register_config(cls):
    """Allow-list a config class for :func:`config_from_dict` (loading never builds other types)."""
    _CONFIG_CLASSES[cls.__name__] = cls
    return cls


register_config(QuantConfig)


def config_to_dict(config) -> Dict[str, Any]:
    data = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, tuple):
            value = list(value)
        elif dataclasses.is_dataclass(value):
            value = config_to_dict(value)
        data[f.name] = value
    return {"_type": type(config).__name__, "_version": type(config).version, "_data": data}


def _not_finite_numbers(config, text_fields=()) -> list:
    """The numeric fields of a config (scalars or tuples, None allowed) that hold something other than a finite
    real number: inf / NaN passed the range checks and came out as NaN images or losses much later."""
    problems = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in text_fields and isinstance(value, str) or value is None:
            continue
        if field.type in ("bool", bool, "Optional[bool]"):
            if not isinstance(value, bool):
                allowed = "None, True or False" if field.type == "Optional[bool]" else "True or False"
                problems.append(f"{field.name}={value!r} ({allowed})")
            continue
        values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            problems.append(f"{field.name}={value!r} (finite numbers)")
    return problems


# Fields older dfqvit versions wrote that never changed a result: dropped when read, so their files still load.
# QuantConfig.calib_batch_size: the calibration always ran each unit on all calib_images at once.
RETIRED_FIELDS = {"QuantConfig": ("calib_batch_size",)}


def _read_as_today(name: str, data: Dict[str, Any]) -> Dict[str, Any]:
    """Saved configs as today's fields mean them: an A16 config with the uniform softmax quantizer (A16 has none;
    refused for new configs, it never changed a result) reads as log2, and one saved before ``image_bits`` quantized
    the image at ``a_bits``, so artifacts and stage files saved so still load and run as they did (stage files are
    keyed on the whole config, so a run recomputes those saved before a field was added once)."""
    data = {k: v for k, v in data.items() if k not in RETIRED_FIELDS.get(name, ())}
    if name == "QuantConfig" and data.get("a_bits") == 16:
        data["softmax_quantizer"] = SoftmaxQuantizer.LOG2.value
    if name == "QuantConfig" and "image_bits" not in data and data.get("a_bits") in IMAGE_BITS:
        data["image_bits"] = data["a_bits"]  # saved before the field: the image was quantized at a_bits
    return data


def config_from_dict(payload: Dict[str, Any]):
    """Rebuild a config written by :func:`config_to_dict`; only allow-listed classes are built."""
    try:
        name, version, data = payload["_type"], payload["_version"], payload["_data"]
    except (KeyError, TypeError) as exc:
        raise DFQViTError(f"not a dfqvit config payload (need _type, _version, _data): {payload!r}") from exc
    cls = _CONFIG_CLASSES.get(name)
    if cls is None:
        raise DFQViTError(f"unknown config type {name!r}; known: {sorted(_CONFIG_CLASSES)}")
    if version != cls.version:
        raise DFQViTError(f"{name} version {version} was written by another dfqvit; this one reads version {cls.version}")
    if not isinstance(data, dict):
        raise DFQViTError(f"{name} payload: _data must be a JSON object, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    data = _read_as_today(name, data)
    unknown = set(data) - set(known)
    if unknown:
        raise DFQViTError(f"{name} has no fields {sorted(unknown)}")
    kwargs = {}
    for key, value in data.items():
        if isinstance(value, dict) and "_type" in value:
            value = config_from_dict(value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


# SPDFQ §4.1: alpha1 of eq. 13, grid-searched per model. Keys are timm architecture prefixes.
ALPHA_APA_BY_MODEL = {
    "deit_tiny": 1e5, "deit_small": 1e5, "deit_base": 1e4,
    "vit_small": 1.0, "vit_base": 100.0,
    "swin_small": 10.0, "swin_base": 100.0,
}
# The paper's short names (DeiT-S, Swin-B, ...) accepted as well.
_MODEL_ALIASES = {"deit_t": "deit_tiny", "deit_s": "deit_small", "deit_b": "deit_base", "vit_s": "vit_small",
                  "vit_b": "vit_base", "swin_s": "swin_small", "swin_b": "swin_base"}
# Models outside the table get the median of the paper's per-model values. The values span five
# decades with no rule by size or family (ViT-S 1 vs DeiT-S 1e5), so no table entry transfers; on the
# CIFAR-10 reference ViT (8 keys x 8) 1e5 lets APA swamp the label term, 100 keeps both decreasing.
DEFAULT_ALPHA_APA = 100.0
TV_FORMS = ("psaq", "l1")


def lookup_alpha_apa(model_name: Optional[str]) -> Optional[float]:
    """alpha1 of the paper's table for a timm name ("deit_small_patch16_224") or short name ("DeiT-S");
    None when the model is not in the table."""
    if not model_name:
        return None
    name = model_name.lower().replace("-", "_").split(".")[0]
    name = _MODEL_ALIASES.get(name, name)
    for prefix, value in ALPHA_APA_BY_MODEL.items():
        if name.startswith(prefix):
            return value
    return None


@register_config
@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Data-free image synthesis (METHODS §2 and §4.1). Defaults reproduce the papers.

    Optimisation (shared by psaq / spdfq / dfqvit):
        iterations: Adam steps per image batch (SPDFQ §4.1: 1,000); lower it for tests and CPU runs.
        lr: Adam learning rate; None = 0.2 for ViT/DeiT, 0.25 for Swin (SPDFQ §4.1).
        betas, adam_eps: Adam (0.5, 0.9), 1e-8 (SPDFQ §4.1, [PSAQ] code).
        rounds: the iterations are split into this many rounds, each with its own cosine lr and warm-up
            ([PSAQ]: two rounds of 500).
        warmup_fraction: linear warm-up share of each round ([PSAQ]: 100 of 500 iterations).
        jitter: per-round random-roll limit in pixels at 224 px ([PSAQ]: 15, then 30), scaled by S/224;
            the last value is reused if there are more rounds than values.
        flip: random horizontal flip each step ([PSAQ]).
        batch_size: images optimised together; None = all of them in one batch (SPDFQ: 32 in one batch). The
            dfqvit method splits each group's candidates into such batches.
    Total variation (SPDFQ eq. 4):
        tv_weight: 0.05 (eq. 13, "following PSAQ").
        tv_form: "psaq" = |sum of four Frobenius norms of finite differences - v| (the default, the
            weight was tuned with it) or "l1" = mean absolute horizontal + vertical difference.
        tv_target: v ~ U(lo, hi) for 32 images at 224 px ([PSAQ]), rescaled by sqrt(B/32 * (S/224)^2).
    SPDFQ (eqs. 6-13); each term can be switched off for the Table 3 ablation:
        apa, msr, soft_labels: enable APA, MSR, SL; with soft_labels=False the one-hot loss (eq. 3)
            replaces SL (Table 3 baseline: all three off).
        alpha_apa: alpha1 of eq. 13 -- a number, a model name looked up in ALPHA_APA_BY_MODEL
            ("deit_small_patch16_224", "DeiT-S"), or "auto" = the model's timm architecture name, with
            DEFAULT_ALPHA_APA (100, the median of the paper's values) for models outside the table.
        k_apa: upper limit of Gaussians per attention prior (§3.3.1, Table 5: 5).
        k_msr: upper limit of MSR patches per image (§3.3.2, Fig. 5: 4).
        sl_eps: (eps1, eps2) of eq. 12 (5, 10; supp. Tables 1-2).
        sl_eps_class_aware: shift eps by -ln(999 / (C - 1)) so a C-class model gets the target mass a
            1000-class model gets (METHODS Pitfall 8; with 10 classes the paper's eps make SL one-hot).
        apa_start: first APA block S as a fraction of the depth L (eq. 7: S = L/2; Table 6: 0 = all).
        apa_depth_weight: weight block l by l/L (eq. 7, Table 7).
    PSAQ-ViT (SPDFQ eq. 5, METHODS §2.3):
        pse_bandwidth, pse_points: KDE bandwidth 0.01 and 10 evaluation points ([PSAQ] code).
        onehot_weight: weight of the one-hot loss in PSAQ's total (1.0).
    PSAQ-ViT V2 re-implementation (METHODS §2.4, [PROPOSED]; no labels, no one-hot term):
        v2_kl_weight: lambda of the image step's -KL(p_T || p_S) against the student (1.0).
        v2_student_lr: Adam learning rate of the student's weights, one step after each image step (1e-5).
    DFQ-ViT easy-to-hard synthesis (METHODS §4.1, [PROPOSED]):
        groups: images are synthesized in this many groups, easy to hard (3).
        adv_weights: lambda of -KL(p_FP || p_Q) per group (0, 0.5, 1.0).
        easy_sl_eps: SL range of the easy group (8, 12).
        mining_ratio: each group optimises ratio * n candidates and keeps the n hardest (1 = off).
    """

    iterations: int = 1000
    lr: Optional[float] = None
    betas: Tuple[float, float] = (0.5, 0.9)
    adam_eps: float = 1e-8
    rounds: int = 2
    warmup_fraction: float = 0.2
    jitter: Tuple[int, ...] = (15, 30)
    flip: bool = True
    batch_size: Optional[int] = None
    tv_weight: float = 0.05
    tv_form: str = "psaq"
    tv_target: Tuple[float, float] = (2500.0, 3000.0)
    apa: bool = True
    msr: bool = True
    soft_labels: bool = True
    alpha_apa: Union[float, str] = "auto"
    k_apa: int = 5
    k_msr: int = 4
    sl_eps: Tuple[float, float] = (5.0, 10.0)
    sl_eps_class_aware: bool = False
    apa_start: float = 0.5
    apa_depth_weight: bool = True
    pse_bandwidth: float = 0.01
    pse_points: int = 10
    onehot_weight: float = 1.0
    v2_kl_weight: float = 1.0
    v2_student_lr: float = 1e-5
    groups: int = 3
    adv_weights: Tuple[float, ...] = (0.0, 0.5, 1.0)
    easy_sl_eps: Tuple[float, float] = (8.0, 12.0)
    mining_ratio: int = 1

    version = 1

    def __post_init__(self):
        for name in ("betas", "jitter", "tv_target", "sl_eps", "adv_weights", "easy_sl_eps"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = _not_finite_numbers(self, text_fields=("tv_form", "alpha_apa"))
        if problems:  # the range checks below compare numbers
            raise CalibrationError("invalid SynthConfig: " + "; ".join(problems))

        def need(ok: bool, what: str) -> None:
            if not ok:
                problems.append(what)

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        need(is_int(self.iterations) and self.iterations >= 1, f"iterations={self.iterations!r} (an int >= 1)")
        need(self.lr is None or self.lr > 0, f"lr={self.lr!r} (None or > 0)")
        need(self.adam_eps > 0, f"adam_eps={self.adam_eps!r} (> 0; Adam divides by it)")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"betas={self.betas} (two values in [0, 1))")
        need(is_int(self.rounds) and self.rounds >= 1, f"rounds={self.rounds!r} (an int >= 1)")
        need(0 <= self.warmup_fraction < 1, f"warmup_fraction={self.warmup_fraction} (in [0, 1))")
        need(len(self.jitter) >= 1 and all(is_int(j) and j >= 0 for j in self.jitter),
             f"jitter={self.jitter} (one or more ints >= 0)")
        need(self.batch_size is None or (is_int(self.batch_size) and self.batch_size >= 1),
             f"batch_size={self.batch_size!r} (None or an int >= 1)")
        need(self.tv_weight >= 0, f"tv_weight={self.tv_weight} (>= 0)")
        need(self.tv_form in TV_FORMS, f"tv_form={self.tv_form!r} (one of {TV_FORMS})")
        need(len(self.tv_target) == 2 and 0 <= self.tv_target[0] <= self.tv_target[1],
             f"tv_target={self.tv_target} (lo <= hi, both >= 0)")
        if isinstance(self.alpha_apa, str):
            need(self.alpha_apa == "auto" or lookup_alpha_apa(self.alpha_apa) is not None,
                 f"alpha_apa={self.alpha_apa!r} (a number >= 0, 'auto', or one of {sorted(ALPHA_APA_BY_MODEL)} "
                 f"or their short names {sorted(_MODEL_ALIASES)})")
        else:
            need(not isinstance(self.alpha_apa, bool) and self.alpha_apa >= 0,
                 f"alpha_apa={self.alpha_apa!r} (a number >= 0, 'auto' or a model name)")
        need(is_int(self.k_apa) and self.k_apa >= 1, f"k_apa={self.k_apa!r} (an int >= 1)")
        need(is_int(self.k_msr) and 1 <= self.k_msr <= 9, f"k_msr={self.k_msr!r} (an int in 1..9)")
        for name in ("sl_eps", "easy_sl_eps"):
            eps = getattr(self, name)
            need(len(eps) == 2 and eps[0] <= eps[1], f"{name}={eps} (eps1 <= eps2)")
        need(0 <= self.apa_start <= 1, f"apa_start={self.apa_start} (a fraction of the depth in [0, 1])")
        need(self.pse_bandwidth > 0, f"pse_bandwidth={self.pse_bandwidth} (> 0)")
        need(is_int(self.pse_points) and self.pse_points >= 2, f"pse_points={self.pse_points!r} (an int >= 2)")
        need(self.onehot_weight >= 0, f"onehot_weight={self.onehot_weight} (>= 0)")
        need(self.v2_kl_weight >= 0, f"v2_kl_weight={self.v2_kl_weight} (>= 0)")
        need(self.v2_student_lr >= 0, f"v2_student_lr={self.v2_student_lr} (>= 0; 0 keeps the student fixed)")
        need(is_int(self.groups) and self.groups >= 1, f"groups={self.groups!r} (an int >= 1)")
        need(len(self.adv_weights) >= 1 and all(w >= 0 for w in self.adv_weights),
             f"adv_weights={self.adv_weights} (one or more values >= 0; the last is reused for extra groups)")
        need(is_int(self.mining_ratio) and self.mining_ratio >= 1, f"mining_ratio={self.mining_ratio!r} (an int >= 1)")
        if problems:
            raise CalibrationError("invalid SynthConfig: " + "; ".join(problems))

    def resolve_alpha_apa(self, model_name: Optional[str] = None) -> float:
        """alpha1 for a model: the explicit number, the named model's table value, or (for "auto") the
        table value of ``model_name`` with DEFAULT_ALPHA_APA for models outside the table."""
        if not isinstance(self.alpha_apa, str):
            return float(self.alpha_apa)
        name = model_name if self.alpha_apa == "auto" else self.alpha_apa
        value = lookup_alpha_apa(name)
        return DEFAULT_ALPHA_APA if value is None else value

    def to_dict(self) -> Dict[str, Any]:
        return config_to_dict(self)


@register_config
@dataclasses.dataclass(frozen=True)
class CalibConfig:
    """Range calibration (METHODS §1.2, §1.4).

    Args:
        blockwise: walk the model block by block with cached block inputs (memory bounded by one block);
            False = one forward with every quantizer in calibration mode (the one-pass fast path).
            Both give every quantizer the inputs of the quantized model upstream of it.
        reparam_post_ln: calibrate the inputs of qkv and fc1 (post-LayerNorm) channel-wise, then fold the
            per-channel grids into LayerNorm and the Linear so they become per-tensor ([RepQ] §1.4;
            the I&S pipeline SPDFQ uses does the same). Needs ``blockwise``.
    """

    blockwise: bool = True
    reparam_post_ln: bool = True

    version = 1

    def __post_init__(self):
        if self.reparam_post_ln and not self.blockwise:
            raise CalibrationError("CalibConfig(reparam_post_ln=True) needs blockwise=True; "
                                   "set reparam_post_ln=False for the one-pass path")

    def to_dict(self) -> Dict[str, Any]:
        return config_to_dict(self)


@register_config
@dataclasses.dataclass(frozen=True)
class ReconConfig:
    """Block-wise reconstruction, the two-stage scheme of I&S-ViT (SPDFQ §3.4.2 eq. 14, §4.1; METHODS §3).

    Args:
        iterations: Adam steps per block (and per single layer) and per stage (SPDFQ §4.1: 100).
        lr: Adam learning rate, decayed to 0 with a cosine schedule (SPDFQ §4.1: 4e-5).
        betas, weight_decay: Adam (0.9, 0.999), no weight decay ([I&S] code).
        batch_size: images per step; clipped to the number of calibration images (Pitfall 6;
            SPDFQ: all 32 images in one batch).
        two_stage: stage 1 (activations quantized, weights float, inputs from the FP model) before
            stage 2 (everything quantized, inputs from the quantized model) ([I&S]); False = stage 2 only.
        layers: also reconstruct the quantized layers outside blocks (patch embedding, Swin patch-merging
            reduction, head) as single layers ([I&S]).
        curriculum: draw step t = 1..T's batch from the first ceil(n·(0.5 + 0.5·t/T)) images only (METHODS §4.1:
            an easy -> hard set is used easy first). None (default): on for images of an easy -> hard method
            (``dfqvit``) in their made order, off otherwise; True: the images are ordered easy -> hard; False: off.
    """

    iterations: int = 100
    lr: float = 4e-5
    betas: Tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    batch_size: int = 32
    two_stage: bool = True
    layers: bool = True
    curriculum: Optional[bool] = None

    version = 1

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(self.betas))
        problems = _not_finite_numbers(self)
        if problems:
            raise CalibrationError("invalid ReconConfig: " + "; ".join(problems))
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 0:
            problems.append(f"iterations={self.iterations!r} (an int >= 0)")
        if not self.lr > 0:
            problems.append(f"lr={self.lr!r} (> 0)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas={self.betas} (two values in [0, 1))")
        if self.weight_decay < 0:
            problems.append(f"weight_decay={self.weight_decay} (>= 0)")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size!r} (an int >= 1)")
        if problems:
            raise CalibrationError("invalid ReconConfig: " + "; ".join(problems))

    def to_dict(self) -> Dict[str, Any]:
        return config_to_dict(self)


CORRECTION_FORMS = ("diag", "full")
CORRECTION_SOLVERS = ("closed_form", "adam")


@register_config
@dataclasses.dataclass(frozen=True)
class CorrectionConfig:
    """DFQ-ViT activation correction, closed form per block (METHODS §4.2, [PROPOSED]).

    Args:
        form: "diag" = per-channel scale and shift of the attention and MLP branch outputs, folded exactly
            into the output channels of attn.proj / mlp.fc2 (zero inference cost); "full" = a C x C matrix
            plus shift kept as an explicit floating-point op after each branch (+C^2 MACs per token).
        shrinkage: ridge strength lambda = shrinkage * mean_j var(a_j), pulling the correction toward
            identity (1e-3).
        scale_range: clamp of the diag scales s_j ((0.5, 2)); keeps them positive so they fold into the
            weight scales.
        solver: "closed_form" (default) or "adam": METHODS §4.2's option, ``adam_steps`` Adam steps (lr ``adam_lr``)
            on the diag (s, t) from (1, 0) on the same shrunk loss, each step on the images of the E2H curriculum's
            prefix for an easy -> hard (dfqvit) set, else on all of them; diag form only.
        adam_steps, adam_lr: 200 and 1e-3 (METHODS §4.2).
    """

    form: str = "diag"
    shrinkage: float = 1e-3
    scale_range: Tuple[float, float] = (0.5, 2.0)
    solver: str = "closed_form"
    adam_steps: int = 200
    adam_lr: float = 1e-3

    version = 1

    def __post_init__(self):
        object.__setattr__(self, "scale_range", tuple(self.scale_range))
        problems = _not_finite_numbers(self, text_fields=("form", "solver"))
        if problems:
            raise CalibrationError("invalid CorrectionConfig: " + "; ".join(problems))
        object.__setattr__(self, "scale_range", tuple(float(v) for v in self.scale_range))
        if self.form not in CORRECTION_FORMS:
            problems.append(f"form={self.form!r} (one of {CORRECTION_FORMS})")
        if self.solver not in CORRECTION_SOLVERS:
            problems.append(f"solver={self.solver!r} (one of {CORRECTION_SOLVERS})")
        elif self.solver == "adam" and self.form != "diag":
            problems.append(f"solver='adam' with form={self.form!r} (the Adam variant fits the diag (s, t); use "
                            "form='diag' or solver='closed_form')")
        if isinstance(self.adam_steps, bool) or not isinstance(self.adam_steps, int) or self.adam_steps < 1:
            problems.append(f"adam_steps={self.adam_steps!r} (an int >= 1)")
        if not self.adam_lr > 0:
            problems.append(f"adam_lr={self.adam_lr} (> 0)")
        if not self.shrinkage >= 0:
            problems.append(f"shrinkage={self.shrinkage} (>= 0)")
        lo, hi = self.scale_range if len(self.scale_range) == 2 else (0.0, -1.0)
        if not 0 < lo <= 1 <= hi:
            problems.append(f"scale_range={self.scale_range} (0 < lo <= 1 <= hi)")
        if problems:
            raise CalibrationError("invalid CorrectionConfig: " + "; ".join(problems))

    def to_dict(self) -> Dict[str, Any]:
        return config_to_dict(self)
