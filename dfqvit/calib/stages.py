"""Saved stage results of the pipeline, so that a later run resumes from the last finished stage.

A stages folder holds one checked safetensors file per stage (``dfqvit.artifact`` container: sha256 of
the payload, format version): ``synthetic`` (the calibration images), ``calibrated``, ``reconstructed``
and ``corrected`` (the full state of the quantized model, float weights included, so that later stages
can go on training). Each file records a fingerprint of everything its result depends on (the float
model's weights, the image source, seed and every stage config up to it); a file is reused only when its
fingerprint matches the current call, otherwise the stage runs again and overwrites it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Dict, Optional

import torch

from dfqvit.artifact import (
    check_state_fits,
    full_corrections_of,
    match_structure,
    payload_sha256,
    read_container,
    structure_signature,
    write_container,
)
from dfqvit.errors import ArtifactError, DFQViTError
from dfqvit.models import QuantizedModel
from dfqvit.synth import SyntheticSet

STAGE_FORMAT = "dfqvit.StageState"
STAGE_VERSION = 1
STAGE_FILES = {"synth": "synthetic.safetensors", "calib": "calibrated.safetensors",
               "recon": "reconstructed.safetensors", "correct": "corrected.safetensors"}

log = logging.getLogger("dfqvit")


def fingerprint(*parts: Any) -> str:
    """sha256 of a JSON rendering of ``parts`` (configs as dicts, tensors by their payload hash)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """The float model's weights and its structure: models with the same weights can compute different things
    (3 or 6 heads, token or average pooling, LayerNorm eps, tanh GELU), and one's stages must not resume the other."""
    return fingerprint(type(model).__module__, type(model).__qualname__, payload_sha256(model.state_dict()),
                       structure_signature(model))


@dataclasses.dataclass
class StageState:
    """One stage's result: a QuantizedModel's state (float weights, every quantizer buffer; ``info``
    lists its full activation corrections) or, for ``synth``, the images (``info`` describes the set)."""

    stage: str
    fingerprint: str
    tensors: Dict[str, torch.Tensor]
    info: Dict[str, Any]

    @classmethod
    def of(cls, qmodel: QuantizedModel, stage: str, fp: str) -> "StageState":
        tensors = {k: v.detach().cpu().clone() for k, v in qmodel.model.state_dict().items()}
        return cls(stage, fp, tensors, {"full_corrections": full_corrections_of(qmodel)})

    def save(self, path: str) -> None:
        write_container(path, self.tensors, STAGE_FORMAT, STAGE_VERSION,
                        {"stage": self.stage, "fingerprint": self.fingerprint, "info": self.info})

    @classmethod
    def load(cls, path: str) -> "StageState":
        tensors, meta = read_container(path, STAGE_FORMAT, STAGE_VERSION)
        try:
            return cls(meta["stage"], meta["fingerprint"], tensors, meta["info"])
        except KeyError as exc:
            raise ArtifactError(f"{path!r} is not a complete stage file (missing {exc})") from exc

    def restore(self, qmodel: QuantizedModel) -> None:
        """Load into a freshly adapted ``qmodel`` of the same model and QuantConfig (checked first)."""
        match_structure(qmodel, self.tensors.keys(), self.info.get("full_corrections", []))
        check_state_fits(dict(qmodel.model.state_dict()), self.tensors, f"stage file '{self.stage}'")
        qmodel.model.load_state_dict(self.tensors, strict=True)


class StageStore:
    """A folder of stage files; every method is a no-op without a folder."""

    def __init__(self, folder: Optional[str]):
        self.folder = os.path.expanduser(os.fspath(folder)) if folder else None
        if self.folder and os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise DFQViTError(f"stages_dir={folder!r} is a file; give a folder for the stage files")
        if self.folder:
            os.makedirs(self.folder, exist_ok=True)  # the expanded path ("~/x" made a folder named "~")

    def path(self, stage: str) -> Optional[str]:
        return os.path.join(self.folder, STAGE_FILES[stage]) if self.folder else None

    def _read(self, stage: str, fp: str) -> Optional[StageState]:
        path = self.path(stage)
        if path is None or not os.path.exists(path):
            return None
        try:
            state = StageState.load(path)  # a damaged file raises instead of being silently recomputed
        except ArtifactError as exc:
            reason = str(exc).split("; save it again")[0]
            raise ArtifactError(f"stage file {reason}; delete it (or the stages folder) to run the stage "
                                "again") from exc
        if state.fingerprint != fp or state.stage != stage:
            log.info("dfqvit: %s was made with other settings; running the stage again", path)
            return None
        return state

    def has(self, stage: str, fp: str) -> bool:
        return self._read(stage, fp) is not None

    def restore(self, stage: str, fp: str, qmodel: QuantizedModel) -> bool:
        state = self._read(stage, fp)
        if state is None:
            return False
        state.restore(qmodel)
        log.info("dfqvit: resumed from %s", self.path(stage))
        return True

    def save(self, stage: str, fp: str, qmodel: QuantizedModel) -> None:
        if self.folder:
            StageState.of(qmodel, stage, fp).save(self.path(stage))

    def load_images(self, fp: str) -> Optional[SyntheticSet]:
        state = self._read("synth", fp)
        if state is None:
            return None
        info = state.info
        return SyntheticSet(images=state.tensors["images"], targets=state.tensors.get("targets"),
                            method=info["method"], seed=info["seed"], config=info["config"])

    def save_images(self, fp: str, images: SyntheticSet) -> None:
        if not self.folder:
            return
        tensors = {"images": images.images}
        if images.targets is not None:
            tensors["targets"] = images.targets
        info = {"method": images.method, "seed": images.seed, "config": images.config}
        StageState("synth", fp, tensors, info).save(self.path("synth"))
