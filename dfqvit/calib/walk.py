"""Walking a model block by block: the ordered units (blocks and the quantized layers outside them) and
the cached inputs of one unit at a time.

A unit's input is captured with a forward pre-hook that stops the forward there, so only the part of
the model in front of the unit runs and only one unit's inputs are held at a time (memory bounded by
one block). Hooks on modules make this family-agnostic: the same code serves ViT/DeiT (blocks, then
norm + pooling + heads) and Swin (patch merging at the start of a stage, blocks inside).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn

from dfqvit.errors import CalibrationError
from dfqvit.models import QuantizedModel
from dfqvit.nn.linear import _QuantWeightLayer


@dataclasses.dataclass(frozen=True)
class Unit:
    """A block (``is_block``) or a single quantized layer outside the blocks, by its fqn in ``.model``."""

    name: str
    is_block: bool

    def module(self, qmodel: QuantizedModel) -> nn.Module:
        return qmodel.model.get_submodule(self.name)


@dataclasses.dataclass
class UnitInput:
    """Positional and keyword arguments of one call of a unit (detached tensors)."""

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]

    def run(self, module: nn.Module) -> torch.Tensor:
        return module(*self.args, **self.kwargs)

    def select(self, index: torch.Tensor) -> "UnitInput":
        """The same call on a subset of the images (dim 0 of every tensor argument)."""
        pick = (lambda v: v[index] if isinstance(v, torch.Tensor) else v)
        return UnitInput(tuple(pick(a) for a in self.args), {k: pick(v) for k, v in self.kwargs.items()})


class _StopForward(Exception):
    """Raised by a capture hook to end a forward early; never escapes this module."""


def _names_by_module(root: nn.Module) -> Dict[int, str]:
    return {id(m): name for name, m in root.named_modules()}


@torch.no_grad()
def model_units(qmodel: QuantizedModel) -> List[Unit]:
    """Blocks and quantized layers outside blocks, in the order the forward calls them."""
    names = _names_by_module(qmodel.model)
    blocks = qmodel.blocks
    inside = {id(m) for b in blocks for m in b.modules()}
    candidates = [Unit(names[id(b)], True) for b in blocks]
    candidates += [Unit(name, False) for name, layer in qmodel.weight_layers() if id(layer) not in inside]
    order: List[str] = []
    hooks = [qmodel.model.get_submodule(u.name).register_forward_pre_hook(
        lambda m, args, name=u.name: order.append(name)) for u in candidates]
    spec = qmodel.input_spec
    probe = torch.zeros(1, spec.channels, spec.height, spec.width, device=_device(qmodel))
    try:
        with qmodel.quant_state(weights=False, activations=False):
            qmodel(probe)
    finally:
        for h in hooks:
            h.remove()
    missing = [u.name for u in candidates if u.name not in order]
    if missing:
        raise CalibrationError(f"these quantized modules are never called by the forward: {missing}")
    by_name = {u.name: u for u in candidates}
    return [by_name[name] for name in dict.fromkeys(order)]


def _device(qmodel: QuantizedModel) -> torch.device:
    return next(qmodel.parameters()).device


def _detach(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


@torch.no_grad()
def capture_input(run_model: Callable[[], Any], module: nn.Module) -> UnitInput:
    """Inputs of ``module`` during ``run_model()`` (a forward of a model that contains it); the forward
    stops as soon as ``module`` is reached."""
    captured: List[UnitInput] = []

    def hook(_module, args, kwargs):
        captured.append(UnitInput(tuple(_detach(a) for a in args), {k: _detach(v) for k, v in kwargs.items()}))
        raise _StopForward

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run_model()
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise CalibrationError(f"{type(module).__name__} was not reached by the forward; cannot cache its inputs")
    return captured[0]


def unit_input(qmodel: QuantizedModel, unit: Unit, images: torch.Tensor, weights: bool = True,
               activations: bool = True) -> UnitInput:
    """Inputs of ``unit`` in ``qmodel`` with the given quantizers on (upstream must be calibrated)."""
    with qmodel.quant_state(weights=weights, activations=activations):
        return capture_input(lambda: qmodel(images), unit.module(qmodel))


def float_unit_io(reference: QuantizedModel, unit: Unit, images: torch.Tensor) -> Tuple[UnitInput, torch.Tensor]:
    """Inputs and outputs of ``unit`` in the floating-point ``reference`` model (every quantizer off)."""
    with reference.quant_state(weights=False, activations=False), torch.no_grad():
        inputs = capture_input(lambda: reference(images), unit.module(reference))
        return inputs, inputs.run(unit.module(reference)).detach()


def weight_layers_in(module: nn.Module) -> List[_QuantWeightLayer]:
    return [m for m in module.modules() if isinstance(m, _QuantWeightLayer)]
