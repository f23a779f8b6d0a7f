"""dfqvit.kernels: packed low-bit GEMM, log2 attention and fused LayerNorm-quantize kernels.

Importing this package never touches CUDA; Triton kernels compile on first launch.
"""
from .errors import DFQViTError, KernelInputError, MissingGPUError
from .packing import PackedLayout, PackedWeight, pack_weight, packed_nbytes

__all__ = ["DFQViTError", "KernelInputError", "MissingGPUError", "PackedLayout", "PackedWeight",
           "pack_weight", "packed_nbytes"]
