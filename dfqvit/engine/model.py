"""``QuantizedViT``: the real integer model built from a calibrated ``QuantizedModel`` (or a saved
``QuantArtifact``). ViT/DeiT (incl. distilled, token or average pooling) and Swin.

    engine = dfqvit.engine.build_engine(qmodel)              # backend="auto": Triton on CUDA, PyTorch on CPU
    logits = engine(images)
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Optional

import torch
from timm.layers import global_pool_nlc
from torch import nn

from dfqvit.errors import CalibrationError, DFQViTError, InputShapeError, UnsupportedModelError
from dfqvit.models import QuantizedModel
from dfqvit.models.quantized import EXPORT_HELP, refuse_export, validate_images
from dfqvit.nn.linear import _QuantWeightLayer

from .backends import select_kernels
from .blocks import Attention, PatchEmbedding, PatchMerging, SwinBlock, ViTBlock, layer_norm, linear
from .pack import PackedLinear, float_copy
from .support import check_engine_support


class _LoadGate:
    """Open while a whole engine loads a state dict, from the check of its grids (its own ``_extra_state``, which
    loads before its children) until its post-hook (or the end of its load_state_dict, if the load raised):
    ``prefix`` is the engine's key prefix in that load, so only the keys below it pass."""

    prefix: Optional[str] = None


