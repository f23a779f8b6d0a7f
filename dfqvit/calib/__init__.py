"""Calibration and quantized-network learning: data resolution, percentile calibration (one-pass and
block-wise with post-LayerNorm re-parameterisation), two-stage block reconstruction, activation
correction, and the pipeline with resumable stages."""
from .blockwise import calibrate_blockwise, calibrate_model
from .correction import correct_activations
from .data import calibration_images
from .percentile import calibrate, calibrate_activations, calibrate_weights
from .pipeline import PipelineResult, run_pipeline
from .recon import reconstruct

__all__ = ["calibration_images", "calibrate", "calibrate_activations", "calibrate_weights", "calibrate_blockwise",
           "calibrate_model", "reconstruct", "correct_activations", "run_pipeline", "PipelineResult"]
