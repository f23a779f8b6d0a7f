"""PSAQ-ViT synthesis (Li et al.; SPDFQ eq. 5; METHODS §2.3), the code's behaviour:

    L = -sum_l H(patch similarities of block l) + 1.0 · CE(F(x), c) + 0.05 · L_TV

with one random class c per image, fixed for the run, and the shared [PSAQ] schedule of loop.py.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from dfqvit.config import SynthConfig

from .base import SyntheticSet, register_synth
from .common import (BatchResult, batch_sizes, check_num_images, draw_tv_target, gaussian_init, loss_summary,
                     resolve_config, set_record)
from .layout import ModelLayout, model_device, probe_layout
from .losses import patch_similarity_entropy, tv_loss
from .loop import Augmentation, LossTerm, default_lr, optimize_images


class PSAQObjective:
    def __init__(self, qmodel, layout: ModelLayout, labels: torch.Tensor, tv_target: float, config: SynthConfig,
                 taps: list):
        self.model, self.layout, self.config, self.taps = qmodel.model, layout, config, taps
        self.labels = labels.to(model_device(qmodel))
        self.tv_target = tv_target

    def __call__(self, x: torch.Tensor, augment: Augmentation) -> Dict[str, LossTerm]:
        batch = augment(x)
        logits = self.model(batch)
        n = x.shape[0]
        entropy = sum(patch_similarity_entropy(t.context, n, self.layout.num_prefix_tokens,
                                               self.config.pse_bandwidth, self.config.pse_points)
                      for t in self.taps)
        terms = {"pse": LossTerm(-1.0, entropy),
                 "oh": LossTerm(self.config.onehot_weight, F.cross_entropy(logits, self.labels))}
        if self.config.tv_weight > 0:
            terms["tv"] = LossTerm(self.config.tv_weight, tv_loss(batch, self.config.tv_form, self.tv_target))
        return terms


def synthesize_psaq_batch(qmodel, layout: ModelLayout, num_images: int, config: SynthConfig,
                          generator: torch.Generator, progress: bool = True, desc: str = "psaq") -> BatchResult:
    spec = qmodel.input_spec
    init = gaussian_init(num_images, spec, generator, model_device(qmodel))
    labels = torch.randint(0, layout.num_classes, (num_images,), generator=generator)
    tv_target = draw_tv_target(config, num_images, spec.height, spec.width, generator)
    with qmodel.quant_state(False, False), qmodel.record_attention(probs=False, context=True) as taps:
        objective = PSAQObjective(qmodel, layout, labels, tv_target, config, taps)
        images, history = optimize_images(init, objective, config=config, spec=spec,
                                          lr=default_lr(config, layout.family), generator=generator,
                                          progress=progress, desc=desc)
    return BatchResult(images=images.cpu(), main=labels, history=history)


@register_synth("psaq")
def psaq_images(qmodel, num_images: int = 32, seed: int = 0, config: Optional[SynthConfig] = None,
                progress: bool = True) -> SyntheticSet:
    """PSAQ-ViT images for ``qmodel`` (float path); targets = the one-hot class of each image."""
    config = resolve_config(config)
    check_num_images(num_images)
    generator = torch.Generator().manual_seed(seed)
    layout = probe_layout(qmodel)
    results = [synthesize_psaq_batch(qmodel, layout, n, config, generator, progress, desc=f"psaq batch {i + 1}")
               for i, n in enumerate(batch_sizes(num_images, config.batch_size))]
    record = set_record(config, lr=default_lr(config, layout.family), num_classes=layout.num_classes,
                        losses=[loss_summary(r.history) for r in results])
    return SyntheticSet(images=torch.cat([r.images for r in results]), targets=torch.cat([r.main for r in results]),
                        method="psaq", seed=seed, config=record)
