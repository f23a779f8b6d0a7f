"""The data-free pipeline behind ``dfqvit.compile``: images → calibration → reconstruction → correction.

Each stage has a progress bar and, with a stages folder, saves its result (stages.py); a later call with
the same folder resumes after the last stage whose saved result matches the call's settings.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from dfqvit.caller_state import training_state
from dfqvit.config import CalibConfig, CorrectionConfig, QuantConfig, ReconConfig, config_to_dict
from dfqvit.errors import warn_user
from dfqvit.models import QuantizedModel, adapt
from dfqvit.models.quantized import check_finite_weights
from dfqvit.synth import SyntheticSet
from dfqvit.synth.base import easy_to_hard

from .blockwise import calibrate_model
from .correction import BlockGap, correct_activations
from .data import calibration_images
from .recon import UnitReport, reconstruct
from .stages import StageStore, fingerprint, model_fingerprint

Normalization = Optional[Tuple[Sequence[float], Sequence[float]]]


@dataclasses.dataclass
class PipelineResult:
    """The quantized model plus what each stage reported (empty for stages resumed from disk)."""

    qmodel: QuantizedModel
    resumed_from: Optional[str] = None
    recon: List[UnitReport] = dataclasses.field(default_factory=list)
    correction: List[BlockGap] = dataclasses.field(default_factory=list)


def _dict(config) -> Any:
    return None if config is None else config_to_dict(config)


def _source_fingerprint(calib, num_images: int, seed: int, synth_config, model_fp: str,
                        qmodel: QuantizedModel) -> Tuple[str, bool]:
    """Fingerprint of the calibration images and whether they are synthesized (and so worth saving). Synthetic
    images live in the model's normalized input space (another normalization reused them unchanged), and the
    ``dfqvit`` method's depend on the quantization settings as well."""
    if isinstance(calib, str):
        from dfqvit.synth.base import reads_quantized_model
        quant = _dict(qmodel.config) if reads_quantized_model(calib) else None
        return fingerprint("synth", model_fp, calib, num_images, seed, _dict(synth_config), qmodel.input_spec,
                           quant), True
    if isinstance(calib, SyntheticSet):
        calib = calib.images
    from dfqvit.artifact import payload_sha256
    return fingerprint("images", payload_sha256({"x": calib[:num_images].float()})), False


def _seeded_images(calib, qmodel: QuantizedModel, num_images: int, seed: int, progress: bool, synth) -> SyntheticSet:
    """The calibration source's images as a SyntheticSet, made (or read: a shuffling DataLoader) under ``seed``
    without moving the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return calibration_images(calib, qmodel, num_images, seed=seed, progress=progress, synth_config=synth,
                                  as_set=True)


def _runs_easy_to_hard(calib) -> bool:
    """Whether the calibration source's images run from easy to hard (a dfqvit method name or set)."""
    if isinstance(calib, str):
        return easy_to_hard(calib)
    return isinstance(calib, SyntheticSet) and calib.ordered_easy_to_hard


@training_state
def run_pipeline(
    model: nn.Module,
    config: QuantConfig,
    calib,
    *,
    normalization: Normalization = None,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
    progress: bool = True,
    synth=None,
    calibration: Optional[CalibConfig] = None,
    recon: Optional[ReconConfig] = None,
    correction: Optional[CorrectionConfig] = None,
    stages_dir: Optional[str] = None,
) -> PipelineResult:
    """Quantize ``model``; ``recon`` / ``correction`` = None skip those stages."""
    calibration = calibration or CalibConfig()
    check_finite_weights(model)
    store = StageStore(stages_dir)
    qmodel = adapt(model, config, normalization=normalization).to(device)
    if not isinstance(calib, (str, SyntheticSet, torch.Tensor)):
        # A Dataset / DataLoader is read first, so that the stage files key on the images it gives (its id
        # matched after the images changed, and the stale stages were resumed)
        calib = _seeded_images(calib, qmodel, config.calib_images, seed, progress, synth)
    model_fp = model_fingerprint(model)
    source_fp, synthesized = _source_fingerprint(calib, config.calib_images, seed, synth, model_fp, qmodel)
    # The curriculum's default, so part of the later stages' keys (the same images as a plain tensor resumed a stage
    # trained with the curriculum)
    ordered = _runs_easy_to_hard(calib)
    calib_fp = fingerprint("calib", model_fp, source_fp, _dict(config), _dict(calibration), qmodel.input_spec)
    recon_fp = fingerprint("recon", calib_fp, _dict(recon), seed, ordered)
    correct_fp = fingerprint("correct", recon_fp, _dict(correction))

    images: List[torch.Tensor] = []

    def get_images() -> torch.Tensor:
        if not images:
            saved = store.load_images(source_fp) if synthesized else None
            if saved is None:
                source = _seeded_images(calib, qmodel, config.calib_images, seed, progress, synth)
                if synthesized:
                    store.save_images(source_fp, source)
                saved = source
            batch = saved.images[:config.calib_images].float().to(device)
            if batch.shape[0] < config.calib_images:
                warn_user(f"dfqvit: calibrating on {batch.shape[0]} images, fewer than calib_images="
                          f"{config.calib_images}: the calibration source holds no more")
            images.append(batch.clone() if batch.is_inference() else batch)  # made under the caller's inference_mode
            qmodel.calib_images_used = batch.shape[0]  # reports say what was used (None: every stage resumed)
        return images[0]

    references: List[QuantizedModel] = []

    def reference() -> QuantizedModel:
        """The float model the later stages aim at (the original weights, every quantizer off)."""
        if not references:
            references.append(adapt(model, config, normalization=normalization).to(device))
        return references[0]

    result = PipelineResult(qmodel)

    def run_calib():
        calibrate_model(qmodel, get_images(), calibration, progress)

    def run_recon():
        result.recon = reconstruct(qmodel, get_images(), recon, reference(), seed, progress, easy_to_hard=ordered)

    def run_correct():
        result.correction = correct_activations(qmodel, get_images(), correction, reference(), progress,
                                                easy_to_hard=ordered)

    stages: List[Tuple[str, str, Callable[[], None]]] = [("calib", calib_fp, run_calib)]
    if recon is not None:
        stages.append(("recon", recon_fp, run_recon))
    if correction is not None:
        stages.append(("correct", correct_fp, run_correct))

    start = 0
    for i in reversed(range(len(stages))):
        name, fp, _ = stages[i]
        if store.restore(name, fp, qmodel):
            result.resumed_from, start = name, i + 1
            if progress:  # the stages before it are not run, so no progress bar would say anything
                print(f"dfqvit: resumed after stage '{name}' from {store.path(name)} (same settings)",
                      file=sys.stderr)
            break
    for name, fp, run in stages[start:]:
        run()
        store.save(name, fp, qmodel)
    return result
