"""Engine vs the fake-quant model of the same calibration (and vs fp32), on tiny ViT / DeiT / Swin.

The engine and the fake model share every integer code by construction; their logits differ only by
float summation order (integer GEMM epilogue vs F.linear on dequantized values), which can move an
activation that sits on a rounding boundary by one level. At 8-bit and weight-only that keeps logits
within cosine 0.999; at A4 one level is 1/16 of the range, so the floor there is stated separately.
"""
from __future__ import annotations

from functools import partial

import pytest
import torch

import dfqvit
from dfqvit.engine import QuantizedViT, build_engine
from dfqvit.engine.pack import PackedLinear
from dfqvit.errors import DFQViTError, InputShapeError

from conftest import TINY_MODELS, cosine, tiny_deit_distilled, tiny_swin, tiny_vit

IMAGES = 16
_CACHE = {}


def calibrated(name: str, bits):
    """(float model, fake-quant model) for a tiny model, calibrated once per test session (no recon)."""
    key = (name, bits)
    if key not in _CACHE:
        model = TINY_MODELS[name]() if name in TINY_MODELS else SMALL_MODELS[name]()
        torch.manual_seed(1)
        size = model.patch_embed.img_size
        qmodel = dfqvit.compile(model, bits=bits, calib=torch.randn(4, 3, *size), recon=None, correction=None,
                                progress=False, backend="fake")
        _CACHE[key] = (model, qmodel)
    return _CACHE[key]


def images(n: int = IMAGES, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))


def small_swin():
    """8x8 tokens, window 4: stage 1 has 4 windows and a shifted block with a mask; stage 2 one window."""
    from timm.models.swin_transformer import SwinTransformer
    torch.manual_seed(0)
    return SwinTransformer(img_size=16, patch_size=2, window_size=4, embed_dim=16, depths=(2, 1),
                           num_heads=(2, 2), num_classes=10).eval()


def padded_swin():
    """12x12 tokens, window 8: stage 1 pads to 16x16 (its shifted block masks the padding too); stage 2 (6x6)
    clamps the window to the whole map."""
    model = tiny_swin(img_size=24, window_size=8, embed_dim=16, num_heads=(2, 2))
    with torch.no_grad():  # off-centre LayerNorm outputs: their grids' zero point is not code 0, so padding
        for block in model.layers[0].blocks:  # with the wrong code would show
            block.norm1.bias.add_(torch.linspace(0.5, 1.5, block.norm1.bias.numel()))
    return model


# The smallest shapes for the interpreted Triton path (the interpreter runs kernels in numpy).
SMALL_MODELS = {"vit_depth1": lambda: TINY_MODELS["vit"](depth=1), "swin_small": small_swin,
                "swin_padded": padded_swin}


def logits(module, x):
    with torch.no_grad():
        return module(x).float()


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).float().mean())


CASES = [(name, bits) for name in sorted(TINY_MODELS) for bits in ((8, 8), (4, 8))] + [("vit", (3, 16)),
                                                                                       ("swin", (3, 16))]


@pytest.mark.parametrize("name,bits", CASES, ids=[f"{n}-W{w}A{a}" for n, (w, a) in CASES])
def test_torch_engine_matches_fake_quant(name, bits):
    _, qmodel = calibrated(name, bits)
    engine = build_engine(qmodel, backend="torch")
    x = images()
    fake, real = logits(qmodel, x), logits(engine, x)
    assert cosine(fake, real) >= 0.999
    assert agreement(fake, real) >= 0.99


def test_engine_pads_swin_windows_as_timm():
    """Token maps that are no multiple of the window: the engine pads the int8 codes with the zero point (timm
    pads the normalized activations with 0) and crops after merging the windows. The floor is tight: here
    engine and fake model differ by float summation order only (measured 1 - cosine ~1e-14, max |diff| 1.5e-8);
    padding with code 0 instead of the zero point gave cosine 0.99995."""
    from dfqvit.engine.backends import native_is_default

    model, qmodel = calibrated("swin_padded", (4, 8))
    assert model.layers[0].blocks[0].window_size == (8, 8) and model.patch_embed.grid_size == (12, 12)
    x = images(size=24)
    fake = logits(qmodel, x)
    for backend in ("torch", "native") if native_is_default() else ("torch",):
        engine = build_engine(qmodel, backend=backend)
        assert all(block.attn.qkv.act.zero != 0 for block in engine.trunk.stages[0].blocks)
        real = logits(engine, x)
        assert cosine(fake, real) >= 0.999999 and agreement(fake, real) == 1.0, backend


