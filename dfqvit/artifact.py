"""``QuantArtifact``: the saved quantized model the engine consumes, and the checked safetensors container
it shares with the pipeline's stage files.

One safetensors file holds:
- ``<layer>.weight_codes``: integer weight codes of every quantized Linear / Conv2d, uint8 for the
  asymmetric codes in [0, 2^b − 1] (int8 for symmetric ones), unpacked: packing to int4 / int3 is the
  engine's job at build time (``layers`` in the JSON gives the bits per layer);
- every other entry of the model's state dict under its timm name: weight scales and zero points
  (``<layer>.weight_quantizer.scale`` / ``.zero_point``, per output channel), activation scales / zero
  points (``*.input_quantizer.*``, ``*.{q,k,v}_quantizer.*``), log2 deltas (``*.attn_quantizer.delta``),
  biases, LayerNorm parameters, position embeddings, class tokens, relative-position bias tables, and
  the ``full`` activation corrections when present;
- a JSON config (safetensors metadata) with the format version, the dfqvit / torch / timm versions, the
  QuantConfig, the input normalization, how to rebuild the float model (timm module, class, kwargs), each
  module's settings (``structure``: num_heads, pooling, ...; a model built otherwise is refused at load), the
  per-layer table and a sha256 of the tensor payload.

Loading rebuilds the model, checks every key, shape and dtype against it and sets each float weight to
its dequantized codes: re-quantizing those gives the same codes, so outputs are bit-identical. A
truncated, corrupted or version-mismatched file raises ``ArtifactError`` and nothing is returned.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import importlib
import json
import math
import os
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from dfqvit.config import config_from_dict, config_to_dict
from dfqvit.errors import ArtifactError, CheckpointNotFoundError, DFQViTError, warn_user
from dfqvit.models import QuantizedModel, adapt

ARTIFACT_FORMAT = "dfqvit.QuantArtifact"
ARTIFACT_VERSION = 1
BUILD_ATTR = "dfqvit_build"  # optional attribute of a float model: {"module", "class", "kwargs"}
CODES_SUFFIX = ".weight_codes"


# -- checked container -----------------------------------------------------------------------------------


def payload_sha256(tensors: Dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_container(path: str, tensors: Dict[str, torch.Tensor], fmt: str, version: int,
                    meta: Dict[str, Any]) -> None:
    """Write atomically (temporary file + rename), so an interrupted save never leaves a partial file."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {"format": fmt, "format_version": str(version), "sha256": payload_sha256(tensors),
              "config": json.dumps(meta, sort_keys=True)}
    save_safetensors_atomically(path, tensors, header)


# Names that promise another format: a safetensors file named model.pt was written without a word, and
# torch.load / numpy / json then failed on it with errors that do not say what it is.
OTHER_FORMAT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".npz", ".npy", ".json", ".onnx",
                         ".tar", ".zip", ".png", ".jpg")


