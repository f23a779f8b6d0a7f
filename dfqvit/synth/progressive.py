"""DFQ-ViT easy-to-hard synthesis, the ``dfqvit`` method (METHODS §4.1, [PROPOSED]: the paper
publishes only its abstract).

The images are made in G groups, one after the other, each under the SPDFQ objective (eq. 13)
with harder targets than the last:
  easy   -- one class, no MSR, Z[c] ~ U(8, 12);
  medium -- SPDFQ as published: MSR, Z[c] ~ U(5, 10);
  hard   -- MSR with at least two classes per image (boundary samples).
From the second group on, a copy of the quantized model Q, calibrated on all earlier groups'
images, is pushed to disagree with the FP model: L_g = L_G - lambda_g · KL(p_FP || p_Q), gradients
reaching the images through Q's straight-through estimators (Q's weights are not trained).
Each group may optimise r·n candidates and keep the n hardest by
d(x) = CE(p_FP(x), T) + KL(p_FP(x) || p_Q(x)); within a group images are ordered by d, so the
whole set runs easy -> hard; the reconstruction draws its batches from a growing ``curriculum_prefix``.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from typing import Dict, List, Optional

import torch

from dfqvit.config import SynthConfig

from .base import SyntheticSet, register_synth
from .common import batch_sizes, check_num_images, loss_summary, resolve_config, set_record
from .labels import class_aware_eps
from .layout import ModelLayout, model_device, probe_layout
from .loop import LossTerm, default_lr
from .losses import kl_divergence, soft_cross_entropy
from .spdfq import Hardness, model_name, synthesize_batch

EASY, MEDIUM, HARD = 0, 1, 2
LEVEL_NAMES = ("easy", "medium", "hard")
# METHODS §4.1: the hard group's images carry "two classes per image ... (≈0.36 mass each)" (it drew 2..K_MSR).
HARD_CLASSES = 2


def group_sizes(num_images: int, groups: int) -> List[int]:
    """Near-equal split, larger groups first (32 images, 3 groups: 11, 11, 10)."""
    base, extra = divmod(num_images, groups)
    return [n for n in (base + (1 if g < extra else 0) for g in range(groups)) if n > 0]


def group_level(group: int, groups: int) -> int:
    """Difficulty level of group g of G: floor(3g / G) (3 groups: easy, medium, hard)."""
    return min(HARD, 3 * group // groups)


def level_hardness(level: int, config: SynthConfig, num_classes: int) -> Hardness:
    def eps(pair):
        return tuple(class_aware_eps(pair, num_classes)) if config.sl_eps_class_aware else tuple(pair)

    if level == EASY:
        return Hardness(sl_eps=eps(config.easy_sl_eps), msr=False)
    if level == MEDIUM:
        return Hardness(sl_eps=eps(config.sl_eps), msr=config.msr)
    return Hardness(sl_eps=eps(config.sl_eps), msr=config.msr, classes=HARD_CLASSES)


def curriculum_prefix(num_images: int, step: int, total_steps: int) -> int:
    """How many images (from the front of an easy -> hard set) step t of T (t = 1..T: the last step draws from all)
    may draw from: ceil(n · (0.5 + 0.5 · t / T))."""
    fraction = 0.5 + 0.5 * min(max(step, 0), total_steps) / max(total_steps, 1)
    return max(1, min(num_images, math.ceil(num_images * fraction)))


def curriculum_pool(num_images: int, step: int, total_steps: int) -> int:
    """``curriculum_prefix`` for the 0-based ``step`` of a loop over ``total_steps``: iteration t = step + 1, so the
    first step draws from just over half the set and the last from all of it."""
    return curriculum_prefix(num_images, step + 1, total_steps)


def calibrated_adversary(qmodel, images: torch.Tensor):
    """A copy of ``qmodel`` whose quantizers are initialised (METHODS §1.2) on ``images``."""
    from dfqvit.calib import calibrate  # calib imports synth: import at call time

    adversary = copy.deepcopy(qmodel)
    calibrate(adversary, images.to(model_device(qmodel)), progress=False)
    return adversary


def adversarial_term(adversary, weight: float):
    """-lambda · KL(p_FP || p_Q) on the (augmented) full images."""
    def extra(images: torch.Tensor, fp_logits: torch.Tensor) -> Dict[str, LossTerm]:
        return {"kl": LossTerm(-weight, kl_divergence(fp_logits, adversary.model(images)).mean())}
    return extra


@torch.no_grad()
def difficulty(qmodel, adversary, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d(x) = CE(p_FP(x), T) + KL(p_FP(x) || p_Q(x)) per image (the KL only once Q exists)."""
    device = model_device(qmodel)
    images, targets = images.to(device), targets.to(device)
    with qmodel.quant_state(False, False):
        fp_logits = qmodel.model(images)
    score = soft_cross_entropy(fp_logits, targets)
    if adversary is not None:
        score = score + kl_divergence(fp_logits, adversary.model(images))
    return score.cpu()