def test_torch_compile_runs_the_engine_as_it_is():
    """torch.compile(engine) traced the Python between the kernels and specialised on each layer's scalars (CIFAR
    ViT, CPU: 16 s of compiling, then slower than eager); dynamo now leaves the engine's forward alone."""
    import warnings

    import torch._dynamo
    from torch._dynamo.utils import counters

    _, qmodel = calibrated("vit", (8, 8))
    engine = build_engine(qmodel)
    x = images()
    torch._dynamo.reset()
    counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(torch.compile(engine)(x), logits(engine, x))
    assert counters["stats"]["unique_graphs"] == 0


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_torch_engine_w4a4_close_to_fake_quant(name):
    _, qmodel = calibrated(name, (4, 4))
    fake, real = logits(qmodel, images()), logits(build_engine(qmodel, backend="torch"), images())
    # A4: a boundary flip moves an activation by 1/16 of its range (see the module docstring).
    assert cosine(fake, real) >= 0.97


def test_torch_engine_w4a4_matches_fake_quant_on_the_trained_cifar_model():
    """On a trained model the A4 boundary flips are rare: the issue's floors (cosine 0.999, agreement 99%)
    hold at W4A4 too (measured on 1,000 images: cosine 0.99984, agreement 99.8%)."""
    from conftest import load_cifar_images, load_cifar_model

    model, norm = load_cifar_model()
    calib, _, x = load_cifar_images(norm)
    qmodel = dfqvit.compile(model, bits=4, calib=calib, normalization=norm, recon=None, progress=False,
                            backend="fake")
    fake, real = logits(qmodel, x), logits(build_engine(qmodel, backend="torch"), x)
    print(f"W4A4 CIFAR ViT engine vs fake: cosine {cosine(fake, real):.5f}, agreement {agreement(fake, real):.3f}")
    assert cosine(fake, real) >= 0.999
    assert agreement(fake, real) >= 0.99


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_w8a8_engine_close_to_fp32(name):
    model, qmodel = calibrated(name, (8, 8))
    assert cosine(logits(model, images()), logits(build_engine(qmodel, backend="torch"), images())) >= 0.99


@pytest.mark.parametrize("name,bits", [("vit_depth1", (4, 8)), ("swin_small", (4, 8)), ("vit_depth1", (3, 16))])
def test_triton_engine_matches_fake_quant(name, bits):
    """The Triton kernels (interpreted on CPU in CI) inside the whole model."""
    model, qmodel = calibrated(name, bits)
    engine = build_engine(qmodel, backend="triton")
    assert engine.backend == "triton" and "backend=triton" in repr(engine)
    x = images(2, model.patch_embed.img_size[0])
    fake, real = logits(qmodel, x), logits(engine, x)
    assert cosine(fake, real) >= 0.999
    assert agreement(fake, real) >= 0.99


def test_triton_engine_takes_zero_points_outside_int8():
    """A max-pooled head input is all positive, so its grid's zero point lies below int8 (-185 here, after the
    -128 shift); the Triton GEMM refused it on every call, though the native and torch backends ran it."""
    from dfqvit.engine.pack import act_grid

    model = tiny_swin(global_pool="max", img_size=16, embed_dim=16, num_heads=(2, 2))
    torch.manual_seed(1)
    qmodel = dfqvit.compile(model, bits=8, calib=torch.randn(8, 3, 16, 16), recon=None, progress=False,
                            backend="fake")
    assert act_grid(qmodel.model.head.fc.input_quantizer, "head.fc").zero < -128
    x = images(2, 16)
    fake, real = logits(qmodel, x), logits(build_engine(qmodel, backend="triton"), x)
    assert cosine(fake, real) >= 0.9999


@pytest.mark.parametrize("name,bits", [("vit_depth1", (4, 8)), ("swin_small", (3, 8)), ("vit_depth1", (3, 16))])
def test_triton_engine_gives_the_same_logits_on_both_gemm_paths(name, bits):
    """Unpack-first (batch 8 and up on a GPU) and the in-loop unpack, forced here at a tiny batch: identical
    integer accumulators, so identical logits for A8; for A16 only the fp32 summation order differs."""
    from dfqvit.kernels.qgemm import gemm_path

    model, qmodel = calibrated(name, bits)
    x = images(2, model.patch_embed.img_size[0])
    runs = []
    for unpack_first in (False, True):
        with gemm_path(unpack_first):
            runs.append(logits(build_engine(qmodel, backend="triton"), x))
    if bits[1] == 8:
        assert torch.equal(runs[0], runs[1])
    else:
        assert cosine(runs[0], runs[1]) >= 0.99999


