"""The engine's layers: patch embedding, ViT block, Swin block, patch merging. Each reads packed
weights and grids built once by ``pack.py`` and runs the integer path through a kernel set
(``backends.py``); the residual stream stays float.

One A8 pre-norm block, as the kernels see it::

    LayerNorm+quantize -> qkv GEMM + quantize q, k, v -> int8 attention (log2 softmax) + quantize
    -> proj GEMM (+ residual) -> LayerNorm+quantize -> fc1 GEMM + GELU + re-quantize -> fc2 GEMM (+ residual)

(each LayerNorm+quantize after a residual GEMM runs inside that GEMM on the native backend: ``branch_norm``).

Weight-only (A16) layers take the float path of the same functions: LayerNorm, weight-only GEMM, SDPA.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dfqvit.errors import UnsupportedModelError
from dfqvit.kernels.qgemm import column_grid_with_inverse

from .pack import ActGrid, PackedLinear, act_grid, float_copy, softmax_grid


# --- functions shared by every layer ------------------------------------------------------------------

def layer_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    return norm(x.float()).to(x.dtype)


def norm_input(kernels, x: torch.Tensor, norm: nn.LayerNorm, layer: PackedLinear) -> torch.Tensor:
    """LayerNorm fused with the quantization of ``layer``'s input (int8 out); float for A16 layers."""
    if layer.act is None:
        return layer_norm(x, norm)
    return kernels.layernorm_quant(x, norm, layer.act)


def input_codes(kernels, x2: torch.Tensor, layer: PackedLinear) -> torch.Tensor:
    """x2 (M, K) as int8 codes on ``layer.act``: int8 inputs are codes already, float inputs are quantized."""
    return x2 if x2.dtype == torch.int8 else kernels.quantize(x2, layer.act)