@dataclasses.dataclass
class GroupResult:
    images: torch.Tensor
    main: torch.Tensor
    difficulty: torch.Tensor
    histories: List[Dict[str, List[float]]]  # one per batch of candidates
    level: int
    adv_weight: float
    sl_eps: tuple


def synthesize_group(qmodel, layout: ModelLayout, num_images: int, level: int, adv_weight: float,
                     adversary, config: SynthConfig, generator: torch.Generator, progress: bool,
                     desc: str) -> GroupResult:
    hardness = level_hardness(level, config, layout.num_classes)
    candidates = num_images * config.mining_ratio
    use_adversary = adversary is not None and adv_weight > 0
    extra = adversarial_term(adversary, adv_weight) if use_adversary else None
    with adversary.quant_state(True, True) if adversary is not None else contextlib.nullcontext():
        # in batches of config.batch_size, as spdfq and psaq (it was ignored: one batch of every candidate)
        sizes = batch_sizes(candidates, config.batch_size)
        results = [synthesize_batch(qmodel, layout, n, config, hardness, generator, progress, extra=extra,
                                    desc=desc if len(sizes) == 1 else f"{desc} batch {i + 1}")
                   for i, n in enumerate(sizes)]
        images, targets = torch.cat([r.images for r in results]), torch.cat([r.targets for r in results])
        score = difficulty(qmodel, adversary, images, targets)
    main = torch.cat([r.main for r in results])
    keep = torch.topk(score, num_images).indices                       # hard-example mining
    keep = keep[torch.argsort(score[keep], stable=True)]                # easy -> hard inside the group
    return GroupResult(images=images[keep], main=main[keep], difficulty=score[keep],
                       histories=[r.history for r in results], level=level, adv_weight=adv_weight,
                       sl_eps=hardness.sl_eps)


@register_synth("dfqvit", reads_quantized_model=True, easy_to_hard=True)
def progressive_images(qmodel, num_images: int = 32, seed: int = 0, config: Optional[SynthConfig] = None,
                       progress: bool = True) -> SyntheticSet:
    """Easy -> hard images for ``qmodel``; targets = main class; the record lists group sizes,
    levels, lambdas and each image's difficulty."""
    config = resolve_config(config)
    check_num_images(num_images)
    generator = torch.Generator().manual_seed(seed)
    layout = probe_layout(qmodel)
    sizes = group_sizes(num_images, config.groups)
    groups: List[GroupResult] = []
    for g, size in enumerate(sizes):
        adversary = calibrated_adversary(qmodel, torch.cat([r.images for r in groups])) if groups else None
        adv_weight = config.adv_weights[min(g, len(config.adv_weights) - 1)]
        level = group_level(g, len(sizes))
        groups.append(synthesize_group(qmodel, layout, size, level, adv_weight, adversary, config, generator,
                                       progress, desc=f"dfqvit group {g + 1}/{len(sizes)} ({LEVEL_NAMES[level]})"))
        del adversary
    record = set_record(
        config, lr=default_lr(config, layout.family), alpha_apa=config.resolve_alpha_apa(model_name(qmodel)),
        num_classes=layout.num_classes, group_sizes=sizes, levels=[LEVEL_NAMES[r.level] for r in groups],
        adv_weights=[r.adv_weight for r in groups], sl_eps=[list(r.sl_eps) for r in groups],
        difficulty=torch.cat([r.difficulty for r in groups]).tolist(),
        losses=[loss_summary(h) for r in groups for h in r.histories])  # one per batch, group after group
    return SyntheticSet(images=torch.cat([r.images for r in groups]), targets=torch.cat([r.main for r in groups]),
                        method="dfqvit", seed=seed, config=record)