def check_safetensors_name(path: str, what: str = "the file") -> None:
    """Refuse a path whose suffix names another format than the safetensors file dfqvit writes."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix in OTHER_FORMAT_SUFFIXES:
        stem = os.path.splitext(os.fspath(path))[0]
        stem = stem[:-len(".safetensors")] if stem.lower().endswith(".safetensors") else stem  # m.safetensors.pt
        raise DFQViTError(f"{what} {os.fspath(path)!r}: dfqvit writes a safetensors file, not a {suffix} file; name it "
                          f"{stem + '.safetensors'!r}")


def save_safetensors_atomically(path: str, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> None:
    """``safetensors`` ``save_file`` through a temporary file and a rename, making missing folders; an
    unwritable place or a name of another format (``model.pt``) is a DFQViTError that names the path."""
    from safetensors.torch import save_file

    path = os.path.expanduser(os.fspath(path))
    check_safetensors_name(path, "cannot write")
    if os.path.isdir(path):
        example = os.path.join(path, "model.safetensors")
        raise DFQViTError(f"{path!r} is a folder; give the file to write, e.g. {example!r}")
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
        os.close(fd)
        save_file(tensors, tmp, metadata=metadata)
        _sort_metadata_in_place(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the temporary file is owner-only; the saved one gets the usual permissions
        os.replace(tmp, path)
    except OSError as exc:  # it named the temporary file, or a parent that is a file
        why = exc.strerror or str(exc)
        if isinstance(exc, (FileExistsError, NotADirectoryError)):
            why = "a part of its folder is a file"
        raise DFQViTError(f"cannot write {path!r}: {why} (in {folder!r}); give a path in a folder you can write "
                          "to, with room for the file") from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _sort_metadata_in_place(path: str) -> None:
    """safetensors writes ``__metadata__`` in hash-map order, which changes from process to process: the same
    model saved twice gave files with different bytes (and hashes). Rewrite the header with the metadata keys
    sorted; the header keeps its length, so the tensor bytes after it do not move."""
    with open(path, "r+b") as f:
        length = int.from_bytes(f.read(8), "little")
        raw = f.read(length)
        header = json.loads(raw)
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= length:  # same content, so the same length unless the writer's escaping differs
            f.seek(8)
            f.write(text.ljust(length, b" "))


def read_container(path: str, fmt: str, version: int) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(tensors, config) of a file written by :func:`write_container`, or ArtifactError."""
    from safetensors import safe_open

    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{path!r} does not exist")
    if os.path.isdir(path):
        raise ArtifactError(f"{path!r} is a folder; give the .safetensors file written by dfqvit.save")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own types for bad headers and short files
        raise ArtifactError(f"{path!r} is truncated or not a safetensors file ({exc}); save it again") from exc
    if header.get("format") != fmt:
        raise ArtifactError(f"{path!r} is not a {fmt} file (format: {header.get('format')!r})")
    if header.get("format_version") != str(version):
        raise ArtifactError(
            f"{path!r} has {fmt} format version {header.get('format_version')!r}; this dfqvit reads version "
            f"{version}. Re-create it with this dfqvit version")
    if payload_sha256(tensors) != header.get("sha256"):
        raise ArtifactError(f"{path!r} is corrupted: its tensors do not match the stored sha256; save it again")
    try:
        meta = json.loads(header["config"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path!r} has no readable JSON config ({exc})") from exc
    return tensors, meta


def versions() -> Dict[str, str]:
    import timm

    from dfqvit import __version__
    return {"dfqvit": __version__, "torch": torch.__version__.split("+")[0], "timm": timm.__version__}


# -- how to rebuild the float model ------------------------------------------------------------------------


def set_build_info(model: nn.Module, kwargs: Dict[str, Any]) -> nn.Module:
    """Record the constructor arguments of ``model`` (a timm class built directly, e.g. from a reference
    JSON) so that a saved artifact can rebuild it. Returns ``model``."""
    setattr(model, BUILD_ATTR, {"module": type(model).__module__, "class": type(model).__qualname__,
                                "kwargs": dict(kwargs)})
    return model


def build_info(model: nn.Module) -> Dict[str, Any]:
    """How to rebuild ``model``: recorded kwargs, else the timm architecture name, else class only."""
    recorded = getattr(model, BUILD_ATTR, None)
    if recorded is not None:
        return dict(recorded)
    info: Dict[str, Any] = {"module": type(model).__module__, "class": type(model).__qualname__, "kwargs": None}
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if arch:
        info["timm_name"] = arch
        info["kwargs"] = {"num_classes": int(model.num_classes)}
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img_size is not None:
            info["kwargs"]["img_size"] = tuple(img_size)
    return info


def rebuild_float_model(info: Dict[str, Any]) -> nn.Module:
    """A randomly initialised float model of the recorded architecture (only timm classes are built)."""
    if not isinstance(info, dict):
        raise ArtifactError(f"the artifact's build record is {type(info).__name__}, not a JSON object; pass "
                            "model=<a float model of the same architecture> to dfqvit.load / build_engine")
    try:
        return _build_recorded(info)
    except TypeError as exc:  # a keyword this timm does not take (an artifact from another timm version)
        raise ArtifactError(f"the installed timm cannot build the recorded model ({exc}); install the timm version "
                            "the artifact names, or pass model=<a float model of the same architecture>") from None


def _build_recorded(info: Dict[str, Any]) -> nn.Module:
    if info.get("kwargs") is None:
        raise ArtifactError(
            f"the artifact does not record the constructor arguments of its {info.get('class')} model; pass "
            f"model=<a float model of the same architecture> to dfqvit.load / build_engine (or record them before "
            f"saving with dfqvit.artifact.set_build_info)")
    if info.get("timm_name"):
        import timm
        return timm.create_model(info["timm_name"], pretrained=False, **info["kwargs"]).eval()
    module = info.get("module", "")
    if not module.startswith("timm."):
        raise ArtifactError(f"refusing to build {module}.{info.get('class')}: only timm model classes are rebuilt")
    try:
        cls = getattr(importlib.import_module(module), info["class"])
    except (ImportError, AttributeError, KeyError) as exc:
        raise ArtifactError(f"cannot find the model class {module}.{info.get('class')} ({exc})") from exc
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ArtifactError(f"{module}.{info.get('class')} is not an nn.Module class")
    return cls(**info["kwargs"]).eval()


# -- the settings a model was built with, beyond its tensors' shapes -----------------------------------------

# Plain attributes that do not change what a model in eval mode computes (dropout, checkpointing, init, the
# fused-attention switch timm reads from the environment) or that dfqvit sets for its own bookkeeping.
_NOT_STRUCTURE = frozenset({"training", "p", "drop_prob", "scale_by_keep", "inplace", "grad_checkpointing",
                            "fused_attn", "weight_init_mode", "fix_init", "tap"})


def _plain(value):
    if isinstance(value, enum.Enum):
        return str(value)
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    return _NOT_PLAIN


_NOT_PLAIN = object()


def structure_signature(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """Per module of an adapted model: its class and plain settings (``num_heads``, ``window_size``,
    ``global_pool``, LayerNorm ``eps``, ...). Two models with the same state-dict shapes can still compute
    different things (a ViT with 3 or 6 heads, token or average pooling); this tells them apart. Quantizer
    modules are left out (their state is in the tensors)."""
    signature = {}
    for name, module in model.named_modules():
        if type(module).__module__.startswith("dfqvit.quant"):
            continue
        settings = {k: _plain(v) for k, v in sorted(vars(module).items())
                    if not k.startswith("_") and k not in _NOT_STRUCTURE}
        signature[name] = {"class": type(module).__name__,
                           **{k: v for k, v in settings.items() if v is not _NOT_PLAIN}}
    return json.loads(json.dumps(signature))  # the form it takes in the file (tuples as lists)


def structure_differences(saved: Dict[str, Dict[str, Any]], model: Dict[str, Dict[str, Any]]) -> List[str]:
    """``module.setting: saved vs model`` for each setting both sides have that differs. Modules or settings only
    one side has are not compared: another timm / torch version may add some (a module with tensors that only one
    side has is refused by the state-dict check anyway)."""
    diffs = []
    for name in sorted(set(saved) & set(model), key=lambda n: (n.count("."), n)):
        a, b = saved[name], model[name]
        for key in sorted(set(a) & set(b)):
            if a[key] != b[key]:
                diffs.append(f"{name or '<model>'}.{key}: {a[key]!r} saved vs {b[key]!r}")
    return diffs


def check_structure(saved: Optional[Dict[str, Dict[str, Any]]], qmodel: QuantizedModel, rebuilt: bool,
                    build: Dict[str, Any]) -> None:
    """Raise ``ArtifactError`` when the model the artifact is being loaded into was built with other settings
    than the model that was quantized (artifacts written before the signature was recorded are not checked)."""
    if saved is None:
        return
    diffs = structure_differences(saved, structure_signature(qmodel.model))
    if not diffs:
        return
    shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
    if rebuilt:
        raise ArtifactError(
            f"the model rebuilt from the artifact's record ({_describe_build(build)}) is not the model that was "
            f"quantized: {shown}. It was built with settings the record does not keep; pass model=<a float model "
            "built the same way> (its weights are not used) to dfqvit.load / build_engine")
    raise ArtifactError(f"the model passed is not built like the model that was quantized: {shown}; pass one built "
                        "with the same settings (its weights are not used)")


def _describe_build(build: Dict[str, Any]) -> str:
    kwargs = ", ".join(f"{k}={v!r}" for k, v in (build.get("kwargs") or {}).items())
    if build.get("timm_name"):
        return f"timm.create_model({build['timm_name']!r}" + (f", {kwargs}" if kwargs else "") + ")"
    return f"{build.get('module')}.{build.get('class')}({kwargs})"


# -- structure that calibration may add to a freshly adapted model ------------------------------------------


def match_structure(qmodel: QuantizedModel, keys, full_corrections: List[Dict[str, Any]]) -> None:
    """Add what calibration adds to a model, so a saved state dict fits a fresh ``adapt()`` result:
    ``full`` activation corrections and biases created by folds on layers built without one."""
    from dfqvit.calib.correction import reinstall_full_corrections

    try:
        reinstall_full_corrections(qmodel, [c["site"] for c in full_corrections],
                                   [int(c["channels"]) for c in full_corrections])
    except (AttributeError, KeyError, TypeError, ValueError) as exc:  # a site the model does not have
        raise ArtifactError(f"the saved activation corrections do not fit the model ({type(exc).__name__}: {exc}); "
                            "the file is damaged or belongs to another model") from None
    keys = set(keys)
    for name, layer in qmodel.weight_layers():
        if layer.bias is None and f"{name}.bias" in keys:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype,
                                                  device=layer.weight.device), requires_grad=False)


