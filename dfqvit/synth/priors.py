"""GMM attention priors of SPDFQ's APA (§3.3.1, eqs. 8-10, supplementary code; METHODS §2.6).

One prior is an (h x w) map: the elementwise maximum of k ~ U{1..K_APA} 2-D Gaussian densities
evaluated on a grid, normalized to sum to 1 - x, flattened. Everything is drawn from one
``torch.Generator`` in float64 on the CPU, so a seed fixes every prior bit for bit.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import torch

from dfqvit.errors import UnsupportedModelError

# SPDFQ supplementary ``Single_Gaussian``: mean ~ U(-5, 5)^2, covariance A·Aᵀ with A ~ U(0, 1)·10,
# eigenvalues clipped to [0, 5]; a singular covariance is drawn again.
MEAN_RANGE = 5.0
COV_FACTOR_SCALE = 10.0
MAX_EIGENVALUE = 5.0
# [PROPOSED] grid coordinates: linspace(-5, 5) on both axes (the paper does not state them).
GRID_EXTENT = 5.0
# scipy's multivariate_normal calls a covariance singular when an eigenvalue is below
# 1e6 * float64 eps * the largest eigenvalue; the same test decides a redraw here.
_SINGULAR_RTOL = 1e6 * torch.finfo(torch.float64).eps


@dataclasses.dataclass
class AttentionPriors:
    """values: (count, h*w) float32, each row sums to 1 - self_mass. num_gaussians: (count,) k per
    prior. self_mass: (count,) the share x left to the prefix token(s) (0 without a class token)."""

    values: torch.Tensor
    num_gaussians: torch.Tensor
    self_mass: torch.Tensor
    grid: Tuple[int, int]


def grid_shape(num_keys: int, aspect: float = 1.0) -> Tuple[int, int]:
    """(h, w) of the key-token grid: square when ``num_keys`` is a square, else the factorisation
    closest to the input's height/width ``aspect``."""
    side = math.isqrt(num_keys)
    if side * side == num_keys:
        return side, side
    h = max(1, round(math.sqrt(num_keys * aspect)))
    for candidate in sorted(range(1, num_keys + 1), key=lambda c: abs(c - h)):
        if num_keys % candidate == 0:
            return candidate, num_keys // candidate
    raise UnsupportedModelError(f"cannot lay {num_keys} attention keys out on a 2-D grid")


def _draw_covariances(count: int, generator: torch.Generator) -> torch.Tensor:
    """(count, 2, 2) covariances, redrawing the (rare) singular ones."""
    cov = torch.empty(count, 2, 2, dtype=torch.float64)
    todo = torch.arange(count)
    while todo.numel():
        a = torch.rand(todo.numel(), 2, 2, generator=generator, dtype=torch.float64) * COV_FACTOR_SCALE
        evals, evecs = torch.linalg.eigh(a @ a.transpose(-1, -2))
        evals = evals.clamp(0.0, MAX_EIGENVALUE)
        ok = evals[:, 0] > _SINGULAR_RTOL * evals[:, 1]
        cov[todo[ok]] = evecs[ok] @ torch.diag_embed(evals[ok]) @ evecs[ok].transpose(-1, -2)
        todo = todo[~ok]
    return cov


def _gaussian_densities(points: torch.Tensor, means: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Density of N(means, cov) at ``points``: (P, 2) x (n, 2) x (n, 2, 2) -> (n, P)."""
    diff = points.unsqueeze(0) - means.unsqueeze(1)                          # (n, P, 2)
    mahalanobis = (diff @ torch.linalg.inv(cov) * diff).sum(-1)             # (n, P)
    norm = 2 * math.pi * torch.sqrt(torch.linalg.det(cov))
    return torch.exp(-0.5 * mahalanobis) / norm.unsqueeze(1)


def grid_points(grid: Tuple[int, int]) -> torch.Tensor:
    """(h*w, 2) coordinates (row, col) of the prior grid, row-major, spanning [-5, 5] on both axes."""
    h, w = grid
    ys = torch.linspace(-GRID_EXTENT, GRID_EXTENT, h, dtype=torch.float64)
    xs = torch.linspace(-GRID_EXTENT, GRID_EXTENT, w, dtype=torch.float64)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)


def draw_gmms(count: int, k_max: int, generator: torch.Generator):
    """k ~ U{1..k_max} (count,), means (count, k_max, 2), covariances (count, k_max, 2, 2); only the
    first k components of each mixture are used."""
    k = torch.randint(1, k_max + 1, (count,), generator=generator)
    means = (torch.rand(count, k_max, 2, generator=generator, dtype=torch.float64) * 2 - 1) * MEAN_RANGE
    cov = _draw_covariances(count * k_max, generator).view(count, k_max, 2, 2)
    return k, means, cov


def component_densities(points: torch.Tensor, k: torch.Tensor, means: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """(count, k_max, P) density of every component at every point; unused components are 0."""
    count, k_max = means.shape[:2]
    dens = _gaussian_densities(points, means.reshape(-1, 2), cov.reshape(-1, 2, 2)).view(count, k_max, -1)
    used = torch.arange(k_max).view(1, k_max, 1) < k.view(count, 1, 1)
    return torch.where(used, dens, torch.zeros((), dtype=dens.dtype))


def gmm_maps(count: int, grid: Tuple[int, int], k_max: int,
             generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eq. 8: ``count`` un-normalized maps (count, h*w) float64, P[i, j] = max over the k Gaussians,
    and their k.

    A map whose Gaussians all underflow on the grid (a needle-thin one between grid points) cannot
    be normalized; it is drawn again, like the paper's redraw of singular covariances."""
    points = grid_points(grid)
    maps = torch.empty(count, points.shape[0], dtype=torch.float64)
    ks = torch.empty(count, dtype=torch.int64)
    todo = torch.arange(count)
    while todo.numel():
        k, means, cov = draw_gmms(todo.numel(), k_max, generator)
        dens = component_densities(points, k, means, cov).amax(dim=1)
        total = dens.sum(-1)
        ok = torch.isfinite(total) & (total > 0)
        maps[todo[ok]] = dens[ok]
        ks[todo[ok]] = k[ok]
        todo = todo[~ok]
    return maps, ks


def attention_priors(count: int, grid: Tuple[int, int], k_max: int, generator: torch.Generator,
                     self_mass: bool = True, device: Optional[torch.device] = None) -> AttentionPriors:
    """Eqs. 8-10: ``count`` priors on an (h, w) grid, each summing to 1 - x.

    self_mass=True: x ~ U(0, 1), the attention the class token keeps for the prefix tokens (ViT/DeiT);
    False: x = 0 (Swin, models without a class token, whose APA map is the mean over queries)."""
    maps, ks = gmm_maps(count, grid, k_max, generator)
    if self_mass:
        x = torch.rand(count, generator=generator, dtype=torch.float64)
    else:
        x = torch.zeros(count, dtype=torch.float64)
    values = maps / maps.sum(-1, keepdim=True) * (1 - x).unsqueeze(1)
    return AttentionPriors(values=values.float().to(device), num_gaussians=ks, self_mass=x.float(), grid=grid)
