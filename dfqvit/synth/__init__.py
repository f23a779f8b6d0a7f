"""Calibration-image synthesis methods, selectable by name."""
from . import gaussian  # noqa: F401  (registers "gaussian")
from .base import SyntheticSet, available_methods, register_synth, synthesize

__all__ = ["SyntheticSet", "available_methods", "register_synth", "synthesize"]
