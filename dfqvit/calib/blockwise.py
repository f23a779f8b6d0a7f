"""Block-by-block percentile calibration (METHODS §1.2, §1.4).

For each unit in forward order: cache its inputs from the quantized model (everything upstream already
calibrated and quantized), then calibrate the unit's quantizers on them. Inside a unit every quantizer
sees the quantized values of the quantizers before it, exactly as in the one-pass path
(``percentile.calibrate``); with ``reparam_post_ln=False`` both give identical scales.

With ``reparam_post_ln`` the qkv / fc1 inputs are first calibrated channel-wise and folded to per-tensor
(reparam.py) before anything downstream of them is calibrated, and their weights are calibrated after
the fold (the fold changes them).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from dfqvit.caller_state import calibration_state
from dfqvit.config import CalibConfig
from dfqvit.errors import CalibrationError
from dfqvit.models import QuantizedModel
from dfqvit.quant.quantizers import _Quantizer

from .percentile import calibrate as calibrate_one_pass
from .reparam import channelwise_input_quantizer, fold_into_per_tensor, post_norm_pairs
from .walk import UnitInput, _StopForward, model_units, unit_input, weight_layers_in


def _activation_quantizers(module: nn.Module) -> List[_Quantizer]:
    return [q for name, q in module.named_modules()
            if isinstance(q, _Quantizer) and not name.endswith("weight_quantizer")]


@torch.no_grad()
def _calibration_forward(module: nn.Module, inputs: UnitInput, stop_after: Optional[nn.Module] = None) -> None:
    """Run ``module`` once; every activation quantizer not yet initialised calibrates on what it gets.
    With ``stop_after``, the forward ends right after that quantizer has calibrated."""
    quantizers = _activation_quantizers(module)
    for q in quantizers:
        q.calibrating = not bool(q.initialized)
    handle = None
    if stop_after is not None:
        def stop(*_):
            raise _StopForward
        handle = stop_after.register_forward_hook(stop)
    try:
        inputs.run(module)
    except _StopForward:
        pass
    finally:
        if handle is not None:
            handle.remove()
        for q in quantizers:
            q.calibrating = False


@torch.no_grad()
def calibrate_unit(module: nn.Module, inputs: UnitInput, reparam_post_ln: bool = True) -> None:
    """Initialise every quantizer inside ``module`` from its cached ``inputs`` (all quantizers on)."""
    for q in _activation_quantizers(module):
        q.initialized.fill_(False)
    pairs = post_norm_pairs(module) if reparam_post_ln else []
    folded = {id(layer) for _, layer in pairs}
    for layer in weight_layers_in(module):
        if id(layer) not in folded:
            layer.calibrate_weight()
    for norm, layer in pairs:
        per_tensor, channelwise = layer.input_quantizer, channelwise_input_quantizer(layer)
        layer.input_quantizer = channelwise
        try:
            _calibration_forward(module, inputs, stop_after=channelwise)
            fold_into_per_tensor(norm, layer, channelwise, per_tensor)
        finally:
            layer.input_quantizer = per_tensor
        layer.calibrate_weight()
    _calibration_forward(module, inputs)
    missing = [type(q).__name__ for q in _activation_quantizers(module) if q.enabled and not bool(q.initialized)]
    if missing:
        raise CalibrationError(f"{len(missing)} activation quantizers of {type(module).__name__} saw no data")


@calibration_state
def calibrate_blockwise(qmodel: QuantizedModel, images: torch.Tensor, reparam_post_ln: bool = True,
                        progress: bool = True) -> QuantizedModel:
    """Calibrate ``qmodel`` in place, one unit (block or outside layer) at a time."""
    qmodel.eval()
    units = model_units(qmodel)
    with qmodel.quant_state(weights=True, activations=True):
        for unit in tqdm(units, desc="calibrate", disable=not progress, leave=False):
            inputs = unit_input(qmodel, unit, images)
            calibrate_unit(unit.module(qmodel), inputs, reparam_post_ln and unit.is_block)
    return qmodel


@calibration_state
def calibrate_model(qmodel: QuantizedModel, images: torch.Tensor, config: Optional[CalibConfig] = None,
                    progress: bool = True) -> QuantizedModel:
    """The calibration stage: block-wise (default) or the one-pass fast path, per ``config``."""
    config = config or CalibConfig()
    if config.blockwise:
        return calibrate_blockwise(qmodel, images, config.reparam_post_ln, progress)
    return calibrate_one_pass(qmodel, images, progress)