def full_corrections_of(qmodel: QuantizedModel) -> List[Dict[str, Any]]:
    from dfqvit.calib.correction import full_correction_sites

    return [{"site": site, "channels": int(qmodel.model.get_submodule(site)[0].shift.numel())}
            for site in full_correction_sites(qmodel)]


def check_state_fits(expected: Dict[str, torch.Tensor], given: Dict[str, torch.Tensor], what: str) -> None:
    """ArtifactError listing missing / unexpected keys and shape or dtype mismatches."""
    problems = [f"missing {k}" for k in sorted(set(expected) - set(given))]
    problems += [f"unexpected {k}" for k in sorted(set(given) - set(expected))]
    for k in sorted(set(expected) & set(given)):
        e, g = expected[k], given[k]
        if tuple(e.shape) != tuple(g.shape) or e.dtype != g.dtype:
            problems.append(f"{k}: {g.dtype}{tuple(g.shape)} where the model has {e.dtype}{tuple(e.shape)}")
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ArtifactError(f"{what} does not fit the model it is loaded into: {'; '.join(problems[:8])}{more}")


def _code_dtype(signed: bool) -> torch.dtype:
    return torch.int8 if signed else torch.uint8


# In memory, codes of 3 or 4 bits can be held packed in the kernels' reference layouts (group sizes as there).
PACKED_GROUP_K = {4: 64, 3: 128}