def linear(kernels, x: torch.Tensor, layer: PackedLinear, *, residual: Optional[torch.Tensor] = None,
           gelu: bool = False, out: Optional[ActGrid] = None, out_dtype: torch.dtype) -> torch.Tensor:
    """``layer`` on x (..., K): int8 codes on ``layer.act`` (float inputs are quantized first), or float
    for weight-only layers. The epilogue adds bias, GELU, ``residual`` and re-quantizes to ``out``."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    res2 = None if residual is None else residual.reshape(-1, layer.n)
    if layer.act is None:
        y = kernels.gemm_w16(x2, layer, res2, gelu, out_dtype)
    else:
        y = kernels.gemm(input_codes(kernels, x2, layer), layer, res2, gelu, out, out_dtype)
    return y.reshape(*lead, layer.n)


def attention_float_bias(bias: Optional[torch.Tensor], mask: Optional[torch.Tensor], batch: int):
    """Bias (H, N, N) plus the window mask (nW, N, N) with batch b using window b % nW, for SDPA."""
    if mask is None:
        return bias
    window = torch.arange(batch, device=mask.device) % mask.shape[0]
    masked = mask[window][:, None]
    return masked if bias is None else masked + bias


# --- pieces of a block --------------------------------------------------------------------------------

class BranchEnd(nn.Module):
    """What a residual branch applies after its last Linear: a ``full`` activation correction
    (``x @ M + t``) and a LayerScale. With neither, the residual add is fused into the GEMM."""

    def __init__(self, output_module: nn.Module, layer_scale: Optional[nn.Module]):
        super().__init__()
        from dfqvit.calib.correction import BranchCorrection

        correction = None
        if isinstance(output_module, nn.Sequential) and isinstance(output_module[0], BranchCorrection):
            correction = output_module[0]
        self.register_buffer("matrix", None if correction is None else correction.matrix.detach().float().clone())
        self.register_buffer("shift", None if correction is None else correction.shift.detach().float().clone())
        gamma = getattr(layer_scale, "gamma", None)
        self.register_buffer("gamma", None if gamma is None else gamma.detach().float().clone())

    @property
    def fusable(self) -> bool:
        return self.matrix is None and self.gamma is None

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.matrix is not None:
            y = (y.float() @ self.matrix + self.shift).to(y.dtype)
        if self.gamma is not None:
            y = y * self.gamma.to(y.dtype)
        return y


def branch(kernels, x_in: torch.Tensor, layer: PackedLinear, end: BranchEnd, residual: torch.Tensor):
    """``residual + end(layer(x_in))``, with the add in the GEMM epilogue when nothing sits between."""
    if end.fusable:
        return linear(kernels, x_in, layer, residual=residual, out_dtype=residual.dtype)
    return residual + end(linear(kernels, x_in, layer, out_dtype=residual.dtype))


def branch_norm(kernels, x_in: torch.Tensor, layer: PackedLinear, end: BranchEnd, residual: torch.Tensor,
                norm: nn.Module, next_layer: PackedLinear):
    """``branch`` and ``norm_input`` of its result for ``next_layer``: (residual stream, next layer's input). One
    kernel call (``kernels.gemm_norm``) when the residual add is fused and both layers are integer."""
    if not (end.fusable and layer.act is not None and next_layer.act is not None):
        y = branch(kernels, x_in, layer, end, residual)
        return y, norm_input(kernels, y, norm, next_layer)
    lead = x_in.shape[:-1]
    a = input_codes(kernels, x_in.reshape(-1, x_in.shape[-1]), layer)
    y, codes = kernels.gemm_norm(a, layer, residual.reshape(-1, layer.n), residual.dtype, norm, next_layer.act)
    return y.reshape(*lead, layer.n), codes.reshape(*lead, layer.n)


class Attention(nn.Module):
    """qkv GEMM -> quantized q, k, v -> attention (int8 with a quantized softmax, or SDPA for A16)."""

    def __init__(self, attn: nn.Module, where: str):
        super().__init__()
        self.qkv = PackedLinear(attn.qkv, f"{where}.qkv")
        self.proj = PackedLinear(attn.proj, f"{where}.proj")
        self.num_heads, self.head_dim, self.sm_scale = attn.num_heads, attn.head_dim, float(attn.scale)
        self.grids = tuple(act_grid(q, f"{where}.{n}") for n, q in
                           (("q_quantizer", attn.q_quantizer), ("k_quantizer", attn.k_quantizer),
                            ("v_quantizer", attn.v_quantizer)))
        self.softmax = softmax_grid(attn.attn_quantizer, f"{where}.attn_quantizer")
        # Per-column grids of the qkv output (5, 3*H*d): scale, zero, qmin, qmax of q, k and v in turn, so the
        # three are quantized in one pass (or in the GEMM epilogue), and 1 / scale for the Triton epilogue.
        width = self.num_heads * self.head_dim
        rows = [[float(i == 0) if g is None else float((g.scale, g.zero, g.qmin, g.qmax)[i]) for g in self.grids]
                for i in range(4)]
        grid = torch.tensor(rows, dtype=torch.float32).repeat_interleave(width, dim=1)
        self.register_buffer("qkv_grid", column_grid_with_inverse(grid))
        quantized = [g is not None for g in (*self.grids, self.softmax, self.qkv.act, self.proj.act)]
        if any(quantized) and not all(quantized):
            raise UnsupportedModelError(
                f"{where}: some activation quantizers of this attention are on and some off; the engine runs "
                "a block fully integer (A4..A8) or weight-only (A16). Enable or disable them together")

    def forward(self, kernels, x: torch.Tensor, out_dtype: torch.dtype, bias=None, mask=None) -> torch.Tensor:
        """x: (B, N, C) int8 codes on ``qkv.act`` (float for A16) -> attention output (B, N, H*d): int8 codes on
        ``proj.act`` (float, ``out_dtype``, for A16)."""
        batch, seq = x.shape[:2]
        if self.softmax is None:
            qkv = linear(kernels, x, self.qkv, out_dtype=out_dtype)
            heads = [t.transpose(1, 2) for t in qkv.view(batch, seq, 3, self.num_heads, self.head_dim).unbind(2)]
            o = F.scaled_dot_product_attention(*heads, attn_mask=attention_float_bias(bias, mask, batch),
                                               scale=self.sm_scale)
        else:
            # q, k, v codes straight from the qkv GEMM (a grid per column: the same rounding as quantizing the
            # float output per tensor), handed to the kernel as strided (B, H, N, d) views: no copies.
            a = input_codes(kernels, x.reshape(-1, x.shape[-1]), self.qkv)
            codes = kernels.gemm_codes_per_column(a, self.qkv, self.qkv_grid, out_dtype)
            q8, k8, v8 = (t.transpose(1, 2) for t in
                          codes.view(batch, seq, 3, self.num_heads, self.head_dim).unbind(2))
            # (B, N, H*d) int8 codes on the projection's input grid (fused in the Triton and native kernels).
            return kernels.attention_tokens(q8, k8, v8, self.grids, self.sm_scale, bias, mask, self.softmax,
                                            out_dtype, self.proj.act)
        return o.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)


class Mlp(nn.Module):
    """LayerNorm+quantize -> fc1 + GELU + re-quantize to fc2's grid -> fc2 (+ residual)."""

    def __init__(self, norm: nn.Module, mlp: nn.Module, layer_scale: Optional[nn.Module], where: str):
        super().__init__()
        self.norm = float_copy(norm)
        self.fc1 = PackedLinear(mlp.fc1, f"{where}.fc1")
        self.fc2 = PackedLinear(mlp.fc2, f"{where}.fc2")
        if (self.fc1.act is None) != (self.fc2.act is None):
            raise UnsupportedModelError(f"{where}: fc1 and fc2 must both quantize their inputs or both not")
        self.end = BranchEnd(mlp.drop2, layer_scale)

    def forward(self, kernels, x: torch.Tensor) -> torch.Tensor:
        return self.run(kernels, x)[0]

    def run(self, kernels, x: torch.Tensor, a: Optional[torch.Tensor] = None, next_norm=None):
        """(x + mlp(x), the input of ``next_norm`` = (norm, layer) on the result, or None). ``a``: fc1's input
        (``norm`` of x) when the caller already has it."""
        if a is None:
            a = norm_input(kernels, x, self.norm, self.fc1)
        h = linear(kernels, a, self.fc1, gelu=True, out=self.fc2.act, out_dtype=x.dtype)
        if next_norm is None:
            return branch(kernels, h, self.fc2, self.end, x), None
        return branch_norm(kernels, h, self.fc2, self.end, x, *next_norm)


def _layer_scale(block: nn.Module, name: str) -> Optional[nn.Module]:
    module = getattr(block, name, None)
    return None if module is None or isinstance(module, nn.Identity) else module


# --- blocks -------------------------------------------------------------------------------------------

class ViTBlock(nn.Module):
    """timm ``Block``: x + attn(norm1(x)); x + mlp(norm2(x)), on (B, N, C)."""

    def __init__(self, block: nn.Module, where: str):
        super().__init__()
        self.norm1 = float_copy(block.norm1)
        self.attn = Attention(block.attn, f"{where}.attn")
        self.attn_end = BranchEnd(block.attn.proj_drop, _layer_scale(block, "ls1"))
        self.mlp = Mlp(block.norm2, block.mlp, _layer_scale(block, "ls2"), f"{where}.mlp")

    def forward(self, kernels, x: torch.Tensor) -> torch.Tensor:
        return self.run(kernels, x)[0]

    def run(self, kernels, x: torch.Tensor, a: Optional[torch.Tensor] = None, next_norm=None):
        """(block(x), the input of ``next_norm`` = (norm, layer) on it, or None). ``a``: norm1's output for x when
        the previous block computed it. Each LayerNorm after a residual branch goes with that branch's GEMM
        (``branch_norm``): on the native backend the GEMM normalizes its output tiles while they are in cache."""
        if a is None:
            a = norm_input(kernels, x, self.norm1, self.attn.qkv)
        x, h = branch_norm(kernels, self.attn(kernels, a, x.dtype), self.attn.proj, self.attn_end, x,
                           self.mlp.norm, self.mlp.fc1)
        return self.mlp.run(kernels, x, h, next_norm)


class SwinBlock(nn.Module):
    """timm ``SwinTransformerBlock`` on (B, H, W, C): LayerNorm+quantize, then the cyclic shift, padding and
    window partition act on the int8 codes (they commute with a per-token quantizer), window attention
    with relative-position bias and shift mask, windows merged back, residual add, MLP."""

    def __init__(self, block: nn.Module, where: str):
        super().__init__()
        from timm.models.swin_transformer import window_partition, window_reverse

        self._partition, self._reverse = window_partition, window_reverse
        self.window_size, self.shift_size = tuple(block.window_size), tuple(block.shift_size)
        self.norm1 = float_copy(block.norm1)
        self.attn = Attention(block.attn, f"{where}.attn")
        self.attn_end = BranchEnd(block.attn.proj_drop, None)
        self.mlp = Mlp(block.norm2, block.mlp, None, f"{where}.mlp")
        with torch.no_grad():
            bias = block.attn.relative_position_bias().squeeze(0).float().contiguous()  # (H, N, N)
        self.register_buffer("rel_bias", bias)
        mask = block.attn_mask
        self.register_buffer("mask", None if mask is None else mask.float().contiguous())

    def _windows(self, a: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B * nW, window_area, C), image-major, as timm's ``_attn``."""
        wh, ww = self.window_size
        if any(self.shift_size):
            a = torch.roll(a, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        _, h, w, c = a.shape
        pad_h, pad_w = (wh - h % wh) % wh, (ww - w % ww) % ww
        if pad_h or pad_w:
            # timm pads the normalized activations with 0, whose int8 code is the zero point.
            fill = self.attn.qkv.act.zero if a.dtype == torch.int8 else 0.0
            a = F.pad(a, (0, 0, 0, pad_w, 0, pad_h), value=fill)
        return self._partition(a, self.window_size).reshape(-1, wh * ww, c)

    def _merge(self, y: torch.Tensor, h: int, w: int) -> torch.Tensor:
        wh, ww = self.window_size
        hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
        y = self._reverse(y.view(-1, wh, ww, y.shape[-1]), self.window_size, hp, wp)[:, :h, :w]
        if any(self.shift_size):
            y = torch.roll(y, shifts=self.shift_size, dims=(1, 2))
        return y

    def forward(self, kernels, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        windows = self._windows(norm_input(kernels, x, self.norm1, self.attn.qkv))
        context = self.attn(kernels, windows, x.dtype, self.rel_bias, self.mask)
        y = self.attn_end(linear(kernels, context, self.attn.proj, out_dtype=x.dtype))
        x = x + self._merge(y, h, w)
        return self.mlp(kernels, x.reshape(b, h * w, c)).reshape(b, h, w, c)


class PatchMerging(nn.Module):
    """timm Swin ``PatchMerging``: 2x2 neighbours concatenated, LayerNorm+quantize, reduction GEMM."""

    def __init__(self, merging: nn.Module, where: str):
        super().__init__()
        self.norm = float_copy(merging.norm)
        self.reduction = PackedLinear(merging.reduction, f"{where}.reduction")

    def forward(self, kernels, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        h, w = h + h % 2, w + w % 2
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        a = norm_input(kernels, x, self.norm, self.reduction)
        return linear(kernels, a, self.reduction, out_dtype=x.dtype)


class PatchEmbedding(nn.Module):
    """timm ``PatchEmbed``. A quantized conv (kernel = stride) runs as a GEMM over flattened patches; a
    conv kept float by the config runs as the float conv. Output (B, L, C), or (B, H', W', C) for Swin."""

    def __init__(self, patch_embed: nn.Module, where: str):
        super().__init__()
        from dfqvit.nn import QuantConv2d

        proj = patch_embed.proj
        self.patch_size = tuple(proj.kernel_size)
        self.flatten = bool(patch_embed.flatten)
        if isinstance(proj, QuantConv2d):  # stride = kernel (support.check_engine_support): one GEMM
            self.gemm, self.float_proj = PackedLinear(proj, f"{where}.proj"), None
        else:
            self.gemm, self.float_proj = None, float_copy(proj)
        self.norm = float_copy(patch_embed.norm)
        self._cast = (None, None, None)  # (dtype, device), weight, bias: see _float_params

    def _float_params(self, dtype: torch.dtype):
        """The float conv's weight and bias in ``dtype``, converted once per dtype and device."""
        proj = self.float_proj
        key = (dtype, proj.weight.device)
        if self._cast[0] != key:
            bias = None if proj.bias is None else proj.bias.to(dtype)
            self._cast = (key, proj.weight.to(dtype), bias)
        return self._cast[1], self._cast[2]

    def forward(self, kernels, images: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        b, c, h, w = images.shape
        ph, pw = self.patch_size
        if self.gemm is None and images.is_cuda and out_dtype != torch.float32:
            # A float patch embedding on the GPU runs in the residual stream's dtype (an fp32 conv cost ~0.5 ms
            # of a 10 ms DeiT-S batch-64 forward on an H200).
            weight, bias = self._float_params(out_dtype)
            proj = self.float_proj
            y = F.conv2d(images.to(out_dtype), weight, bias, proj.stride, proj.padding, proj.dilation,
                         proj.groups).permute(0, 2, 3, 1)
        elif self.gemm is None:
            y = self.float_proj(images.float()).permute(0, 2, 3, 1).to(out_dtype)
        else:
            # Rows and columns past the last whole patch are dropped, as the stride = kernel conv drops them.
            h, w = h // ph * ph, w // pw * pw
            images = images[:, :, :h, :w]
            # (C, kh, kw) order inside a patch = the order of the flattened conv weight.
            codes = images if self.gemm.act is None else kernels.quantize(images, self.gemm.act)
            patches = codes.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)
            patches = patches.reshape(b, h // ph, w // pw, c * ph * pw)
            if self.gemm.act is None:
                patches = patches.to(out_dtype)
            y = linear(kernels, patches, self.gemm, out_dtype=out_dtype)
        y = y.flatten(1, 2) if self.flatten else y
        return layer_norm(y, self.norm)
