"""dfqvit.kernels: packed low-bit GEMM, log2 attention and fused LayerNorm-quantize kernels.

Importing this package never touches CUDA; Triton kernels compile on first launch. Importing it
registers the ``torch.ops.dfqvit.*`` ops (CUDA = Triton; CPU = the native extension ``dfqvit._C`` when it is
built, see ``native.py``, else ``reference.py`` — the same bits either way):

* ``dfqvit::pack_weight`` / ``dfqvit::unpack_weight``          (packing.py)
* ``dfqvit::qgemm`` (W3/W4/W8 x A8) / ``dfqvit::qgemm_w16``       (qgemm.py)
* ``dfqvit::attention_log2`` / ``dfqvit::attention_linear``      (attention.py)
* ``dfqvit::layernorm_quant``                                    (act_quant.py)

The ``*_triton`` functions run the Triton kernels directly (CUDA tensors, or CPU tensors when
``TRITON_INTERPRET=1`` was set before import); the ``*_reference`` functions in ``reference.py`` are the
same math in plain PyTorch.
"""
from .errors import DFQViTError, KernelInputError, MissingBackendError, MissingGPUError
from .packing import DEFAULT_GROUP_K, PackedLayout, PackedWeight, pack_weight, packed_nbytes
from .qgemm import (GemmConfig, linear_a8, linear_w16, qgemm_accumulator_triton, qgemm_columns_triton, qgemm_triton,
                    qgemm_w16_triton)
from .attention import attention_linear_triton, attention_log2_triton
from .act_quant import layernorm_quant_triton
from .packing import pack_weight_triton, unpack_centered_triton, unpack_weight_triton
from . import native

native.register_cpu_kernels()


def autotune_choices() -> dict:
    """The tile each autotuned Triton kernel picked in this process, per autotune key (benchmark records:
    which GEMM and attention tiles a GPU run actually used). Empty where nothing was autotuned (CPU)."""
    from .attention import _attention_kernel_autotuned
    from .qgemm import _qgemm_kernel_autotuned

    return {name: {repr(key): str(config) for key, config in getattr(tuner, "cache", {}).items()}
            for name, tuner in (("qgemm", _qgemm_kernel_autotuned), ("attention", _attention_kernel_autotuned))}

__all__ = [
    "DFQViTError", "KernelInputError", "MissingBackendError", "MissingGPUError",
    "DEFAULT_GROUP_K", "PackedLayout", "PackedWeight", "pack_weight", "packed_nbytes",
    "pack_weight_triton", "unpack_weight_triton", "unpack_centered_triton",
    "GemmConfig", "linear_a8", "linear_w16", "qgemm_triton", "qgemm_w16_triton", "qgemm_accumulator_triton",
    "qgemm_columns_triton",
    "attention_log2_triton", "attention_linear_triton",
    "layernorm_quant_triton", "autotune_choices",
]