@dataclasses.dataclass(frozen=True, eq=False)  # eq would compare tensors element-wise
class PackedCodes:
    """Weight codes of 3 or 4 bits packed in memory (4 bits: half a byte each, 3 bits: 3/8 of a byte), for an
    artifact kept beside a running engine. Files always hold the unpacked codes."""

    data: torch.Tensor  # (N, packed row bytes) uint8: the codes as (N, K), made unsigned, K padded to a group
    shape: Tuple[int, ...]
    dtype: torch.dtype
    bits: int

    @classmethod
    def pack(cls, codes: torch.Tensor, bits: int) -> "PackedCodes":
        from dfqvit.kernels.reference import pack_weight_reference

        shift = 2 ** (bits - 1) if codes.dtype == torch.int8 else 0  # signed codes -> [0, 2^bits - 1]
        flat = codes.reshape(codes.shape[0], -1).to(torch.int16) + shift
        return cls(pack_weight_reference(flat, bits, PACKED_GROUP_K[bits]), tuple(codes.shape), codes.dtype, bits)

    def unpack(self) -> torch.Tensor:
        from dfqvit.kernels.reference import unpack_weight_reference

        k = math.prod(self.shape[1:])
        codes = unpack_weight_reference(self.data, self.bits, k, PACKED_GROUP_K[self.bits]).to(torch.int16)
        shift = 2 ** (self.bits - 1) if self.dtype == torch.int8 else 0
        return (codes - shift).to(self.dtype).reshape(self.shape)


