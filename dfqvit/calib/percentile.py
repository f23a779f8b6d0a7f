"""Percentile calibration of every quantizer (METHODS §1.2).

Weights: channel-wise search on the weights themselves. Activations: one forward of the calibration
images with every quantizer in calibration mode; each quantizer searches its range on the full tensor
it receives and quantizes with it at once, so later quantizers see the quantized upstream values
(sequential calibration, as RepQ-ViT does)."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from dfqvit.caller_state import calibration_state
from dfqvit.errors import CalibrationError
from dfqvit.models import QuantizedModel


@calibration_state
def calibrate_weights(qmodel: QuantizedModel, progress: bool = True) -> None:
    layers = list(qmodel.weight_layers())
    for _, layer in tqdm(layers, desc="calibrate weights", disable=not progress, leave=False):
        layer.calibrate_weight()


@calibration_state
def calibrate_activations(qmodel: QuantizedModel, images: torch.Tensor, progress: bool = True) -> None:
    quantizers = list(qmodel.activation_quantizers())
    if not quantizers:
        return  # weight-only
    bar = tqdm(total=len(quantizers), desc="calibrate activations", disable=not progress, leave=False)

    def tick(*_):  # a forward hook that returns something would replace the output
        bar.update(1)

    hooks = [q.register_forward_hook(tick) for _, q in quantizers]
    for _, q in quantizers:
        q.calibrating = True
    try:
        with qmodel.quant_state(weights=True, activations=True):
            qmodel(images)
    finally:
        for _, q in quantizers:
            q.calibrating = False
        for h in hooks:
            h.remove()
        bar.close()
    missing = [name for name, q in quantizers if not bool(q.initialized)]
    if missing:
        raise CalibrationError(f"these activation quantizers saw no data during calibration: {missing}")


@calibration_state
def calibrate(qmodel: QuantizedModel, images: torch.Tensor, progress: bool = True) -> QuantizedModel:
    """Initialise every weight and activation quantizer of ``qmodel`` from ``images`` (in place)."""
    qmodel.eval()
    calibrate_weights(qmodel, progress)
    calibrate_activations(qmodel, images, progress)
    return qmodel
