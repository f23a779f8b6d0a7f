"""dfqvit: data-free low-bit quantization of Vision Transformers."""
__version__ = "0.1.0"
