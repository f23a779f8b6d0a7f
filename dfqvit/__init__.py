"""dfqvit: data-free low-bit quantization of Vision Transformers.

    qmodel = dfqvit.compile(model, bits=4)          # W4A4
    qmodel = dfqvit.compile(model, bits=(4, 8), calib=images)
"""
from .api import compile
from .config import QuantConfig, SoftmaxQuantizer, parse_bits
from .errors import (
    CalibrationError,
    CheckpointNotFoundError,
    DFQViTError,
    InputShapeError,
    MissingGPUError,
    NonFiniteInputError,
    UnsupportedBitsError,
    UnsupportedModelError,
)
from .models import QuantizedModel, adapt

__version__ = "0.1.0"

__all__ = [
    "compile", "adapt", "QuantizedModel", "QuantConfig", "SoftmaxQuantizer", "parse_bits",
    "DFQViTError", "UnsupportedBitsError", "UnsupportedModelError", "InputShapeError",
    "NonFiniteInputError", "CheckpointNotFoundError", "CalibrationError", "MissingGPUError",
]
