"""The optimisation loop shared by the image-synthesis methods (METHODS §2, common setup).

Images are the parameters, in the model's normalized space. Adam with SPDFQ's betas; the [PSAQ]
schedule: the iterations split into rounds, each with a linear warm-up and a cosine decay, a random
roll (jitter) whose limit grows per round and a random horizontal flip each step; after each step
every channel is clamped to the normalized image of [0, 1]. All randomness comes from one CPU
``torch.Generator``, so a seed fixes the run.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from tqdm.auto import tqdm

# SPDFQ §4.1: lr 0.2 for ViT/DeiT, 0.25 for Swin.
DEFAULT_LR = 0.2
SWIN_LR = 0.25
# [PSAQ] jitter limits are in pixels for 224 x 224 inputs.
JITTER_REFERENCE_SIZE = 224
POSTFIX_EVERY = 10  # progress-bar refresh (each refresh syncs with the GPU)


class LossTerm(NamedTuple):
    """One named term of a synthesis objective: the total is the sum of weight x value."""

    weight: float
    value: torch.Tensor


Objective = Callable[[torch.Tensor, "Augmentation"], Dict[str, LossTerm]]
# Called with the images after each step (and clamp); returns more values to record (PSAQ-ViT V2's student step).
AfterStep = Callable[[torch.Tensor], Dict[str, torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """This step's [PSAQ] roll by ``shift`` pixels on both axes, then an optional horizontal flip."""

    shift: int = 0
    flip: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(-2, -1))
        if self.flip:
            x = torch.flip(x, dims=(-1,))
        return x


def default_lr(config, family: str) -> float:
    if config.lr is not None:
        return config.lr
    return SWIN_LR if family == "swin" else DEFAULT_LR


def round_lengths(iterations: int, rounds: int) -> List[int]:
    """Split the iterations into ``rounds`` near-equal rounds (empty rounds dropped)."""
    base, extra = divmod(iterations, rounds)
    return [n for n in (base + (1 if r < extra else 0) for r in range(rounds)) if n > 0]


def jitter_limit(config, round_index: int, image_size: int) -> int:
    """[PSAQ] roll limit of a round, scaled from 224 px to this image size."""
    limit = config.jitter[min(round_index, len(config.jitter) - 1)]
    return int(round(limit * image_size / JITTER_REFERENCE_SIZE))


def cosine_lr(base_lr: float, step: int, length: int, warmup: int) -> float:
    """[PSAQ] lr_cosine_policy: linear warm-up over ``warmup`` steps, then cosine decay to 0."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = length - warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / span)) * base_lr if span > 0 else base_lr


def draw_augmentation(generator: torch.Generator, limit: int, flip: bool) -> Augmentation:
    shift = int(torch.randint(-limit, limit + 1, (1,), generator=generator)) if limit > 0 else 0
    flipped = bool(torch.rand(1, generator=generator) < 0.5) if flip else False
    return Augmentation(shift=shift, flip=flipped)


def valid_range(spec, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel bounds of normalized images whose pixels lie in [0, 1]: (1, C, 1, 1) each."""
    mean = torch.tensor(spec.mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


@torch.inference_mode(False)  # gradients w.r.t. the images, whatever the caller's grad mode
@torch.enable_grad()
def optimize_images(images: torch.Tensor, objective: Objective, *, config, spec, lr: float,
                    generator: torch.Generator, progress: bool = True, desc: str = "synthesize",
                    after_step: Optional[AfterStep] = None) -> Tuple[torch.Tensor, Dict[str, List[float]]]:
    """Run ``config.iterations`` Adam steps on ``images`` under ``objective``; ``after_step`` (if given) runs
    after each one on the (detached) images.

    Returns the optimised images (detached) and the history of every raw term value (before its
    weight), of the weighted total and of what ``after_step`` returned, one float per step."""
    x = images.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr, betas=tuple(config.betas), eps=config.adam_eps)
    low, high = valid_range(spec, x)
    size = min(x.shape[-2:])
    records: Dict[str, List[torch.Tensor]] = {}
    bar = tqdm(total=config.iterations, desc=desc, disable=not progress, leave=False)
    try:
        for round_index, length in enumerate(round_lengths(config.iterations, config.rounds)):
            limit = jitter_limit(config, round_index, size)
            warmup = int(round(config.warmup_fraction * length))
            for step in range(length):
                for group in optimizer.param_groups:
                    group["lr"] = cosine_lr(lr, step, length, warmup)
                terms = objective(x, draw_augmentation(generator, limit, config.flip))
                total = sum(term.weight * term.value for term in terms.values())
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                with torch.no_grad():
                    x.clamp_(min=low, max=high)
                for name, term in terms.items():
                    records.setdefault(name, []).append(term.value.detach())
                records.setdefault("total", []).append(total.detach())
                for name, value in (after_step(x.detach()) if after_step else {}).items():
                    records.setdefault(name, []).append(value.detach())
                bar.update(1)
                if progress and (bar.n % POSTFIX_EVERY == 0 or bar.n == config.iterations):
                    bar.set_postfix({name: f"{float(values[-1]):.4g}" for name, values in records.items()})
    finally:
        bar.close()
    history = {name: torch.stack(values).float().cpu().tolist() for name, values in records.items()}
    return x.detach(), history
