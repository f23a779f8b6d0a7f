"""Calibration-image synthesis methods, selectable by name (``available_methods()``):

- ``gaussian``: standard Gaussian noise [PSAQ mode 1];
- ``psaq``: PSAQ-ViT patch-similarity entropy + one-hot + TV;
- ``psaq_v2``: PSAQ-ViT V2 (re-implemented): patch-similarity entropy + TV against a quantized student that learns
  in turns with the images;
- ``spdfq``: SPDFQ attention priors (APA) + multi-semantic crops (MSR) + soft labels (SL) + TV;
- ``dfqvit``: DFQ-ViT easy-to-hard groups with an adversarial term against the quantized model.
"""
from . import gaussian, progressive, psaq, psaq_v2, spdfq  # noqa: F401  (each module registers its method)
from .base import SyntheticSet, available_methods, register_synth, synthesize
from .progressive import curriculum_prefix

__all__ = ["SyntheticSet", "available_methods", "register_synth", "synthesize", "curriculum_prefix"]
