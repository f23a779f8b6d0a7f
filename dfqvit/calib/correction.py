"""DFQ-ViT activation correction (METHODS §4.2, [PROPOSED]: DFQ-ViT publishes no equations).

Block by block, so that block l sees the corrected quantized model up to block l − 1, an affine map of
each residual branch is fitted on all image × token rows:

- attention branch a = H_q − X_q (what the quantized block adds to its input X_q); target
  r = H_fp − X_q, with H_fp the FP residual stream after the attention add;
- MLP branch, recomputed with the corrected attention branch: m = Y_q − H_q, target r = Y_fp − H_q.

Forms:
- ``diag`` (default): per channel j, s_j = (cov(a_j, r_j) + λ) / (var(a_j) + λ) clamped to a positive
  range, t_j = mean(r_j) − s_j·mean(a_j), λ = shrinkage · mean_j var(a_j). Folded exactly into the output
  channels of attn.proj / mlp.fc2: W_j ← s_j·W_j, Δ_j ← s_j·Δ_j (same integer codes), bias_j ← s_j·bias_j +
  t_j. Zero inference cost.
- ``full``: [M; t] = (ÃᵀÃ/T + λ·diag(1..1, 0))⁻¹ (Ãᵀr/T + λ·[I; 0]) with Ã = [a, 1]; kept as an explicit
  floating-point op (``BranchCorrection``) after the branch's last Linear: +C² MACs per token per branch.
  Folding M into the weights would change the integer codes and need another rounding, so it is not done.

``CorrectionConfig(solver="adam")`` fits the diag (s, t) by Adam steps instead (§4.2's option), on the images of
the E2H curriculum's growing prefix when they run easy -> hard.

Branches with a LayerScale (timm ``ls1`` / ``ls2``) are fitted before the scale (a/γ, r/γ), where the fold
and the explicit op sit.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import List, Optional, Tuple

import torch
from timm.layers import LayerScale, Mlp
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block
from torch import nn
from tqdm.auto import tqdm

from dfqvit.caller_state import calibration_state
from dfqvit.config import CorrectionConfig
from dfqvit.errors import warn_user
from dfqvit.models import QuantizedModel
from dfqvit.nn import QuantAttentionBase, QuantLinear
from dfqvit.synth.progressive import curriculum_pool

from .data import set_images
from .walk import UnitInput, capture_input, model_units, unit_input

_CORRECTABLE_BLOCKS = (Block, SwinTransformerBlock)


class BranchCorrection(nn.Module):
    """The ``full`` form as an explicit op: y = x @ matrix + shift over the last (channel) dim."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("matrix", torch.eye(channels))
        self.register_buffer("shift", torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix + self.shift

    def extra_repr(self) -> str:
        return f"channels={self.shift.numel()}"


@dataclasses.dataclass
class Branch:
    """One residual branch: its last Linear, the module whose output is added to the stream (where a
    ``full`` correction is inserted), and its LayerScale vector (None = no scale)."""

    linear: QuantLinear
    parent: nn.Module
    attr: str
    gamma: Optional[torch.Tensor]


def _gamma(block: nn.Module, name: str) -> Optional[torch.Tensor]:
    ls = getattr(block, name, None)
    return ls.gamma.detach() if isinstance(ls, LayerScale) else None


def block_branches(block: nn.Module) -> Optional[Tuple[Branch, Branch]]:
    """(attention branch, MLP branch) of a supported pre-norm block, or None."""
    if type(block) not in _CORRECTABLE_BLOCKS:
        return None
    attn, mlp = block.attn, block.mlp
    if not (isinstance(attn, QuantAttentionBase) and type(mlp) is Mlp and isinstance(mlp.fc2, QuantLinear)):
        return None
    return (Branch(attn.proj, attn, "proj_drop", _gamma(block, "ls1")),
            Branch(mlp.fc2, mlp, "drop2", _gamma(block, "ls2")))


@torch.no_grad()
def residual_streams(block: nn.Module, inputs: UnitInput) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block input X, stream H after the attention add (the input of norm2) and output Y, as (rows, C)."""
    seen: List[torch.Tensor] = []
    handle = block.norm2.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        out = inputs.run(block)
    finally:
        handle.remove()
    channels = out.shape[-1]
    rows = (lambda t: t.reshape(-1, channels).double())
    return rows(inputs.args[0]), rows(seen[0]), rows(out)


def _channel_variance(a: torch.Tensor) -> torch.Tensor:
    return (a - a.mean(0)).pow(2).mean(0)


def _ridge_strength(var: torch.Tensor, config: CorrectionConfig) -> torch.Tensor:
    """λ = shrinkage · mean_j var(a_j), the pull toward the identity of every form."""
    return config.shrinkage * var.mean()


def fit_diag(a: torch.Tensor, r: torch.Tensor, config: CorrectionConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (s, t) with a·s + t ≈ r, ridge-shrunk toward s = 1."""
    mean_a, mean_r = a.mean(0), r.mean(0)
    var = _channel_variance(a)
    cov = ((a - mean_a) * (r - mean_r)).mean(0)
    lam = _ridge_strength(var, config)
    s = ((cov + lam) / (var + lam)).clamp(*config.scale_range)
    # A channel without variance (constant over the calibration rows) says nothing about a scale: s = 1, and the
    # shift still matches the means (with shrinkage 0 it was 0 / 0: NaN weights).
    s = torch.where(var + lam > 0, s, torch.ones_like(s))
    return s, mean_r - s * mean_a


@torch.inference_mode(False)  # Adam takes gradients, also under a caller's inference_mode (correct_activations keeps it)
@torch.enable_grad()
def fit_diag_adam(a: torch.Tensor, r: torch.Tensor, config: CorrectionConfig, images: int,
                  curriculum: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """METHODS §4.2's option: per-channel (s, t) by ``config.adam_steps`` Adam steps from (1, 0) on the diag form's
    loss, mean over rows of (a·s + t − r)² + λ·(s − 1)². ``a`` / ``r`` hold ``images`` images' rows one image after
    the other; with ``curriculum`` each step uses the first ``curriculum_pool`` images only (an easy -> hard set,
    METHODS §4.1), else all rows. s is clamped to ``config.scale_range`` at the end."""
    a, r = (x.clone() if x.is_inference() else x for x in (a, r))  # rows made under inference_mode
    per_image = a.shape[0] // images
    lam = _ridge_strength(_channel_variance(a), config)
    s = torch.ones(a.shape[1], dtype=a.dtype, device=a.device, requires_grad=True)
    t = torch.zeros_like(s, requires_grad=True)
    optimizer = torch.optim.Adam([s, t], lr=config.adam_lr)
    for step in range(config.adam_steps):
        rows = per_image * (curriculum_pool(images, step, config.adam_steps) if curriculum else images)
        loss = ((a[:rows] * s + t - r[:rows]).pow(2).mean(0) + lam * (s - 1).pow(2)).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return s.detach().clamp(*config.scale_range), t.detach()


def fit_full(a: torch.Tensor, r: torch.Tensor, config: CorrectionConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """(M, t) with a·M + t ≈ r, ridge-shrunk toward M = I (the intercept is not shrunk)."""
    rows, channels = a.shape
    lam = _ridge_strength(_channel_variance(a), config)
    design = torch.cat([a, a.new_ones(rows, 1)], dim=1)
    penalty = torch.ones(channels + 1, dtype=a.dtype, device=a.device)
    penalty[-1] = 0
    lhs = design.T @ design / rows + lam * torch.diag(penalty)
    prior = torch.cat([torch.eye(channels, dtype=a.dtype, device=a.device), a.new_zeros(1, channels)])
    solution = torch.linalg.solve(lhs, design.T @ r / rows + lam * prior)
    return solution[:-1], solution[-1]


@torch.no_grad()
def fold_diag(branch: Branch, s: torch.Tensor, t: torch.Tensor) -> None:
    """Output channel j of the branch's Linear: W_j ← s_j·W_j, Δ_j ← s_j·Δ_j, bias_j ← s_j·bias_j + t_j."""
    layer = branch.linear
    s, t = s.to(layer.weight), t.to(layer.weight)
    layer.weight.mul_(s.unsqueeze(1))
    layer.weight_quantizer.scale.mul_(s)
    if layer.bias is None:
        with torch.inference_mode(False):  # a normal tensor even under a caller's inference_mode: it may train later
            layer.bias = nn.Parameter(torch.zeros_like(t), requires_grad=False)
    layer.bias.mul_(s).add_(t)


def install_full(branch: Branch, matrix: torch.Tensor, shift: torch.Tensor) -> BranchCorrection:
    correction = install_branch_correction(branch.parent, branch.attr, matrix.shape[0])
    correction.matrix.copy_(matrix.to(correction.matrix))
    correction.shift.copy_(shift.to(correction.shift))
    return correction


def install_branch_correction(parent: nn.Module, attr: str, channels: int) -> BranchCorrection:
    """Put an identity ``BranchCorrection`` in front of ``parent.<attr>`` (the branch's output dropout)."""
    current = getattr(parent, attr)
    device = next(parent.parameters()).device
    correction = BranchCorrection(channels).to(device)
    setattr(parent, attr, nn.Sequential(correction, current))
    return correction


def full_correction_sites(qmodel: QuantizedModel) -> List[str]:
    """fqns (in ``qmodel.model``) of the modules that hold an installed full correction."""
    sites = []
    for name, module in qmodel.model.named_modules():
        if isinstance(module, nn.Sequential) and len(module) == 2 and isinstance(module[0], BranchCorrection):
            sites.append(name)
    return sites


def reinstall_full_corrections(qmodel: QuantizedModel, sites: List[str], channels: List[int]) -> None:
    """Recreate (identity) corrections at ``sites`` so a saved state dict fits (used by loaders)."""
    for site, c in zip(sites, channels):
        parent_name, _, attr = site.rpartition(".")
        install_branch_correction(qmodel.model.get_submodule(parent_name), attr, c)


def _pre_scale(x: torch.Tensor, gamma: Optional[torch.Tensor]) -> torch.Tensor:
    return x if gamma is None else x / gamma.double()


def _correct_branch(branch: Branch, a: torch.Tensor, r: torch.Tensor, config: CorrectionConfig, images: int,
                    curriculum: bool) -> None:
    a, r = _pre_scale(a, branch.gamma), _pre_scale(r, branch.gamma)
    if config.solver == "adam":
        fold_diag(branch, *fit_diag_adam(a, r, config, images, curriculum))
    elif config.form == "diag":
        fold_diag(branch, *fit_diag(a, r, config))
    else:
        install_full(branch, *fit_full(a, r, config))


@dataclasses.dataclass
class BlockGap:
    """Mean squared gap between the quantized and the FP block output, before and after correction."""

    block: str
    before: float
    after: float


FULL_MIN_IMAGES = 2  # distinct calibration images the full correction needs not to overfit them (see below)


@calibration_state
def correct_activations(qmodel: QuantizedModel, images: torch.Tensor, config: Optional[CorrectionConfig] = None,
                        reference: Optional[QuantizedModel] = None, progress: bool = True,
                        easy_to_hard: bool = False) -> List[BlockGap]:
    """Fit and apply the correction of every supported block of a calibrated ``qmodel`` (in place).

    ``reference`` runs as the FP model (every quantizer off); default: a copy of ``qmodel`` taken now,
    correct only while ``qmodel`` still holds the FP weights (i.e. without reconstruction before).
    ``easy_to_hard``: ``images`` run from easy to hard (a dfqvit set; a SyntheticSet says it itself), so the Adam
    solver follows the E2H curriculum.
    """
    config = config or CorrectionConfig()
    images, ordered = set_images(images, qmodel)
    easy_to_hard = easy_to_hard or ordered
    if config.form == "full" and torch.unique(images.flatten(1), dim=0).shape[0] < FULL_MIN_IMAGES:
        # Measured on a tiny ViT: one image (or copies of it) gave held-out cosine 0.08 to fp32; two gave 0.9995
        warn_user(f"dfqvit: the full activation correction fits a C x C matrix per branch; from fewer than "
                  f"{FULL_MIN_IMAGES} distinct calibration images it overfits them badly. Use more images or "
                  "CorrectionConfig(form='diag')")
    qmodel.eval()
    reference = copy.deepcopy(qmodel) if reference is None else reference
    gaps = []
    blocks = [u for u in model_units(qmodel) if u.is_block]
    with qmodel.quant_state(weights=True, activations=True):
        for unit in tqdm(blocks, desc="correct activations", disable=not progress, leave=False):
            block = unit.module(qmodel)
            branches = block_branches(block)
            if branches is None:
                continue
            attn_branch, mlp_branch = branches
            with reference.quant_state(weights=False, activations=False):
                fp_inputs = capture_input(lambda: reference(images), unit.module(reference))
                _, h_fp, y_fp = residual_streams(unit.module(reference), fp_inputs)
            inputs = unit_input(qmodel, unit, images)
            x_q, h_q, y_q = residual_streams(block, inputs)
            before = float((y_q - y_fp).pow(2).mean())
            _correct_branch(attn_branch, h_q - x_q, h_fp - x_q, config, images.shape[0], easy_to_hard)
            _, h_q, y_q = residual_streams(block, inputs)
            _correct_branch(mlp_branch, y_q - h_q, y_fp - h_q, config, images.shape[0], easy_to_hard)
            _, _, y_q = residual_streams(block, inputs)
            gaps.append(BlockGap(unit.name, before, float((y_q - y_fp).pow(2).mean())))
    return gaps