@pytest.mark.parametrize("name", ["vit_depth1", "swin_small"])
def test_triton_engine_with_fast_softmax_matches_fake_quant(name):
    """softmax_math="fast" (the CUDA default; the interpreter's is "exact") inside the whole model: log-domain
    codes, within one level of the reference's on a few entries at most, keep the issue's floors."""
    from dfqvit.kernels.attention import softmax_math_override

    model, qmodel = calibrated(name, (4, 8))
    x = images(2, model.patch_embed.img_size[0])
    engine = build_engine(qmodel, backend="triton")
    assert "softmax_math=exact" in repr(engine)  # the interpreter's default
    with softmax_math_override("fast"):
        assert "softmax_math=fast" in repr(engine)
        real = logits(engine, x)
    fake = logits(qmodel, x)
    assert cosine(fake, real) >= 0.999
    assert agreement(fake, real) >= 0.99


GPU_CASES = [("vit", (4, 8)), ("swin", (4, 8)), ("deit_distilled", (4, 8)), ("vit", (8, 8)), ("vit", (3, 16)),
             ("vit", (4, 4)), ("swin", (4, 4))]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name,bits", GPU_CASES, ids=[f"{n}-W{w}A{a}" for n, (w, a) in GPU_CASES])
def test_triton_engine_on_cuda_matches_fake_quant(name, bits):
    """GPU only: the compiled Triton kernels under CUDA graphs (auto backend) vs the fake-quant model of the
    same calibration, on the GPU; floors as for the CPU engine (A4: see the module docstring)."""
    import copy

    model, qmodel = calibrated(name, bits)
    qcuda = copy.deepcopy(qmodel).to("cuda")
    engine = build_engine(qcuda)
    assert engine.backend == "triton" and engine.graphs is not None
    x = images(IMAGES, model.patch_embed.img_size[0]).cuda()
    fake, real = logits(qcuda, x).cpu(), logits(engine, x).cpu()
    assert torch.isfinite(real).all()
    assert cosine(fake, real) >= (0.97 if bits[1] == 4 else 0.999)
    if bits[1] != 4:
        assert agreement(fake, real) >= 0.99
    assert torch.equal(logits(engine, x[:3]).cpu(), real[:3])  # a padded bucket replays the same rows


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_engine_on_cuda_matches_fake_quant_on_the_trained_cifar_model():
    """GPU only: W4A8 and W4A4 on the trained CIFAR ViT (the issue's floors: cosine 0.999, agreement 99%)."""
    from conftest import load_cifar_images, load_cifar_model

    model, norm = load_cifar_model()
    calib, _, x = load_cifar_images(norm)
    for bits in ((4, 8), 4):
        qmodel = dfqvit.compile(model, bits=bits, calib=calib, normalization=norm, recon=None, device="cuda",
                                progress=False, backend="fake")
        fake, real = logits(qmodel, x.cuda()).cpu(), logits(build_engine(qmodel), x.cuda()).cpu()
        print(f"{bits} CIFAR ViT CUDA engine vs fake: cosine {cosine(fake, real):.5f}, "
              f"agreement {agreement(fake, real):.3f}")
        assert cosine(fake, real) >= 0.999
        assert agreement(fake, real) >= 0.99


