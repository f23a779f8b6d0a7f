"""Block-wise reconstruction in the two stages of I&S-ViT (SPDFQ §3.4.2 eq. 14, §4.1; METHODS §3).

Per unit (block, or quantized layer outside the blocks) and stage, minimise the squared L2 distance
between the unit's quantized output and the floating-point model's output for the same images, with
gradients only into that unit:

- stage 1: activations quantized, weights float; inputs = the FP model's inputs to the unit;
- stage 2: weight quantizers re-initialised on the (stage-1) weights (§1.2), everything quantized;
  inputs = the quantized model's inputs to the unit.

Learned: the float weights and biases of the unit's QuantLinear / QuantConv2d (through the STE of
§1.1) and Swin's relative-position bias table. Frozen: LayerNorm, every Δ / z (buffers).
The channel-wise post-LN grids of I&S stage 1 are already folded to per-tensor at calibration
(reparam.py): the folded per-tensor quantizer gives exactly the channel-wise codes, so stage 1 sees the
same quantization grid as I&S; only the weights are trained in the folded parameterisation.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Dict, List, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from dfqvit.caller_state import training_state
from dfqvit.config import ReconConfig
from dfqvit.models import QuantizedModel
from dfqvit.nn import QuantWindowAttention
from dfqvit.synth.progressive import curriculum_pool

from .data import set_images
from .walk import Unit, UnitInput, float_unit_io, model_units, unit_input, weight_layers_in


def learnable_parameters(module: nn.Module) -> List[nn.Parameter]:
    """Weights and biases of the quantized layers inside ``module`` and Swin's relative-position bias."""
    params: List[nn.Parameter] = []
    for layer in weight_layers_in(module):
        params.append(layer.weight)
        if layer.bias is not None:
            params.append(layer.bias)
    for m in module.modules():
        if isinstance(m, QuantWindowAttention):
            params.append(m.relative_position_bias_table)
    return params


def reconstruction_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[I&S] form of eq. 14: squared error summed over dim 1 (tokens), averaged over the rest."""
    return (output - target).pow(2).sum(dim=1).mean()


@dataclasses.dataclass
class UnitReport:
    """Loss of one unit in one stage before and after its iterations (on all cached images)."""

    unit: str
    stage: int
    before: float
    after: float


def _generator_for(seed: int, stage: int, index: int) -> torch.Generator:
    # modulo 2**64: manual_seed takes 64 bits, and a large seed times the multiplier overflowed it
    return torch.Generator().manual_seed((seed * 1_000_003 + stage * 1_009 + index) % 2 ** 64)


def batch_rows(num_images: int, batch: int, step: int, iterations: int, curriculum: bool,
               generator: torch.Generator) -> torch.Tensor:
    """Step ``step``'s (0-based) random mini-batch: ``batch`` distinct rows of all ``num_images``, or with
    ``curriculum`` of the easy -> hard set's first ``curriculum_pool`` rows (METHODS §4.1), fewer while that prefix
    is smaller."""
    pool = curriculum_pool(num_images, step, iterations) if curriculum else num_images
    return torch.randperm(pool, generator=generator)[:batch]


@training_state  # Adam on the unit's parameters, whatever the caller's grad mode, autocast or default dtype
def train_unit(module: nn.Module, inputs: UnitInput, target: torch.Tensor, config: ReconConfig,
               generator: torch.Generator, curriculum: bool = False) -> UnitReport:
    """``config.iterations`` Adam steps on ``module``'s learnable parameters (cosine lr decay to 0); with
    ``curriculum`` the rows of ``target`` run easy -> hard and the batches grow from the easy half."""
    params = learnable_parameters(module)
    num_images = target.shape[0]
    batch = min(config.batch_size, num_images)
    with torch.no_grad():
        before = float(reconstruction_loss(inputs.run(module), target))
    if not params or config.iterations == 0:
        return UnitReport("", 0, before, before)
    start = [p.detach().clone() for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.iterations, eta_min=0.0)
    try:
        for step in range(config.iterations):
            index = batch_rows(num_images, batch, step, config.iterations, curriculum, generator).to(target.device)
            loss = reconstruction_loss(inputs.select(index).run(module), target[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    with torch.no_grad():
        after = float(reconstruction_loss(inputs.run(module), target))
        if not after <= before:  # Adam's absolute steps can overshoot tiny weights (a 1e-6 head: cosine 0.99 -> 0.10)
            for p, value in zip(params, start):
                p.copy_(value)
            after = before
    return UnitReport("", 0, before, after)


def _stage(qmodel: QuantizedModel, reference: QuantizedModel, units: List[Unit], images: torch.Tensor,
           config: ReconConfig, stage: int, seed: int, progress: bool, curriculum: bool) -> List[UnitReport]:
    reports = []
    bar = tqdm(units, desc=f"reconstruct (stage {stage})", disable=not progress, leave=False)
    for index, unit in enumerate(bar):
        module = unit.module(qmodel)
        fp_inputs, target = float_unit_io(reference, unit, images)
        if stage == 1:
            inputs, weights = fp_inputs, False
        else:
            for layer in weight_layers_in(module):  # §3 step 3: re-initialise on the current weights
                layer.calibrate_weight()
            inputs, weights = unit_input(qmodel, unit, images), True
        del fp_inputs
        with qmodel.quant_state(weights=weights, activations=True):
            report = train_unit(module, inputs, target, config, _generator_for(seed, stage, index), curriculum)
        report.unit, report.stage = unit.name, stage
        bar.set_postfix(loss=f"{report.before:.3g}->{report.after:.3g}")
        reports.append(report)
    return reports


@training_state  # the cached block inputs too: under a caller's inference_mode autograd could not save them
def reconstruct(qmodel: QuantizedModel, images: torch.Tensor, config: Optional[ReconConfig] = None,
                reference: Optional[QuantizedModel] = None, seed: int = 0,
                progress: bool = True, easy_to_hard: bool = False) -> List[UnitReport]:
    """Reconstruct a calibrated ``qmodel`` in place; returns per-unit losses.

    ``reference`` is the floating-point model whose unit outputs are the targets (any QuantizedModel of
    the same architecture; it runs with every quantizer off). Default: a copy of ``qmodel`` taken now,
    which is the FP model as long as ``qmodel``'s weights have not been trained yet.
    ``easy_to_hard``: ``images`` run from easy to hard (a ``dfqvit`` set), which turns ``config.curriculum=None``
    on. ``images`` may also be a SyntheticSet, whose method says it.
    """
    config = config or ReconConfig()
    images, ordered = set_images(images, qmodel)
    easy_to_hard = easy_to_hard or ordered
    curriculum = easy_to_hard if config.curriculum is None else config.curriculum
    qmodel.eval()
    reference = copy.deepcopy(qmodel) if reference is None else reference
    units = [u for u in model_units(qmodel) if u.is_block or config.layers]
    reports: List[UnitReport] = []
    if config.two_stage and qmodel.config.quantize_activations:  # stage 1 quantizes activations only
        reports += _stage(qmodel, reference, units, images, config, 1, seed, progress, curriculum)
    reports += _stage(qmodel, reference, units, images, config, 2, seed, progress, curriculum)
    return reports


def losses_by_unit(reports: List[UnitReport], stage: int) -> Dict[str, UnitReport]:
    return {r.unit: r for r in reports if r.stage == stage}