def _check_trunk_load(path: str, gate: _LoadGate, module: nn.Module, state_dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook of every module of an engine's trunk (``path``: its place in the engine). Loading
    into ``engine.trunk`` (or a block) took another calibration's buffers under this engine's grids without a word;
    a tensor of another dtype (``assign=True``: a float64 qkv grid) skipped the grid check and changed codes."""
    if gate.prefix is None or prefix != f"{gate.prefix}{path}.":
        raise DFQViTError(f"{path} belongs to a QuantizedViT, whose grids are checked when the whole engine loads: "
                          "call load_state_dict on the engine with its full state dict (or build the engine from its "
                          "artifact: dfqvit.save / dfqvit.load)")
    for name, own in itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False)):
        given = state_dict.get(prefix + name)
        if own is not None and isinstance(given, torch.Tensor) and given.dtype != own.dtype:
            raise DFQViTError(f"{path}.{name}: the state dict holds {given.dtype}, the engine {own.dtype}; an engine's "
                              "tensors keep the dtypes they were built with (load a state dict of this engine)")


def _close_load_gate(engine: nn.Module, incompatible_keys) -> None:
    engine._load_gate.prefix = None


def head_layer(module: nn.Module, where: str) -> nn.Module:
    """A classifier Linear: packed when quantized, a float copy when the config kept it float."""
    return PackedLinear(module, where) if isinstance(module, _QuantWeightLayer) else float_copy(module)


def run_head(kernels, x: torch.Tensor, head: nn.Module) -> torch.Tensor:
    if isinstance(head, PackedLinear):
        return linear(kernels, x, head, out_dtype=torch.float32)
    return head(x.float())


class ViTTrunk(nn.Module):
    """timm ``VisionTransformer`` / ``VisionTransformerDistilled``: patch embedding, prefix tokens and
    position embedding, blocks, final norm, pooling, head (two heads averaged for distilled models)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.patch_embed = PatchEmbedding(model.patch_embed, "patch_embed")
        # timm's distilled model adds no register tokens (its _pos_embed ignores reg_token)
        reg_token = None if hasattr(model, "dist_token") else model.reg_token
        tokens = [t for t in (model.cls_token, getattr(model, "dist_token", None), reg_token) if t is not None]
        prefix = torch.cat(tokens, dim=1).detach().float() if tokens else None
        self.register_buffer("prefix_tokens", prefix)
        self.register_buffer("pos_embed", None if model.pos_embed is None else model.pos_embed.detach().float())
        self.no_embed_class = bool(model.no_embed_class)
        self.norm_pre = float_copy(model.norm_pre)
        self.blocks = nn.ModuleList(ViTBlock(b, f"blocks.{i}") for i, b in enumerate(model.blocks))
        self.norm = float_copy(model.norm)
        self.fc_norm = float_copy(model.fc_norm)
        self.distilled = hasattr(model, "head_dist")
        self.global_pool, self.num_prefix_tokens = model.global_pool, int(model.num_prefix_tokens)
        self.pool_include_prefix = bool(getattr(model, "pool_include_prefix", False))
        self.head = head_layer(model.head, "head")
        self.head_dist = head_layer(model.head_dist, "head_dist") if self.distilled else None

    def embed(self, kernels, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = self.patch_embed(kernels, images, dtype)
        batch = x.shape[0]
        prefix = None if self.prefix_tokens is None else self.prefix_tokens.to(dtype).expand(batch, -1, -1)
        pos = None if self.pos_embed is None else self.pos_embed.to(dtype)
        if self.no_embed_class:  # DeiT-III: position embedding for patches only, then the prefix tokens
            x = x if pos is None else x + pos
            x = x if prefix is None else torch.cat([prefix, x], dim=1)
        else:
            x = x if prefix is None else torch.cat([prefix, x], dim=1)
            x = x if pos is None else x + pos
        return layer_norm(x, self.norm_pre)

    def forward(self, kernels, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = self.embed(kernels, images, dtype)
        a = None  # the next block's norm1 output, computed with the previous block's last GEMM
        for i, block in enumerate(self.blocks):
            following = self.blocks[i + 1] if i + 1 < len(self.blocks) else None
            x, a = block.run(kernels, x, a, None if following is None else (following.norm1, following.attn.qkv))
        if self.distilled:
            x = layer_norm(x[:, :2], self.norm)
            return (run_head(kernels, x[:, 0], self.head) + run_head(kernels, x[:, 1], self.head_dist)) / 2
        if self.global_pool == "token":
            x = x[:, :1]  # LayerNorm is per token: normalise only the class token
        x = global_pool_nlc(layer_norm(x, self.norm), pool_type=self.global_pool,
                            num_prefix_tokens=self.num_prefix_tokens, reduce_include_prefix=self.pool_include_prefix)
        return run_head(kernels, layer_norm(x, self.fc_norm), self.head)


class SwinStage(nn.Module):
    def __init__(self, stage: nn.Module, where: str):
        super().__init__()
        down = stage.downsample
        self.downsample = None if isinstance(down, nn.Identity) else PatchMerging(down, f"{where}.downsample")
        self.blocks = nn.ModuleList(SwinBlock(b, f"{where}.blocks.{i}") for i, b in enumerate(stage.blocks))

    def forward(self, kernels, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(kernels, x)
        for block in self.blocks:
            x = block(kernels, x)
        return x


class SwinTrunk(nn.Module):
    """timm ``SwinTransformer`` (NHWC): patch embedding, stages (patch merging at stage start), final
    norm, average pooling, ``head.fc``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.patch_embed = PatchEmbedding(model.patch_embed, "patch_embed")
        self.stages = nn.ModuleList(SwinStage(s, f"layers.{i}") for i, s in enumerate(model.layers))
        self.norm = float_copy(model.norm)
        self.pool = float_copy(model.head.global_pool)  # timm's own pooling (NHWC, flattened)
        self.head = head_layer(model.head.fc, "head.fc")

    def forward(self, kernels, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = self.patch_embed(kernels, images, dtype)
        for stage in self.stages:
            x = stage(kernels, x)
        return run_head(kernels, self.pool(layer_norm(x, self.norm).float()), self.head)


TRUNKS = {"vit": ViTTrunk, "swin": SwinTrunk}
ENGINE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # of the residual stream (build_engine(dtype=))


def _own_tensors(trunk: nn.Module, qmodel: QuantizedModel) -> None:
    """Copy every tensor of ``trunk`` that shares storage with ``qmodel`` (``detach()`` / ``.float()`` of an fp32
    tensor copy nothing): the position embedding and weight scales were shared, so loading a state dict into the
    fake-quant model changed the engine built from it, which then mixed two calibrations without a word."""
    source = {t.untyped_storage().data_ptr() for t in itertools.chain(qmodel.parameters(), qmodel.buffers())}
    for module in trunk.modules():
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if tensor is not None and tensor.untyped_storage().data_ptr() in source:
                owned = tensor.detach().clone()
                if isinstance(tensor, nn.Parameter):
                    owned = nn.Parameter(owned, requires_grad=tensor.requires_grad)
                setattr(module, name, owned)


class QuantizedViT(nn.Module):
    """The integer engine of a calibrated model. Call it on normalized images (B, C, H, W); it returns
    fp32 logits. ``backend``: "auto" (Triton on CUDA, the native C++ kernels on a CPU where ``dfqvit._C`` is
    built, PyTorch otherwise), "triton", "native" or "torch".

    ``dtype`` is the residual stream's dtype (default fp16 on CUDA, fp32 on CPU). On CUDA with the Triton
    backend, calls replay a CUDA graph per batch-size bucket (``cuda_graphs=False`` runs eagerly).

    ``artifact``: the ``QuantArtifact`` this engine was built from, kept on the CPU so ``dfqvit.save`` can
    write it (set by ``dfqvit.compile`` / ``dfqvit.load`` / ``from_artifact``; None when built from a
    ``QuantizedModel`` directly — save that model instead). Assigning one keeps its ``compact()`` form: 3- and
    4-bit codes packed, half a byte per 4-bit weight instead of one.
    """

    def __init__(self, qmodel: QuantizedModel, backend: str = "auto", *, dtype: Optional[torch.dtype] = None,
                 cuda_graphs: Optional[bool] = None):
        super().__init__()
        if not isinstance(qmodel, QuantizedModel):
            raise UnsupportedModelError(f"QuantizedViT is built from a calibrated dfqvit QuantizedModel, got "
                                        f"{type(qmodel).__name__}")
        uncalibrated = qmodel.uncalibrated_quantizers()
        if uncalibrated:  # its grids are placeholders: the engine returned all-zero logits
            raise CalibrationError(f"cannot build an engine of an uncalibrated model ({len(uncalibrated)} "
                                   f"quantizers, e.g. {uncalibrated[0]}); run dfqvit.compile (or calibrate) first")
        check_engine_support(qmodel.model, qmodel.config)
        device = next(qmodel.model.parameters()).device
        self.kernels = select_kernels(backend, device)
        self.family, self.config, self.input_spec = qmodel.family, qmodel.config, qmodel.input_spec
        self.artifact = None
        self.float_layers = tuple(qmodel.skipped)
        self.check_inputs = qmodel.config.check_inputs
        self.dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        if self.dtype not in ENGINE_DTYPES:
            raise DFQViTError(f"dtype={self.dtype}: the engine's residual stream runs in one of "
                              f"{', '.join(map(str, ENGINE_DTYPES))} (default: float16 on CUDA, float32 on a CPU)")
        # Not inference tensors even when built under inference_mode: load_state_dict could not write them later
        with torch.inference_mode(False), torch.no_grad():
            self.trunk = TRUNKS[qmodel.family](qmodel.model).to(device)
            _own_tensors(self.trunk, qmodel)
            self.kernels.prepare(self.trunk)
        self._load_gate = _LoadGate()
        for name, module in self.trunk.named_modules():
            module.register_load_state_dict_pre_hook(
                functools.partial(_check_trunk_load, f"trunk.{name}" if name else "trunk", self._load_gate))
        self.register_load_state_dict_post_hook(_close_load_gate)
        use_graphs = (device.type == "cuda" and self.backend == "triton") if cuda_graphs is None else cuda_graphs
        if use_graphs and device.type != "cuda":  # it was accepted, then every call failed
            raise DFQViTError(f"cuda_graphs=True needs the model on a CUDA device (it is on {device}); move the "
                              "model first (build_engine(..., device='cuda')) or leave cuda_graphs unset")
        self.graphs = None
        if use_graphs:
            from .graphs import CUDAGraphRunner
            self.graphs = CUDAGraphRunner(self.run)
        self.eval()  # nothing in the engine trains; this keeps .training the same as the fake-quant model's

    @classmethod
    def from_quantized(cls, qmodel: QuantizedModel, backend: str = "auto", **kwargs) -> "QuantizedViT":
        return cls(qmodel, backend, **kwargs)

    @classmethod
    def from_artifact(cls, artifact, backend: str = "auto", *, model: Optional[nn.Module] = None, device=None,
                      **kwargs) -> "QuantizedViT":
        """From a ``QuantArtifact`` or the path of a saved one (``dfqvit.save``)."""
        from dfqvit.artifact import QuantArtifact

        if not isinstance(artifact, QuantArtifact):
            artifact = QuantArtifact.load(str(artifact))
        engine = cls(artifact.to_model(model, device=device), backend, **kwargs)
        engine.artifact = artifact
        return engine

    @property
    def artifact(self):
        return self._artifact

    @artifact.setter
    def artifact(self, artifact) -> None:
        """The calibration's artifact (what dfqvit.save writes); another model's was taken and saved silently."""
        from dfqvit.artifact import QuantArtifact

        if artifact is not None and not isinstance(artifact, QuantArtifact):
            raise DFQViTError(f"QuantizedViT.artifact takes a QuantArtifact or None, got {type(artifact).__name__}")
        if artifact is not None and self._modules.get("trunk") is not None and not self._is_mine(artifact):
            raise DFQViTError("this artifact quantizes other layers, bits or weight scales than the engine (another "
                              "model or calibration); give the engine the artifact it was built from "
                              "(build_engine(artifact) keeps it)")
        self._artifact = None if artifact is None else artifact.compact()

    def _is_mine(self, artifact) -> bool:
        """Same quantized layers, bits and weight scales (another calibration of the same model differs in them)."""
        saved = {name: layer.get("w_bits") for name, layer in artifact.config.get("layers", {}).items()}
        layers = [m for m in self.trunk.modules() if isinstance(m, PackedLinear)]
        if saved != {m.where: m.bits for m in layers}:
            return False
        scales = (artifact.tensors.get(f"{m.where}.weight_quantizer.scale") for m in layers)
        return all(isinstance(s, torch.Tensor) and torch.equal(s.float().flatten(), m.w_scale.float().flatten().cpu())
                   for s, m in zip(scales, layers))

    @property
    def backend(self) -> str:
        return self.kernels.name

    @property
    def backend_label(self) -> str:
        """The backend, with the vector ISA the native kernels run (``DFQVIT_NATIVE_ISA`` / ``native.set_isa``
        change it): e.g. ``native (isa=avx2)``."""
        if self.backend != "native":
            return self.backend
        from dfqvit.kernels import native
        return f"native (isa={native.isa()})"

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.cuda()``, ``.half()`` and the like pass only when they change nothing: the kernels, the
        weight layout and the activation dtype were chosen for one device when the engine was built, and a
        cast of its scales and biases would change its results without a word."""
        probe = torch.zeros((), dtype=torch.float32, device=self.device)
        source = "engine.artifact" if self.artifact is not None else "the fake-quant model or its artifact"
        try:
            moved = fn(probe)
        except (RuntimeError, AssertionError) as exc:  # .cuda() without a driver, or on a CPU-only torch
            raise DFQViTError(f"this engine runs on {self.device} with the {self.backend} backend, fixed when it was "
                              f"built, and cannot be moved ({str(exc).splitlines()[0]}). To run elsewhere, build "
                              f"one there: dfqvit.engine.build_engine({source}, device=...)") from None
        if moved.device != probe.device or moved.dtype != probe.dtype:
            raise DFQViTError(
                f"this engine runs on {self.device} with the {self.backend} backend and {self.dtype} activations, "
                f"fixed when it was built; it cannot become {moved.dtype} on {moved.device}. Build one there: "
                f"dfqvit.engine.build_engine({source}, device='{moved.device.type}') (or "
                f"dfqvit.load(path, device=...)); build_engine(..., dtype=...) picks the activation dtype")
        return super()._apply(fn, recurse)

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    def grids(self) -> dict:
        """What the engine fixed at build time besides its buffers: bits and the activation / softmax grids of every
        layer (plain Python values the kernels take as arguments)."""
        found = {"bits": [self.config.w_bits, self.config.a_bits], "backend": self.backend}
        for name, module in self.trunk.named_modules():
            if isinstance(module, PackedLinear):
                found[name] = [module.bits, None if module.act is None else list(dataclasses.astuple(module.act))]
            if isinstance(module, Attention):  # q, k, v grids and the softmax quantizer
                found[f"{name}.grids"] = repr((module.grids, module.softmax))
        return found

    # The grids are not tensors, so a state dict alone would carry the buffers of one calibration into an engine of
    # another (it loaded with "All keys matched" and gave logits of neither). The state dict carries the grids and
    # loading refuses different ones.
    def get_extra_state(self):
        refuse_export()  # ONNX's TorchScript exporter reads the state dict before the forward runs
        return self.grids()

    def set_extra_state(self, state) -> None:
        mine = self.grids()
        differ = sorted(k for k in set(state) | set(mine) if state.get(k) != mine.get(k))
        if differ:
            raise DFQViTError(
                f"this state dict comes from an engine with other grids, bits or backend ({', '.join(differ[:4])}"
                f"{', ...' if len(differ) > 4 else ''} differ): an engine's grids are fixed when it is built. Build "
                "that engine again from its artifact (dfqvit.save / dfqvit.load, or build_engine(artifact))")

    def load_state_dict(self, *args, **kwargs):
        try:
            return super().load_state_dict(*args, **kwargs)
        finally:  # a load that raised half way skipped the post-hook that closes the gate
            self._load_gate.prefix = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Runs before the trunk's buffers load: a dict without the grids (strict=False, or "_extra_state" deleted)
        # skipped set_extra_state and loaded another calibration's buffers into this engine's grids.
        if f"{prefix}_extra_state" not in state_dict and any(k.startswith(f"{prefix}trunk.") for k in state_dict):
            raise DFQViTError("this state dict lacks the engine's grids ('_extra_state'), so it cannot be checked "
                              "against this engine's; load a complete QuantizedViT state dict, or build the engine "
                              "from its artifact (dfqvit.save / dfqvit.load)")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # set_extra_state checks the grids
        self._load_gate.prefix = prefix  # the trunk loads next; _close_load_gate closes it after

    def weight_nbytes(self) -> int:
        """Bytes of all weights as stored: packed codes + per-channel parameters of quantized layers, plus
        the float weights of layers kept float (biases, norms and embeddings not counted)."""
        total = 0
        for m in self.modules():
            if isinstance(m, PackedLinear):
                total += m.weight_nbytes()
            elif isinstance(m, (nn.Linear, nn.Conv2d)):
                total += m.weight.numel() * m.weight.element_size()
        return total

    def check_images(self, images: torch.Tensor) -> None:
        if isinstance(images, torch.Tensor) and images.device != self.device:
            raise InputShapeError(f"images are on device {images.device} but the engine is on {self.device}; move them "
                                  f"with images.to('{self.device}')")
        validate_images(images, self.input_spec, "images", finite=self.check_inputs)

    @torch.no_grad()
    def run(self, images: torch.Tensor) -> torch.Tensor:
        """The eager forward without input checks (what CUDA graphs capture). Autocast is off inside: it would
        cast the float layers (patch conv, LayerNorms, a float head) behind the engine's back, changing its logits
        (measured: cosine 0.96 against the same engine on a tiny W4A4 ViT under CPU bfloat16 autocast)."""
        with torch.autocast(images.device.type, enabled=False):
            return self.trunk(self.kernels, images, self.dtype)

    # torch.compile(engine) would trace the Python between the kernels and specialise on every layer's float
    # scalars: on the CIFAR ViT (CPU, batch 8) 16 s of compiling for 13 ms per call against 8.2 ms eager. The
    # engine is already fused kernels (and CUDA graphs on a GPU), so dynamo runs it as it is.
    @torch.compiler.disable
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        refuse_export()
        self.check_images(images)
        if self.graphs is not None:
            return self.graphs(images)
        return self.run(images)

    def __prepare_scriptable__(self):  # torch.jit.script calls this first
        raise DFQViTError(EXPORT_HELP)

    def extra_repr(self) -> str:
        c = self.config
        a = "16" if not c.quantize_activations else str(c.a_bits)
        graphs = "on" if self.graphs is not None else "off"
        softmax = ""
        if c.quantize_activations:  # the Triton log2 attention's default math here; the rest always runs exact
            from dfqvit.config import SoftmaxQuantizer
            from dfqvit.kernels.attention import resolve_softmax_math
            log2_on_triton = self.backend == "triton" and c.softmax_quantizer == SoftmaxQuantizer.LOG2
            math = resolve_softmax_math(torch.device(self.device)) if log2_on_triton else "exact"
            softmax = f", softmax_math={math}"
        return (f"family={self.family}, W{c.w_bits}A{a}{softmax}, backend={self.backend_label}, device={self.device}, "
                f"dtype={self.dtype}, cuda_graphs={graphs}, weight_bytes={self.weight_nbytes()}, "
                f"float_layers={list(self.float_layers)}")