# -- the artifact -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class QuantArtifact:
    """Integer weights, scales, zero points and every float parameter of a quantized model, plus its
    JSON config (see the module docstring for the layout)."""

    tensors: Dict[str, Any]  # torch.Tensor, or PackedCodes for weight codes in a compact() artifact
    config: Dict[str, Any]

    @classmethod
    def from_model(cls, qmodel: QuantizedModel, build: Optional[Dict[str, Any]] = None) -> "QuantArtifact":
        uncalibrated = qmodel.uncalibrated_quantizers()
        if uncalibrated:
            raise ArtifactError(f"cannot save an uncalibrated model ({len(uncalibrated)} quantizers, e.g. "
                                f"{uncalibrated[0]}); run dfqvit.compile first")
        tensors = {k: v.detach().cpu().clone() for k, v in qmodel.model.state_dict().items()}
        layers = {}
        for name, layer in qmodel.weight_layers():
            wq = layer.weight_quantizer
            with torch.no_grad():
                codes = wq.quantize(layer.weight.detach()).to(_code_dtype(bool(wq.signed)))
            del tensors[f"{name}.weight"]
            tensors[name + CODES_SUFFIX] = codes.cpu()
            layers[name] = {"kind": "conv2d" if layer.weight.dim() == 4 else "linear", "w_bits": wq.num_bits,
                            "signed": bool(wq.signed), "weight_shape": list(layer.weight.shape),
                            "input_quantized": layer.input_quantizer is not None}
        spec = qmodel.input_spec
        config = {
            "versions": versions(),
            "quant_config": config_to_dict(qmodel.config),
            "family": qmodel.family,
            "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
            "build": build if build is not None else build_info(qmodel.model),
            "structure": structure_signature(qmodel.model),
            "float_layers": list(qmodel.skipped),
            "layers": layers,
            "full_corrections": full_corrections_of(qmodel),
        }
        return cls(tensors, config)

    def compact(self) -> "QuantArtifact":
        """This artifact with its 3- and 4-bit weight codes packed in memory (1/2 or 3/8 of the byte per weight
        they take otherwise): what an engine keeps for ``dfqvit.save``. Saves the same file, builds the same
        model; the tensors are shared with this artifact, not copied."""
        tensors = dict(self.tensors)
        for name, layer in self.config["layers"].items():
            codes, bits = tensors[name + CODES_SUFFIX], layer["w_bits"]
            if isinstance(codes, torch.Tensor) and bits in PACKED_GROUP_K:
                tensors[name + CODES_SUFFIX] = PackedCodes.pack(codes, bits)
        return QuantArtifact(tensors, self.config)

    def plain_tensors(self) -> Dict[str, torch.Tensor]:
        """Every tensor as the file holds it (packed codes unpacked)."""
        return {k: v.unpack() if isinstance(v, PackedCodes) else v for k, v in self.tensors.items()}

    def nbytes(self) -> int:
        """Bytes its tensors take in memory."""
        return sum((v.data if isinstance(v, PackedCodes) else v).nbytes for v in self.tensors.values())

    def save(self, path: str) -> None:
        write_container(path, self.plain_tensors(), ARTIFACT_FORMAT, ARTIFACT_VERSION, self.config)
        diffs = self.rebuild_differences()
        if diffs:
            warn_user(f"dfqvit.save: {path} records how to rebuild its model as "
                      f"{_describe_build(self.config['build'])}, which builds another model ({'; '.join(diffs[:3])}"
                      f"{'; ...' if len(diffs) > 3 else ''}): dfqvit.load will need model=<a float model built the "
                      "same way>")

    def rebuild_differences(self) -> List[str]:
        """How the model rebuilt from the artifact's record differs from the quantized one (empty when it is the
        same, or when the record cannot rebuild it anyway: then loading asks for a model in any case)."""
        build, saved = self.config.get("build") or {}, self.config.get("structure")
        if saved is None or build.get("kwargs") is None:
            return []
        try:
            qconfig = config_from_dict(self.config["quant_config"])
            qmodel = adapt(rebuild_float_model(build), qconfig)
        except Exception:  # noqa: BLE001 -- a record that cannot rebuild fails with its own message at load
            return []
        return structure_differences(saved, structure_signature(qmodel.model))

    @classmethod
    def load(cls, path: str) -> "QuantArtifact":
        tensors, config = read_container(path, ARTIFACT_FORMAT, ARTIFACT_VERSION)
        return cls(tensors, config)

    def to_model(self, model: Optional[nn.Module] = None, device=None) -> QuantizedModel:
        """A QuantizedModel with exactly the saved behaviour. ``model``: a float model of the same
        architecture to use as the skeleton (its weights are ignored); default: rebuilt from the config."""
        try:
            qconfig = config_from_dict(self.config["quant_config"])
            norm = self.config["normalization"]
            layers = self.config["layers"]
            full_corrections = self.config.get("full_corrections", [])
        except (KeyError, TypeError, DFQViTError) as exc:
            raise ArtifactError(f"the artifact's config is incomplete or of another version ({exc})") from exc
        tensors = self.plain_tensors()
        skeleton = rebuild_float_model(self.config.get("build", {})) if model is None else model
        qmodel = adapt(skeleton, qconfig, normalization=(norm["mean"], norm["std"]))
        state_keys = {(k[:-len(CODES_SUFFIX)] + ".weight" if k.endswith(CODES_SUFFIX) else k)
                      for k in tensors}
        match_structure(qmodel, state_keys, full_corrections)
        expected = dict(qmodel.model.state_dict())
        weight_layers = dict(qmodel.weight_layers())
        if set(layers) != set(weight_layers):
            only_saved = sorted(set(layers) - set(weight_layers))
            only_model = sorted(set(weight_layers) - set(layers))
            record = _describe_build(self.config.get("build", {}))
            advice = (f"the model was rebuilt from the artifact's record ({record}), which lacks settings it was "
                      "built with: pass model=<a float model built the same way>"
                      if model is None else "pass a model of the same architecture (or none, where the artifact "
                      "records how to build it)")
            raise ArtifactError(f"the artifact quantizes {len(layers)} layers, the model has {len(weight_layers)}: "
                                f"only in the artifact {only_saved[:5]}, only in the model {only_model[:5]}; {advice}")
        for name, layer in weight_layers.items():
            expected[name + CODES_SUFFIX] = torch.empty(layer.weight.shape,
                                                        dtype=_code_dtype(bool(layer.weight_quantizer.signed)))
            del expected[f"{name}.weight"]
        check_state_fits(expected, tensors, "the artifact")
        check_structure(self.config.get("structure"), qmodel, model is None, self.config.get("build", {}))
        state = {k: v for k, v in tensors.items() if not k.endswith(CODES_SUFFIX)}
        state.update({f"{name}.weight": layer.weight.detach() for name, layer in weight_layers.items()})
        qmodel.model.load_state_dict(state, strict=True)
        _check_saved_values(qmodel, layers, {name: tensors[name + CODES_SUFFIX] for name in weight_layers})
        with torch.no_grad():
            for name, layer in weight_layers.items():
                codes = tensors[name + CODES_SUFFIX].to(layer.weight.dtype)
                layer.weight.copy_(layer.weight_quantizer.dequantize(codes))
        return qmodel.to(device) if device is not None else qmodel


