"""Quantizer math: uniform and log2 quantizers, percentile range search, fake quantization with STE."""
from .functional import (
    fake_quantize_log2,
    fake_quantize_uniform,
    log2_dequantize,
    log2_quantize,
    uniform_dequantize,
    uniform_qrange,
    uniform_quantize,
)
from .quantizers import Log2Quantizer, UniformQuantizer
from .search import search_log2, search_uniform

__all__ = [
    "UniformQuantizer", "Log2Quantizer", "search_uniform", "search_log2", "uniform_quantize",
    "uniform_dequantize", "log2_quantize", "log2_dequantize", "fake_quantize_uniform",
    "fake_quantize_log2", "uniform_qrange",
]
