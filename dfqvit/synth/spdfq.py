"""SPDFQ synthesis (Zhong et al., eq. 13; METHODS §2.6-2.9):

    L_G = alpha1 · L_APA + L_SL + 0.05 · L_TV

APA aligns the FP model's attention (class-token row, or mean over queries for Swin) in the deeper
blocks with random GMM priors; MSR adds crops of each image with their own classes; SL uses soft
targets. With ``apa``/``msr``/``soft_labels`` switched off in the config the same code runs the
Table 3 ablation (all off = the one-hot baseline of eq. 3).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Dict, List, Optional, Tuple

import torch

from dfqvit.config import SynthConfig

from .base import SyntheticSet, register_synth
from .common import (BatchResult, batch_sizes, check_num_images, draw_tv_target, gaussian_init, loss_summary,
                     resolve_config, set_record)
from .labels import LabelPlan, class_aware_eps, draw_classes, draw_labels
from .layout import ModelLayout, model_device, probe_layout
from .losses import apa_loss, attention_rows, soft_cross_entropy, tv_loss
from .loop import Augmentation, LossTerm, default_lr, optimize_images
from .msr import CropPlan, crop_and_resize, draw_crop_plan
from .priors import attention_priors, grid_shape

# Extra terms a caller adds (the dfqvit method's adversarial KL): f(augmented full images, their FP
# logits) -> named terms.
ExtraTerms = Callable[[torch.Tensor, torch.Tensor], Dict[str, LossTerm]]


@dataclasses.dataclass(frozen=True)
class Hardness:
    """How demanding one batch's targets are. SPDFQ: eps (5, 10), MSR with 1..K_MSR classes; ``classes`` fixes
    the count instead (the dfqvit method's hard group: two)."""

    sl_eps: Tuple[float, float]
    msr: bool
    classes: Optional[int] = None


def spdfq_hardness(config: SynthConfig, num_classes: int) -> Hardness:
    eps = class_aware_eps(config.sl_eps, num_classes) if config.sl_eps_class_aware else config.sl_eps
    return Hardness(sl_eps=tuple(eps), msr=config.msr)


@dataclasses.dataclass
class SemanticPlan:
    """Everything drawn once at the start of a batch and fixed for its run (METHODS §2.6-2.8)."""

    crops: CropPlan
    labels: LabelPlan
    apa_blocks: List[int]          # 0-based attention-module indices with APA
    apa_weights: List[float]       # l / L per selected block (1 without depth weighting)
    apa_priors: List[torch.Tensor]  # per selected block (images x windows, heads, keys)
    tv_target: float


def apa_blocks(depth: int, config: SynthConfig) -> Tuple[List[int], List[float]]:
    """Eq. 7: blocks l = S..L (1-based) with S = ceil(apa_start · L), at least 1; weight l/L."""
    start = max(1, math.ceil(config.apa_start * depth))
    blocks = list(range(start - 1, depth))
    weights = [(b + 1) / depth if config.apa_depth_weight else 1.0 for b in blocks]
    return blocks, weights


def draw_plan(layout: ModelLayout, num_images: int, config: SynthConfig, hardness: Hardness,
              generator: torch.Generator, device) -> SemanticPlan:
    _, height, width = layout.image_shape
    num_classes = layout.num_classes
    k_max = min(config.k_msr, num_classes)
    if hardness.classes is not None:
        counts = [min(hardness.classes, k_max)] * num_images
    elif hardness.msr:
        counts = torch.randint(1, k_max + 1, (num_images,), generator=generator).tolist()
    else:
        counts = [1] * num_images
    classes = draw_classes(counts, num_classes, generator)
    crops = draw_crop_plan(counts if hardness.msr else [0] * num_images, height, width, config.k_msr, generator)
    labels = draw_labels(classes, crops.image_index.tolist(), crops.slot.tolist(), num_classes,
                         hardness.sl_eps, config.soft_labels, generator)
    blocks, weights, priors = [], [], []
    if config.apa:
        blocks, weights = apa_blocks(layout.depth, config)
        for b in blocks:
            shape = layout.attention[b]
            keys = shape.tokens - layout.num_prefix_tokens
            p = attention_priors(num_images * shape.windows * shape.heads, grid_shape(keys, layout.aspect),
                                 config.k_apa, generator, self_mass=layout.uses_class_token, device=device)
            priors.append(p.values.view(num_images * shape.windows, shape.heads, keys))
    tv_target = draw_tv_target(config, num_images, height, width, generator)
    return SemanticPlan(crops=crops, labels=labels, apa_blocks=blocks, apa_weights=weights, apa_priors=priors,
                        tv_target=tv_target)


class SPDFQObjective:
    """Eq. 13 on one batch. Full images and their MSR crops go through the FP model in one forward;
    APA and TV use the full images, SL (or one-hot) both."""

    def __init__(self, qmodel, layout: ModelLayout, plan: SemanticPlan, config: SynthConfig, alpha: float,
                 taps: Optional[list] = None, extra: Optional[ExtraTerms] = None):
        self.model = qmodel.model
        self.layout, self.plan, self.config, self.alpha = layout, plan, config, alpha
        self.taps, self.extra = taps, extra
        device = model_device(qmodel)
        self.image_targets = plan.labels.image_targets.to(device)
        self.crop_targets = plan.labels.crop_targets.to(device)

    def __call__(self, x: torch.Tensor, augment: Augmentation) -> Dict[str, LossTerm]:
        n = x.shape[0]
        batch = augment(torch.cat([x, crop_and_resize(x, self.plan.crops)]))
        logits = self.model(batch)
        label_loss = soft_cross_entropy(logits[:n], self.image_targets).mean()
        if len(self.plan.crops):
            label_loss = label_loss + soft_cross_entropy(logits[n:], self.crop_targets).mean()
        terms = {("sl" if self.config.soft_labels else "oh"): LossTerm(1.0, label_loss)}
        if self.plan.apa_blocks:
            rows = [attention_rows(self.taps[b].probs[:n * self.layout.attention[b].windows],
                                   self.layout.num_prefix_tokens) for b in self.plan.apa_blocks]
            terms["apa"] = LossTerm(self.alpha, apa_loss(rows, self.plan.apa_priors, self.plan.apa_weights))
        if self.config.tv_weight > 0:
            terms["tv"] = LossTerm(self.config.tv_weight, tv_loss(batch[:n], self.config.tv_form, self.plan.tv_target))
        if self.extra is not None:
            terms.update(self.extra(batch[:n], logits[:n]))
        return terms


def model_name(qmodel) -> Optional[str]:
    """The timm architecture name when the model was made by timm.create_model."""
    cfg = getattr(qmodel.model, "pretrained_cfg", None) or {}
    return cfg.get("architecture")


def synthesize_batch(qmodel, layout: ModelLayout, num_images: int, config: SynthConfig, hardness: Hardness,
                     generator: torch.Generator, progress: bool = True, extra: Optional[ExtraTerms] = None,
                     desc: str = "spdfq") -> BatchResult:
    """Optimise one batch of ``num_images`` under eq. 13 (plus ``extra`` terms)."""
    device = model_device(qmodel)
    init = gaussian_init(num_images, qmodel.input_spec, generator, device)
    plan = draw_plan(layout, num_images, config, hardness, generator, device)
    alpha = config.resolve_alpha_apa(model_name(qmodel))
    # Taps force the explicit attention path; without APA the fused one is kept.
    recording = qmodel.record_attention(probs=True) if config.apa else contextlib.nullcontext()
    with qmodel.quant_state(False, False), recording as taps:
        objective = SPDFQObjective(qmodel, layout, plan, config, alpha, taps=taps, extra=extra)
        images, history = optimize_images(init, objective, config=config, spec=qmodel.input_spec,
                                          lr=default_lr(config, layout.family), generator=generator,
                                          progress=progress, desc=desc)
    return BatchResult(images=images.cpu(), main=plan.labels.main, history=history,
                       targets=plan.labels.image_targets)


@register_synth("spdfq")
def spdfq_images(qmodel, num_images: int = 32, seed: int = 0, config: Optional[SynthConfig] = None,
                 progress: bool = True) -> SyntheticSet:
    """SPDFQ images for ``qmodel`` (run through its float path); targets = each image's main class."""
    config = resolve_config(config)
    check_num_images(num_images)
    generator = torch.Generator().manual_seed(seed)
    layout = probe_layout(qmodel)
    hardness = spdfq_hardness(config, layout.num_classes)
    results = [synthesize_batch(qmodel, layout, n, config, hardness, generator, progress,
                                desc=f"spdfq batch {i + 1}")
               for i, n in enumerate(batch_sizes(num_images, config.batch_size))]
    record = set_record(config, lr=default_lr(config, layout.family),
                        alpha_apa=config.resolve_alpha_apa(model_name(qmodel)), num_classes=layout.num_classes,
                        sl_eps=list(hardness.sl_eps), losses=[loss_summary(r.history) for r in results])
    return SyntheticSet(images=torch.cat([r.images for r in results]), targets=torch.cat([r.main for r in results]),
                        method="spdfq", seed=seed, config=record)