def _check_saved_values(qmodel: QuantizedModel, layers: Dict[str, Any], codes: Dict[str, torch.Tensor]) -> None:
    """What the checksum does not cover or cannot judge: the JSON ``layers`` table against the quantizers (an edited
    w_bits re-packed 4-bit codes at 3 bits on the next save), codes inside their bit range, scales finite and > 0
    (a NaN scale loaded silently, a negative one failed deep in the native grid check)."""
    problems = []
    for name, layer in qmodel.weight_layers():
        wq, record = layer.weight_quantizer, layers[name]
        if not isinstance(record, dict) or record.get("w_bits") != wq.num_bits \
                or record.get("signed") != bool(wq.signed):
            problems.append(f"{name}: the layer table says {record!r}, the quantizer {wq.num_bits} bits, "
                            f"signed={bool(wq.signed)}")
            continue
        lo, hi = (-(2 ** (wq.num_bits - 1)), 2 ** (wq.num_bits - 1) - 1) if wq.signed else (0, 2 ** wq.num_bits - 1)
        c = codes[name]
        if c.numel() and (int(c.min()) < lo or int(c.max()) > hi):
            problems.append(f"{name}: codes from {int(c.min())} to {int(c.max())}, outside {wq.num_bits}-bit "
                            f"[{lo}, {hi}]")
    for name, quantizer in qmodel.quantizers():
        for buffer_name, value in quantizer.named_buffers(recurse=False):
            if not value.is_floating_point() or buffer_name not in ("scale", "delta", "zero_point"):
                continue
            if not bool(torch.isfinite(value).all()) or (buffer_name != "zero_point" and bool((value <= 0).any())):
                problems.append(f"{name}.{buffer_name}: not finite and > 0")
    if problems:
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise ArtifactError(f"the artifact's values are inconsistent: {'; '.join(problems[:4])}{more}; the file is "
                            "damaged or was edited: quantize the model again")


def save(qmodel: QuantizedModel, path: str, build: Optional[Dict[str, Any]] = None) -> None:
    QuantArtifact.from_model(qmodel, build=build).save(path)


def load(path: str, model: Optional[nn.Module] = None, device=None) -> QuantizedModel:
    return QuantArtifact.load(path).to_model(model, device=device)
