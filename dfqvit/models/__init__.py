"""timm adapters (module swap) and the QuantizedModel wrapper."""
from . import swin, vit  # noqa: F401  (register the adapters)
from .base import Adapter, InputSpec, find_adapter, register_adapter
from .quantized import QuantizedModel, adapt, validate_images

__all__ = ["Adapter", "InputSpec", "find_adapter", "register_adapter", "QuantizedModel", "adapt",
           "validate_images"]
