"""The ``DFQViTError`` family: every error dfqvit raises on purpose says what it was given, what is
allowed, and what to do. The base class lives in ``dfqvit.kernels.errors`` so kernels can raise it
without importing the package above them."""
from dfqvit.kernels.errors import DFQViTError, KernelInputError, MissingBackendError, MissingGPUError


class UnsupportedBitsError(DFQViTError, ValueError):
    """Bit width outside what the quantizers / kernels implement."""


class UnsupportedModelError(DFQViTError, TypeError):
    """A model (or a variant of a supported model) that no adapter handles."""


class InputShapeError(DFQViTError, ValueError):
    """Input tensor of the wrong rank, channel count or spatial size."""


class NonFiniteInputError(DFQViTError, ValueError):
    """NaN or Inf in an input tensor."""


class CheckpointNotFoundError(DFQViTError, FileNotFoundError):
    """A model description or checkpoint path that does not exist."""


class CalibrationError(DFQViTError, ValueError):
    """Calibration data that cannot be used (wrong type, empty, too few images)."""


class ArtifactError(DFQViTError, ValueError):
    """A saved artifact or stage file that is truncated, corrupted, of another format version, or does
    not fit the model it is loaded into; nothing is loaded from it."""


__all__ = [
    "DFQViTError", "KernelInputError", "MissingBackendError", "MissingGPUError", "UnsupportedBitsError",
    "UnsupportedModelError", "InputShapeError", "NonFiniteInputError", "CheckpointNotFoundError",
    "CalibrationError", "ArtifactError",
]


def warn_user(message: str) -> None:
    """``warnings.warn(message)`` attributed to the first caller outside dfqvit and torch (the line of the user's
    code that started it), however many dfqvit functions and torch decorators lie in between."""
    import sys
    import warnings

    frame, level = sys._getframe(1), 2  # stacklevel 1 is this function, 2 its caller
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in ("dfqvit", "torch"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)
