"""dfqvit: data-free low-bit quantization of Vision Transformers.

    qmodel = dfqvit.compile(model, bits=4)          # W4A4: SPDFQ images, calibration, reconstruction, correction;
    logits = qmodel(images)                         # runs on the integer engine (backend="fake": fake-quant model)
    dfqvit.save(qmodel, "model.safetensors"); qmodel = dfqvit.load("model.safetensors")
    qmodel = dfqvit.compile(model, bits=(4, 8), calib=images)
"""
from .api import compile, load, preflight_backend, save
from .config import (
    CalibConfig,
    CorrectionConfig,
    QuantConfig,
    ReconConfig,
    SoftmaxQuantizer,
    SynthConfig,
    parse_bits,
)
from .errors import (
    ArtifactError,
    CalibrationError,
    CheckpointNotFoundError,
    DFQViTError,
    InputShapeError,
    MissingBackendError,
    MissingGPUError,
    NonFiniteInputError,
    UnsupportedBitsError,
    UnsupportedModelError,
)
from .models import QuantizedModel, adapt

__version__ = "0.1.0"

__all__ = [
    "compile", "save", "load", "preflight_backend",
    "adapt", "QuantizedModel", "QuantConfig", "SoftmaxQuantizer", "parse_bits",
    "SynthConfig", "CalibConfig", "ReconConfig", "CorrectionConfig", "ArtifactError",
    "DFQViTError", "UnsupportedBitsError", "UnsupportedModelError", "InputShapeError",
    "NonFiniteInputError", "CheckpointNotFoundError", "CalibrationError", "MissingBackendError", "MissingGPUError",
]
