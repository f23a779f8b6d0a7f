"""Synthesis losses: total variation, soft cross entropy, PSAQ's patch-similarity entropy and
SPDFQ's attention-priors alignment. Pure functions of tensors; the methods combine them."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

# [PSAQ] TV target v ~ U(2500, 3000) was tuned for 32 images of 224 x 224 (METHODS §2.2).
TV_REFERENCE_IMAGES = 32
TV_REFERENCE_SIZE = 224
# [PSAQ] differential_entropy: the density is shifted by 1e-4 before -f·log f.
ENTROPY_FLOOR = 1e-4


# -- total variation (SPDFQ eq. 4) --------------------------------------------------------------------

def _differences(x: torch.Tensor):
    """Horizontal, vertical and both diagonal finite differences ([PSAQ] get_image_prior_losses)."""
    return (x[..., :, :-1] - x[..., :, 1:], x[..., :-1, :] - x[..., 1:, :],
            x[..., 1:, :-1] - x[..., :-1, 1:], x[..., :-1, :-1] - x[..., 1:, 1:])


def total_variation_l2(x: torch.Tensor) -> torch.Tensor:
    """[PSAQ] sum of the Frobenius norms (over the whole batch) of the four differences."""
    return sum(torch.linalg.vector_norm(d) for d in _differences(x))


def total_variation_l1(x: torch.Tensor) -> torch.Tensor:
    """Eq. 4 as written, anisotropic: mean |horizontal| + mean |vertical| difference."""
    dx, dy = _differences(x)[:2]
    return dx.abs().mean() + dy.abs().mean()


def tv_target_scale(num_images: int, height: int, width: int) -> float:
    """Rescale PSAQ's v to another batch and image size: the Frobenius norm grows with
    sqrt(number of pixels in the batch)."""
    return math.sqrt(num_images / TV_REFERENCE_IMAGES * height * width / TV_REFERENCE_SIZE ** 2)


def tv_loss(x: torch.Tensor, form: str = "psaq", target: float = 0.0) -> torch.Tensor:
    """"psaq": |TV_l2(x) - target| (pulls the batch's variation to a level, not to zero);
    "l1": the mean-absolute form, ``target`` unused."""
    if form == "psaq":
        return (total_variation_l2(x) - target).abs()
    return total_variation_l1(x)


# -- labels (SPDFQ eqs. 3 and 12) ---------------------------------------------------------------------

def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample -sum_c T[c] log softmax(logits)[c]; with one-hot T it is the usual CE. (B,)"""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1)


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(softmax(p) || softmax(q)). (B,)"""
    log_p, log_q = F.log_softmax(p_logits, dim=-1), F.log_softmax(q_logits, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


# -- PSAQ-ViT patch-similarity entropy (SPDFQ eq. 5, METHODS §2.3) -----------------------------------

def gaussian_kde(samples: torch.Tensor, points: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Per row of ``samples`` (R, M), the Gaussian KDE at ``points`` (P,) -> (R, P)."""
    z = (points.view(1, -1, 1) - samples.unsqueeze(1)) / bandwidth
    return torch.exp(-0.5 * z * z).mean(-1) / (bandwidth * math.sqrt(2 * math.pi))


def patch_similarity_entropy(context: torch.Tensor, num_images: int, num_prefix_tokens: int,
                             bandwidth: float = 0.01, points: int = 10) -> torch.Tensor:
    """Mean over images of the differential entropy of patch-to-patch cosine similarities.

    ``context`` is attn @ v before the head merge, (B_, H, N, d) with B_ = images x windows. Heads are
    averaged, prefix tokens dropped (PSAQ drops token 0; here the model's count, so Swin keeps all),
    each image's similarities (all its windows) pooled into one KDE evaluated on ``points`` points
    spanning the batch's [min, max] (constants, as in PSAQ), integrated with the trapezoid rule."""
    tokens = context.mean(dim=1)[:, num_prefix_tokens:, :]
    tokens = F.normalize(tokens, dim=-1, eps=1e-8)
    sims = (tokens @ tokens.transpose(1, 2)).reshape(num_images, -1)
    lo, hi = sims.detach().min(), sims.detach().max()
    grid = lo + (hi - lo) * torch.linspace(0, 1, points, device=sims.device, dtype=sims.dtype)
    density = gaussian_kde(sims, grid, bandwidth) + ENTROPY_FLOOR
    return torch.trapezoid(-density * density.log(), grid, dim=-1).mean()


# -- SPDFQ attention priors alignment (eqs. 6-7, METHODS §2.6) -----------------------------------------

def attention_rows(probs: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """The APA map of each (window, head): (B_, H, N, N) -> (B_, H, keys).

    With prefix tokens: the class token's row (query 0) over the non-prefix keys (distilled DeiT
    drops both prefix keys). Without (Swin, class_token=False): the mean over queries of the map."""
    if num_prefix_tokens > 0:
        return probs[:, :, 0, num_prefix_tokens:]
    return probs.mean(dim=2)


def apa_block_loss(rows: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """Eq. 6 for one block: MSE over the keys, mean over images/windows, summed over heads."""
    return (rows - priors).pow(2).mean(-1).mean(0).sum()


def apa_loss(block_rows: Sequence[torch.Tensor], block_priors: Sequence[torch.Tensor],
             weights: Sequence[float]) -> torch.Tensor:
    """Eq. 7: sum over the selected blocks of weight (l/L) x the block's eq. 6."""
    return sum(w * apa_block_loss(r, p) for r, p, w in zip(block_rows, block_priors, weights))
