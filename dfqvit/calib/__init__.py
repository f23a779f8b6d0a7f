"""Calibration: data resolution and percentile range search of every quantizer."""
from .data import calibration_images
from .percentile import calibrate, calibrate_activations, calibrate_weights

__all__ = ["calibration_images", "calibrate", "calibrate_activations", "calibrate_weights"]
