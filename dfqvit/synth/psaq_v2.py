"""PSAQ-ViT V2 (Li et al., adaptive teacher-student), the re-implementation METHODS §2.4 proposes for the
baseline row of SPDFQ's Table 2 (no official code exists; SPDFQ re-implemented it too).

The images and a quantized student evolve in turns under the float model (the teacher):

    image step:    L = -sum_l H(patch similarities of block l) + 0.05 · L_TV - lambda · KL(p_T(x) || p_S(x))
    student step:  one Adam step (lr 1e-5) on the student's weights minimising KL(p_T(x) || p_S(x))

over the shared [PSAQ] schedule of loop.py (jitter, flips, two cosine rounds). The image step pushes the
samples to where student and teacher disagree while keeping PSAQ's patch-diversity prior; the student step
then closes that gap. The student is a copy of the fake-quant model, percentile-initialised (§1.2) on the
starting noise, trained through its straight-through estimators with every scale frozen; gradients reach the
images through it. No class labels are used (the set has no targets), and the student is discarded: the
images go to the common pipeline like any other source.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional

import torch

from dfqvit.config import SynthConfig

from .base import SyntheticSet, register_synth
from .common import (BatchResult, batch_sizes, check_num_images, draw_tv_target, gaussian_init, loss_summary,
                     resolve_config, set_record)
from .layout import ModelLayout, model_device, probe_layout
from .loop import Augmentation, LossTerm, default_lr, optimize_images
from .losses import kl_divergence, patch_similarity_entropy, tv_loss


def make_student(qmodel, images: torch.Tensor):
    """A copy of ``qmodel`` whose quantizers are initialised on ``images`` and whose weights train (returned with
    them: the weights and biases of its quantized layers and Swin's relative-position bias tables)."""
    from dfqvit.calib import calibrate  # calib imports synth: import at call time
    from dfqvit.calib.recon import learnable_parameters

    student = copy.deepcopy(qmodel)
    calibrate(student, images, progress=False)
    for p in student.parameters():
        p.requires_grad_(False)
    return student, learnable_parameters(student.model)


class StudentStep:
    """After each image step: one Adam step of the student towards the teacher on the current images."""

    def __init__(self, qmodel, student, params: List[torch.nn.Parameter], lr: float):
        self.teacher, self.student, self.params = qmodel, student, params
        self.optimizer = torch.optim.Adam(params, lr=lr) if lr > 0 and params else None

    def __call__(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        with torch.no_grad(), self.teacher.quant_state(False, False):
            teacher_logits = self.teacher.model(x)
        if self.optimizer is None:
            with torch.no_grad():
                return {"student_kl": kl_divergence(teacher_logits, self.student.model(x)).mean()}
        for p in self.params:
            p.requires_grad_(True)
        try:
            loss = kl_divergence(teacher_logits, self.student.model(x)).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        finally:
            for p in self.params:
                p.requires_grad_(False)
                p.grad = None
        return {"student_kl": loss.detach()}


class PSAQV2Objective:
    """The image step's loss: PSAQ's patch-similarity entropy and TV, minus lambda times the teacher-student KL."""

    def __init__(self, qmodel, student, layout: ModelLayout, tv_target: float, config: SynthConfig, taps: list):
        self.model, self.student, self.layout, self.config, self.taps = qmodel.model, student, layout, config, taps
        self.tv_target = tv_target

    def __call__(self, x: torch.Tensor, augment: Augmentation) -> Dict[str, LossTerm]:
        batch = augment(x)
        teacher_logits = self.model(batch)  # refreshes the taps
        entropy = sum(patch_similarity_entropy(t.context, x.shape[0], self.layout.num_prefix_tokens,
                                               self.config.pse_bandwidth, self.config.pse_points)
                      for t in self.taps)
        terms = {"pse": LossTerm(-1.0, entropy),
                 "kl": LossTerm(-self.config.v2_kl_weight,
                                kl_divergence(teacher_logits, self.student.model(batch)).mean())}
        if self.config.tv_weight > 0:
            terms["tv"] = LossTerm(self.config.tv_weight, tv_loss(batch, self.config.tv_form, self.tv_target))
        return terms


def synthesize_psaq_v2_batch(qmodel, layout: ModelLayout, num_images: int, config: SynthConfig,
                             generator: torch.Generator, progress: bool = True,
                             desc: str = "psaq_v2") -> BatchResult:
    spec = qmodel.input_spec
    init = gaussian_init(num_images, spec, generator, model_device(qmodel))
    tv_target = draw_tv_target(config, num_images, spec.height, spec.width, generator)
    student, params = make_student(qmodel, init)
    with student.quant_state(True, True), qmodel.quant_state(False, False), \
            qmodel.record_attention(probs=False, context=True) as taps:
        objective = PSAQV2Objective(qmodel, student, layout, tv_target, config, taps)
        images, history = optimize_images(init, objective, config=config, spec=spec,
                                          lr=default_lr(config, layout.family), generator=generator,
                                          progress=progress, desc=desc,
                                          after_step=StudentStep(qmodel, student, params, config.v2_student_lr))
    return BatchResult(images=images.cpu(), main=torch.empty(0, dtype=torch.long), history=history)


@register_synth("psaq_v2", reads_quantized_model=True)
def psaq_v2_images(qmodel, num_images: int = 32, seed: int = 0, config: Optional[SynthConfig] = None,
                   progress: bool = True) -> SyntheticSet:
    """PSAQ-ViT V2 images for ``qmodel`` (its quantization settings make the student); no targets."""
    config = resolve_config(config)
    check_num_images(num_images)
    generator = torch.Generator().manual_seed(seed)
    layout = probe_layout(qmodel)
    results = [synthesize_psaq_v2_batch(qmodel, layout, n, config, generator, progress,
                                        desc=f"psaq_v2 batch {i + 1}")
               for i, n in enumerate(batch_sizes(num_images, config.batch_size))]
    record = set_record(config, lr=default_lr(config, layout.family), num_classes=layout.num_classes,
                        losses=[loss_summary(r.history) for r in results])
    return SyntheticSet(images=torch.cat([r.images for r in results]), targets=None, method="psaq_v2", seed=seed,
                        config=record)