def test_auto_backend_on_cpu_is_native_or_torch_and_fake_returns_the_fake_model():
    from dfqvit.kernels import native
    _, qmodel = calibrated("vit", (8, 8))
    engine = build_engine(qmodel)
    expected = "native" if native.available() and native.isa() != "scalar" else "torch"
    assert isinstance(engine, QuantizedViT) and engine.backend == expected
    assert f"backend={expected}" in repr(engine) and "W8A8" in repr(engine)
    if native.available():  # the native scalar rung is slower than PyTorch: auto takes PyTorch there
        previous = native.set_isa("scalar")
        try:
            assert build_engine(qmodel).backend == "torch"
            native_engine = build_engine(qmodel, backend="native")
            assert native_engine.backend == "native"
        finally:
            native.set_isa(previous)
        from dfqvit.engine.pack import PackedLinear
        layer = next(m for m in native_engine.modules() if isinstance(m, PackedLinear))
        # The GPU layout is gone once panels are made: hasattr used to raise (a TypeError) instead of saying no
        assert not hasattr(layer, "weight") and getattr(layer, "weight", None) is None
        with pytest.raises(DFQViTError, match="CPU panels for the native backend"):
            layer.weight
    assert build_engine(qmodel, backend="fake") is qmodel
    from dfqvit.errors import CalibrationError
    from dfqvit.models import adapt
    with pytest.raises(CalibrationError, match="uncalibrated model .*run dfqvit.compile"):
        build_engine(adapt(TINY_MODELS["vit"](), qmodel.config), backend="torch")  # gave all-zero logits
    with pytest.raises(DFQViTError, match="backend"):
        build_engine(qmodel, backend="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(DFQViTError, match="cuda_graphs=True needs the model on a CUDA device"):
            build_engine(qmodel, cuda_graphs=True)  # was accepted; then every call failed
        with pytest.raises(DFQViTError, match="no CUDA device is available; use device='cpu'"):
            build_engine(qmodel, device="cuda")  # was torch's RuntimeError from deep inside .to()


def test_packed_int4_weight_bytes():
    """K/2 bytes of codes per output row (K padded to the 64-wide packing group) plus 12 bytes of scale, zero
    point and column sum: ~0.26x of fp16 at ViT-B's K = 768..3072; float layers count at their size."""
    _, qmodel = calibrated("vit", (4, 8))
    engine = build_engine(qmodel, backend="torch")
    packed = [m for m in engine.modules() if isinstance(m, PackedLinear)]
    assert packed and all(m.weight_nbytes() == m.n * (-(-m.k // 64) * 32 + 12) for m in packed)
    float_proj = engine.trunk.patch_embed.float_proj.weight
    assert engine.weight_nbytes() == sum(m.weight_nbytes() for m in packed) + float_proj.numel() * 4


def test_engine_rejects_bad_inputs():
    _, qmodel = calibrated("vit", (8, 8))
    engine = build_engine(qmodel, backend="torch")
    with pytest.raises(InputShapeError):
        engine(torch.randn(2, 3, 48, 48))
    with pytest.raises(InputShapeError):
        engine(torch.randn(3, 32, 32))
    with pytest.raises(InputShapeError, match="device"):
        engine(torch.randn(2, 3, 32, 32, device="meta"))


def test_engine_refuses_moves_and_casts_that_would_change_it():
    """The kernels and layouts are chosen for one device at build time, and a cast of the scales would change
    the results: .half() / .to(other device) say how to build an engine there; no-op moves pass."""
    _, qmodel = calibrated("vit", (8, 8))
    engine = build_engine(qmodel, backend="torch")
    x = images(2)
    before = logits(engine, x)
    assert engine.cpu() is engine and engine.to("cpu", torch.float32) is engine and engine.float() is engine
    for move in (lambda e: e.half(), lambda e: e.to(torch.float64), lambda e: e.to("meta")):
        # Built from the fake-quant model, the engine keeps no artifact to build from: the message says so.
        with pytest.raises(DFQViTError, match="build_engine\\(the fake-quant model or its artifact, device="):
            move(engine)
    from dfqvit.api import as_backend

    with_artifact = as_backend(qmodel, "torch")
    with pytest.raises(DFQViTError, match="build_engine\\(engine.artifact, device="):
        with_artifact.half()
    if not torch.cuda.is_available():  # torch's "Found no NVIDIA driver" RuntimeError came through raw
        with pytest.raises(DFQViTError, match="cannot be moved .*build_engine\\(engine.artifact, device="):
            with_artifact.cuda()
    assert all(b.device.type == "cpu" for b in engine.buffers())
    assert engine.trunk.blocks[0].mlp.fc1.w_scale.dtype == torch.float32
    assert torch.equal(logits(engine, x), before), "a refused move leaves the engine as it was"


def test_full_correction_and_layer_scale_are_applied():
    """Branch ends that cannot be fused into the GEMM (a ``full`` activation correction, LayerScale)."""
    model = TINY_MODELS["vit"](init_values=0.5)
    torch.manual_seed(1)
    qmodel = dfqvit.compile(model, bits=(8, 8), calib=torch.randn(8, 3, 32, 32), recon=None,
                            correction=dfqvit.CorrectionConfig(form="full"), progress=False, backend="fake")
    engine = build_engine(qmodel, backend="torch")
    assert engine.trunk.blocks[0].attn_end.matrix is not None and engine.trunk.blocks[0].attn_end.gamma is not None
    assert cosine(logits(qmodel, images()), logits(engine, images())) >= 0.999


# timm ViT options the engine's trunk handles (prefix tokens, position-embedding order, pooling, norms).
VIT_VARIANTS = {
    "register_tokens": dict(reg_tokens=4),
    "no_embed_class": dict(no_embed_class=True),  # DeiT-III: position embedding for patches only
    "registers_no_embed_class": dict(reg_tokens=2, no_embed_class=True),
    "no_qkv_bias": dict(qkv_bias=False),
    "pre_norm": dict(pre_norm=True),
    "avg_pool_fc_norm": dict(global_pool="avg", fc_norm=True),
    "mlp_ratio_3_patch_4": dict(mlp_ratio=3.0, img_size=36, patch_size=4),
    # LayerNorms without affine / bias: the engine built, then every call failed (the kernels take both)
    "norm_without_affine": dict(norm_layer=partial(torch.nn.LayerNorm, elementwise_affine=False)),
    "norm_without_bias": dict(norm_layer=partial(torch.nn.LayerNorm, bias=False)),
    "timm_gelu": dict(act_layer="gelu"),  # timm's GELU class is F.gelu: it was refused as another activation
}


# timm Swin options: image and window shapes, partitioning, head size, pooling, a third stage.
SWIN_VARIANTS = {
    "non_square_image": dict(img_size=(32, 48)),
    "rectangular_window": dict(window_size=(4, 8)),
    "always_partition": dict(always_partition=True, img_size=24),
    "head_dim_8_no_qkv_bias": dict(head_dim=8, qkv_bias=False),
    "max_pool": dict(global_pool="max"),
    "three_stages": dict(depths=(2, 2, 2), num_heads=(2, 2, 4), img_size=64, patch_size=4),
}


# timm's distilled model ignores register tokens; the engine added them (every call failed on the shapes).
DEIT_VARIANTS = {"distilled_register_tokens": dict(reg_tokens=2)}


def _variant(name: str) -> torch.nn.Module:
    if name in DEIT_VARIANTS:
        return tiny_deit_distilled(**DEIT_VARIANTS[name])
    if name in VIT_VARIANTS:
        return TINY_MODELS["vit"](**VIT_VARIANTS[name])
    return tiny_swin(**SWIN_VARIANTS[name])


@pytest.mark.parametrize("variant", sorted(VIT_VARIANTS) + sorted(SWIN_VARIANTS) + sorted(DEIT_VARIANTS))
def test_timm_variants_run_on_the_engine(variant):
    from dfqvit.engine.backends import native_is_default

    model = _variant(variant)
    size = model.patch_embed.img_size
    torch.manual_seed(1)
    qmodel = dfqvit.compile(model, bits=8, calib=torch.randn(8, 3, *size), recon=None, progress=False,
                            backend="fake")
    x = torch.randn(IMAGES, 3, *size, generator=torch.Generator().manual_seed(7))
    fake, real = logits(qmodel, x), logits(build_engine(qmodel, backend="torch"), x)
    assert cosine(fake, real) >= 0.999 and cosine(logits(model, x), real) >= 0.99
    if native_is_default():
        assert torch.equal(logits(build_engine(qmodel, backend="native"), x), real)


# Images that are not a whole number of patches: the conv drops the last rows and columns (the engine's GEMM
# reshaped the whole image and failed on every call).
UNEVEN_IMAGES = {"vit": dict(img_size=36), "swin": dict(img_size=35)}  # patch 8 and 2


@pytest.mark.parametrize("name,uneven", [("vit", False), ("swin", False), ("vit", True), ("swin", True)])
def test_quantized_patch_embedding_runs_as_a_gemm(name, uneven):
    """QuantConfig(quantize_patch_embed=True): the stride = kernel conv runs as one integer GEMM over flattened
    patches (it used to fail at the engine build: the quantized conv had no kernel_size, only after the whole
    calibration, under every backend). Measured: cosine vs fake-quant 1 - 1e-7 (ViT) and 0.999999 (Swin) at W4A8."""
    from dfqvit.engine.backends import native_is_default

    model = (tiny_vit if name == "vit" else tiny_swin)(**(UNEVEN_IMAGES[name] if uneven else {}))
    size = model.patch_embed.img_size
    torch.manual_seed(1)
    config = dfqvit.QuantConfig(w_bits=4, a_bits=8, quantize_patch_embed=True)
    assert dfqvit.preflight_backend(model, "torch", config, "cpu") == "torch"
    qmodel = dfqvit.compile(model, bits=None, config=config, calib=torch.randn(8, 3, *size), recon=None,
                            correction=None, progress=False, backend="fake")
    engine = build_engine(qmodel, backend="torch")
    assert engine.trunk.patch_embed.gemm is not None and engine.trunk.patch_embed.gemm.act is not None
    x = images(size=size[0])
    fake, real = logits(qmodel, x), logits(engine, x)
    assert cosine(fake, real) >= 0.9999 and agreement(fake, real) == 1.0
    if native_is_default():
        assert torch.equal(logits(build_engine(qmodel, backend="native"), x), real)


@pytest.mark.parametrize("image_bits", [8, 4])
def test_the_image_of_a_quantized_patch_embedding_is_quantized_at_image_bits(image_bits):
    """METHODS §1.5 (RepQ): the image in front of a quantized patch embedding is quantized at 8 bits whatever the
    activation bits (it was quantized at a_bits: 16 levels for the raw image at W4A4). The engine runs the 8-bit
    image grid as it runs the fake-quant model: cosine >= 0.97 at W4A4 (the floor of every W4A4 engine test)."""
    model = tiny_vit()
    config = dfqvit.QuantConfig(w_bits=4, a_bits=4, quantize_patch_embed=True, image_bits=image_bits)
    qmodel = dfqvit.compile(model, bits=None, config=config, calib=images(8), recon=None, correction=None,
                            progress=False, backend="fake")
    image_quantizer = qmodel.model.patch_embed.proj.input_quantizer
    assert image_quantizer.num_bits == image_bits
    assert qmodel.model.blocks[0].attn.qkv.input_quantizer.num_bits == 4
    engine = build_engine(qmodel, backend="torch")
    assert engine.trunk.patch_embed.gemm.act.qmax - engine.trunk.patch_embed.gemm.act.qmin == 2 ** image_bits - 1
    x = images(16)
    assert cosine(logits(qmodel, x), logits(engine, x)) >= 0.97


def test_engine_from_saved_artifact(tmp_path):
    _, qmodel = calibrated("swin", (4, 8))
    path = tmp_path / "swin_w4a8.safetensors"
    dfqvit.save(qmodel, str(path))
    from_file = build_engine(str(path), backend="torch", model=TINY_MODELS["swin"]())
    x = images(4)
    torch.testing.assert_close(logits(from_file, x), logits(build_engine(qmodel, backend="torch"), x))


def test_build_engine_takes_an_engine():
    """dfqvit.compile returns the engine by default, which build_engine refused ("expects a QuantizedModel
    (dfqvit.compile)"): an engine with its artifact gives another backend of the same calibration."""
    _, qmodel = calibrated("vit", (4, 8))
    from dfqvit.artifact import QuantArtifact

    skeleton = TINY_MODELS["vit"]  # a model built in code records no constructor arguments: model= rebuilds it
    engine = build_engine(QuantArtifact.from_model(qmodel), backend="torch", model=skeleton())  # as compile's
    x = images(4)
    assert torch.equal(logits(build_engine(engine, backend="torch", model=skeleton()), x), logits(engine, x))
    assert isinstance(build_engine(engine, backend="fake", model=skeleton()), dfqvit.QuantizedModel)
    with pytest.raises(DFQViTError, match="keeps no artifact: give build_engine that QuantizedModel"):
        build_engine(build_engine(qmodel, backend="torch"), backend="torch")
    with pytest.raises(DFQViTError, match="device='gpu': give 'cpu' or 'cuda'"):  # was torch's raw RuntimeError
        build_engine(engine, backend="torch", model=skeleton(), device="gpu")


def test_engine_ignores_autocast_and_refuses_a_float64_stream():
    """Autocast would cast the float layers behind the engine's back (a W4A4 ViT under CPU bfloat16 autocast gave
    cosine 0.96 against itself): the engine turns it off. A float64 residual stream is refused when the engine is
    built, not at its first call (the native attention has no float64 output)."""
    _, qmodel = calibrated("vit", (4, 8))
    engine = build_engine(qmodel, backend="torch")
    assert not engine.training
    assert "W4A8" in repr(engine.trunk.blocks[0].attn.qkv)
    x = images(4)
    plain = logits(engine, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(logits(engine, x), plain)
    with pytest.raises(DFQViTError, match="dtype=torch.float64"):
        build_engine(qmodel, backend="torch", dtype=torch.float64)


def test_engine_repr_names_the_activation_bits():
    _, qmodel = calibrated("vit", (8, 8))
    engine = build_engine(qmodel, backend="torch")
    assert "W8A8" in repr(engine.trunk.blocks[0].mlp.fc1)
    model = TINY_MODELS["vit"]()
    torch.manual_seed(1)
    w4a4 = dfqvit.compile(model, bits=4, calib=torch.randn(4, 3, 32, 32), recon=None, correction=None,
                          progress=False, backend="torch")
    assert "W4A4" in repr(w4a4.trunk.blocks[0].mlp.fc1)  # stored as int8 codes, but 16 levels


def test_state_dict_of_another_calibration_is_refused():
    """The activation grids are Python values, not buffers: loading the state dict of an engine calibrated on other
    images carried its buffers over and kept this engine's grids (logits of neither, cosine 0.989) with "All keys
    matched". The state dict now carries the grids; the same calibration loads exactly, another is refused."""
    model = TINY_MODELS["vit"]()

    def engine(seed):
        torch.manual_seed(seed)
        qmodel = dfqvit.compile(model, bits=(4, 8), calib=torch.randn(4, 3, 32, 32), recon=None, correction=None,
                                progress=False, backend="fake")
        return build_engine(qmodel, backend="torch")

    a, b, a_again = engine(1), engine(2), engine(1)
    x = images(4)
    a_again.load_state_dict(a.state_dict())
    assert torch.equal(logits(a_again, x), logits(a, x))
    before = logits(b, x)
    with pytest.raises(DFQViTError, match="other grids"):
        b.load_state_dict(a.state_dict())
    assert torch.equal(logits(b, x), before), "refused before any buffer was copied"
    without_grids = {k: v for k, v in a.state_dict().items() if k != "_extra_state"}
    for strict in (True, False):  # strict=False skipped the grid check and mixed the two calibrations
        with pytest.raises(DFQViTError, match="lacks the engine's grids"):
            b.load_state_dict(without_grids, strict=strict)
    assert torch.equal(logits(b, x), before)


def test_engine_owns_its_tensors():
    """The position embedding and weight scales were the fake-quant model's own tensors: loading another
    calibration into the fake model changed the engine built from it (cosine 0.992, a mix of both)."""
    model = TINY_MODELS["vit"]()

    def fake(seed):
        torch.manual_seed(seed)
        return dfqvit.compile(model, bits=(4, 8), calib=torch.randn(4, 3, 32, 32), recon=None, correction=None,
                              progress=False, backend="fake")

    qmodel, x = fake(1), images(4)
    with torch.no_grad():
        qmodel.model.pos_embed.add_(0)  # the fake model keeps its own tensors (no copy needed to test aliasing)
    engine = build_engine(qmodel, backend="torch")
    before = logits(engine, x)
    qmodel.load_state_dict(fake(2).state_dict())
    assert torch.equal(logits(engine, x), before)


def test_engine_artifact_must_be_its_own_and_fake_takes_no_engine_options():
    """Another model's artifact was taken (dfqvit.save then wrote that model); a string failed on .compact();
    build_engine(backend="fake", dtype=...) ignored dtype and cuda_graphs."""
    _, qmodel = calibrated("vit", (4, 8))
    _, other = calibrated("vit", (8, 8))
    engine = dfqvit.compile(TINY_MODELS["vit"](depth=1), bits=(4, 8), calib=images(4), recon=None, correction=None,
                            progress=False, backend="torch")
    from dfqvit.artifact import QuantArtifact
    with pytest.raises(DFQViTError, match="other layers, bits or weight scales"):
        engine.artifact = QuantArtifact.from_model(other)
    torch.manual_seed(7)  # the same architecture, another calibration: other weight scales
    again = dfqvit.compile(TINY_MODELS["vit"](depth=1), bits=(4, 8), calib=images(4) * 3, recon=None,
                           correction=None, progress=False, backend="fake")
    with pytest.raises(DFQViTError, match="another model or calibration"):
        engine.artifact = QuantArtifact.from_model(again)
    engine.artifact = engine.artifact  # its own is taken
    with pytest.raises(DFQViTError, match="takes a QuantArtifact or None, got str"):
        engine.artifact = "model.safetensors"
    with pytest.raises(DFQViTError, match="dtype: no effect with backend='fake'"):
        build_engine(qmodel, backend="fake", dtype=torch.float16)
    with pytest.raises(InputShapeError, match="meta device"):  # was "Tensor.item() cannot be called on meta tensors"
        qmodel(torch.empty(1, 3, 32, 32, device="meta"))


def test_engine_built_under_inference_mode_loads_state_dicts():
    """Its buffers were inference tensors: load_state_dict raised "Inplace update to inference tensor"."""
    _, qmodel = calibrated("vit", (4, 8))
    with torch.inference_mode():
        engine = build_engine(qmodel, backend="torch")
    x = images(4)
    before = logits(engine, x)
    engine.load_state_dict(engine.state_dict())
    assert torch.equal(logits(engine, x), before)


def test_without_input_checks_a_nan_image_gives_nan_logits_on_the_fake_model():
    """README (check_inputs=False): the fake-quant model returns NaN for a NaN image, the engine finite logits; a NaN
    -> qmin change in the shared rounding once made the fake model's logits finite too."""
    model = TINY_MODELS["vit"]()
    torch.manual_seed(1)
    qmodel = dfqvit.compile(model, config=dfqvit.QuantConfig(8, 8, check_inputs=False), calib=images(4), recon=None,
                            correction=None, progress=False, backend="fake")
    x = images(2)
    x[0, 0, 0, 0] = float("nan")
    fake, real = logits(qmodel, x), logits(build_engine(qmodel, backend="torch"), x)
    assert fake[0].isnan().all() and not fake[1].isnan().any()
    assert torch.isfinite(real).all()


def test_weights_the_engine_cannot_pack_exactly_fall_back_under_auto():
    """A constant weight row puts its 4-bit zero point far outside the codes (-3e7): the default compile raised a
    raw KernelInputError after the whole calibration; now "auto" warns and returns the fake-quant model, and a
    named backend raises UnsupportedModelError naming the layer."""
    from dfqvit.errors import UnsupportedModelError

    model = TINY_MODELS["vit"](depth=1)
    with torch.no_grad():
        model.blocks[0].attn.proj.weight[2] = 0.3
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="blocks.0.attn.proj: the engine cannot pack these weights exactly"):
        qmodel = dfqvit.compile(model, bits=(4, 8), calib=images(4), recon=None, correction=None, progress=False)
    assert isinstance(qmodel, dfqvit.QuantizedModel)
    with pytest.raises(UnsupportedModelError, match="blocks.0.attn.proj"):
        build_engine(qmodel, backend="torch")


def test_attention_zero_points_outside_int8_are_refused_when_built():
    """All-positive q activations put q's zero point outside int8 (-145 here): the native attention then failed on
    every forward with a KernelInputError. The torch backend runs it; native and Triton refuse it when built."""
    from dfqvit.errors import UnsupportedModelError

    model = TINY_MODELS["vit"](depth=1)
    x = images(8)
    block = model.blocks[0]
    with torch.no_grad():
        tokens = block.norm1(model.norm_pre(model._pos_embed(model.patch_embed(x))))
        q = torch.nn.functional.linear(tokens, block.attn.qkv.weight, block.attn.qkv.bias)[..., :48]
        block.attn.qkv.bias[:48] += 0.05 - q.amin(dim=(0, 1))
    torch.manual_seed(1)
    qmodel = dfqvit.compile(model, bits=8, calib=x, recon=None, correction=None, progress=False, backend="fake")
    fake, real = logits(qmodel, x[:2]), logits(build_engine(qmodel, backend="torch"), x[:2])
    assert cosine(fake, real) >= 0.9999
    for backend in ("native", "triton"):
        with pytest.raises(UnsupportedModelError, match="q_zero=.*outside int8"):
            build_engine(qmodel, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "fake"])
def test_without_input_checks_a_wrong_image_size_is_still_refused(backend):
    """check_inputs=False skips the finiteness check (a device sync), not the shape checks: a Swin engine ran its
    windows over a 40 x 40 image built for 32 x 32 and returned logits (timm asserts on the fake model)."""
    model = tiny_swin()
    torch.manual_seed(1)
    qmodel = dfqvit.compile(model, config=dfqvit.QuantConfig(8, 8, check_inputs=False), calib=images(4), recon=None,
                            correction=None, progress=False, backend="fake")
    module = qmodel if backend == "fake" else build_engine(qmodel, backend=backend)
    assert torch.isfinite(logits(module, images(2))).all()
    assert logits(module, images(2)[:0]).shape == (0, 10)  # timm's Swin failed to reshape an empty batch
    for bad in (images(2, size=40), images(2)[:, :2], images(2).to(torch.uint8)):
        with pytest.raises(InputShapeError):
            logits(module, bad)


def test_loading_into_the_engines_trunk_is_refused():
    """engine.trunk (or one block) took another calibration's buffers under this engine's grids: the grids are
    checked only when the whole engine loads. Loading the whole engine, also inside a wrapper, still works."""
    _, qmodel = calibrated("vit", (4, 8))
    engine = build_engine(qmodel, backend="torch")
    x = images(4)
    before = logits(engine, x)
    for part in (engine.trunk, engine.trunk.blocks[0]):
        with pytest.raises(DFQViTError, match="belongs to a QuantizedViT"):
            part.load_state_dict(part.state_dict())
    wrapper = torch.nn.Sequential(engine)
    wrapper.load_state_dict(wrapper.state_dict())
    engine.load_state_dict(engine.state_dict())
    assert torch.equal(logits(engine, x), before)
    import copy
    clone = copy.deepcopy(engine)
    clone.load_state_dict(engine.state_dict())
    with pytest.raises(DFQViTError, match="belongs to a QuantizedViT"):
        clone.trunk.load_state_dict(engine.trunk.state_dict())
    # a load that raises half way (here a tensor of another dtype, assign=True) leaves the gate closed
    broken = engine.state_dict()
    broken["trunk.blocks.1.attn.qkv_grid"] = broken["trunk.blocks.1.attn.qkv_grid"].double()
    with pytest.raises(DFQViTError, match="holds torch.float64, the engine torch.float32"):
        engine.load_state_dict(broken, assign=True)
    with pytest.raises(DFQViTError, match="belongs to a QuantizedViT"):
        engine.trunk.load_state_dict(engine.trunk.state_dict())
    assert torch.equal(logits(engine, x), before)
