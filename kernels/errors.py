"""Error family shared by the kernels and the rest of dfqvit.

It lives here, not in ``dfqvit``, because ``dfqvit.kernels`` must never import the package above it;
``dfqvit.errors`` re-exports ``DFQViTError`` and adds the higher-level errors.
"""


class DFQViTError(Exception):
    """Base class of every error dfqvit raises on purpose; the message says what to do."""


class KernelInputError(DFQViTError, ValueError):
    """A kernel launcher was given a tensor of the wrong shape, dtype, device or layout."""


class MissingBackendError(DFQViTError, RuntimeError):
    """A backend this machine or installation lacks: a CUDA device (MissingGPUError), or the native CPU
    extension dfqvit._C (not built, or disabled by DFQVIT_NATIVE=0)."""


class MissingGPUError(MissingBackendError):
    """A CUDA-only path was asked for on a machine without a CUDA device."""
