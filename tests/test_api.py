"""dfqvit.compile end to end on tiny timm models: fidelity floors vs fp32 and every boundary error."""
import json
from functools import partial

import pytest
import torch

import dfqvit
from conftest import TINY_MODELS, cosine, load_cifar_images, load_cifar_model, sqnr_db, tiny_swin
from dfqvit.errors import (
    CalibrationError,
    CheckpointNotFoundError,
    DFQViTError,
    InputShapeError,
    MissingBackendError,
    MissingGPUError,
    NonFiniteInputError,
    UnsupportedBitsError,
    UnsupportedModelError,
)

# Floors (fp32 logits vs the quantized model's on 16 held-out Gaussian inputs, Gaussian calibration). The
# quantized model is what dfqvit.compile returns by default: the integer engine (native C++ kernels where
# dfqvit._C is built, else the PyTorch reference ops); backend="fake" where a test inspects the fake-quant model.
W8A8_MIN_COSINE = 0.99
# These tests are about the quantized model, not the data-free pipeline (tested in test_calib_*/test_synth_*):
# Gaussian calibration without reconstruction keeps them to seconds.
FAST = dict(calib="gaussian", recon=None, progress=False)


def _outputs(model, qmodel, seed=1):
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x), qmodel(x)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_w8a8_close_to_fp32_and_w4a4_worse(name):
    model = TINY_MODELS[name]()
    ref, w8 = _outputs(model, dfqvit.compile(model, bits=8, **FAST))
    _, w4 = _outputs(model, dfqvit.compile(model, bits=4, **FAST))
    agreement = float((ref.argmax(1) == w8.argmax(1)).float().mean())
    print(f"{name}: W8A8 cosine {cosine(ref, w8):.4f} sqnr {sqnr_db(ref, w8):.1f} dB top-1 agreement "
          f"{agreement:.2f}; W4A4 sqnr {sqnr_db(ref, w4):.1f} dB")
    assert cosine(ref, w8) >= W8A8_MIN_COSINE
    assert sqnr_db(ref, w4) < sqnr_db(ref, w8) - 6, "W4A4 must be clearly worse than W8A8"


def test_weight_only_and_mixed_bits():
    model = TINY_MODELS["vit"]()
    assert list(dfqvit.compile(model, bits=(4, 16), backend="fake", **FAST).activation_quantizers()) == []
    ref, w4a16 = _outputs(model, dfqvit.compile(model, bits=(4, 16), **FAST))
    _, w4a8 = _outputs(model, dfqvit.compile(model, bits=(4, 8), **FAST))
    assert sqnr_db(ref, w4a16) > 10 and sqnr_db(ref, w4a8) > 10


def test_uniform_softmax_quantizer_option():
    model = TINY_MODELS["vit"]()
    config = dfqvit.QuantConfig(w_bits=8, a_bits=8, softmax_quantizer="uniform")
    qmodel = dfqvit.compile(model, None, config=config, **FAST)
    ref, out = _outputs(model, qmodel)
    assert cosine(ref, out) >= W8A8_MIN_COSINE


def test_calibration_sources_and_determinism():
    model = TINY_MODELS["swin"]()
    images = torch.randn(8, 3, 32, 32)
    from_tensor = dfqvit.compile(model, bits=8, calib=images, recon=None, progress=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(8)), batch_size=3)
    from_loader = dfqvit.compile(model, bits=8, calib=loader, config=dfqvit.QuantConfig(8, 8, calib_images=8),
                                 recon=None, progress=False)
    a, b = _outputs(model, from_tensor)[1], _outputs(model, from_loader)[1]
    assert torch.equal(a, b), "a tensor and a DataLoader of the same images calibrate identically"
    s1 = _outputs(model, dfqvit.compile(model, bits=4, seed=3, **FAST))[1]
    s2 = _outputs(model, dfqvit.compile(model, bits=4, seed=3, **FAST))[1]
    assert torch.equal(s1, s2)


def test_cifar_reference_model_fidelity():
    """Trained CIFAR-10 ViT, 32 real calibration images, 500 real test images, calibration + correction.

    Reconstruction is left out: on these 32 images it lowers W8A8 fidelity slightly (measured: cosine
    0.9976 -> 0.9963, agreement 96.4% -> 94.8%) and costs minutes; its own tests are in test_calib_*."""
    from dfqvit.evaluate import evaluate

    model, norm = load_cifar_model()
    calib, test, x = load_cifar_images(norm)
    results = {}
    for bits in (8, 4):
        qmodel = dfqvit.compile(model, bits=bits, calib=calib, normalization=norm, recon=None, progress=False)
        with torch.no_grad():
            results[bits] = (cosine(model(x), qmodel(x)), evaluate(qmodel, test, reference=model, progress=False))
    fp = evaluate(model, test, progress=False)
    for bits, (cos, res) in results.items():
        print(f"W{bits}A{bits}: cosine {cos:.4f}, top-1 {res.top1:.1f}% (fp32 {fp.top1:.1f}%), "
              f"agreement {res.agreement:.1f}%")
    assert results[8][0] >= W8A8_MIN_COSINE
    assert results[8][1].agreement >= 95.0
    assert results[8][1].top1 >= fp.top1 - 2.0
    assert results[4][1].agreement < results[8][1].agreement


# -- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 9, (4, 3), (4, 12), (4,), "4", 4.0, True])
def test_bad_bits(bits):
    with pytest.raises(UnsupportedBitsError, match="allowed|tuple|give"):
        dfqvit.compile(TINY_MODELS["vit"](), bits=bits, progress=False)


def test_bits_and_config_must_agree():
    with pytest.raises(DFQViTError, match="disagrees"):
        dfqvit.compile(TINY_MODELS["vit"](), bits=4, config=dfqvit.QuantConfig(8, 8), progress=False)


def test_a_config_alone_gives_the_bits():
    """compile(model, config=QuantConfig(8, 8)): the default bits take the config's (a default of bits=4 made
    every non-W4A4 config fail with "bits=4 disagrees with config")."""
    qmodel = dfqvit.compile(TINY_MODELS["vit"](), config=dfqvit.QuantConfig(8, 8), calib=torch.randn(4, 3, 32, 32),
                            recon=None, correction=None, progress=False, backend="fake")
    assert (qmodel.config.w_bits, qmodel.config.a_bits) == (8, 8)


def test_fake_quant_model_reads_half_and_double_images_like_the_engine():
    qmodel = dfqvit.compile(TINY_MODELS["vit"](), bits=8, calib=torch.randn(4, 3, 32, 32), recon=None,
                            correction=None, progress=False, backend="fake")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for dtype in (torch.float16, torch.bfloat16, torch.float64):  # used to fail: "Input type (double) and bias"
            assert torch.equal(qmodel(x.to(dtype)), qmodel(x.to(dtype).float()))
    # Casting the model itself rounded its grids and weights: it could not run ("Input type (float) and bias
    # type (c10::Half)"), saved an artifact that did not load, and build_engine made another model from it.
    for cast in (lambda m: m.half(), lambda m: m.to(torch.float64), lambda m: m.to("cpu", torch.bfloat16)):
        with pytest.raises(DFQViTError, match="stays float32 .*build_engine\\(qmodel, dtype="):
            cast(qmodel)
    assert qmodel.cpu() is qmodel and all(p.dtype == torch.float32 for p in qmodel.parameters())
    if not torch.cuda.is_available():
        with pytest.raises(DFQViTError, match="cannot move the model"):
            qmodel.cuda()


def test_unsupported_model():
    with pytest.raises(UnsupportedModelError):
        dfqvit.compile(torch.nn.Linear(3, 3), bits=4, progress=False)


def test_wrong_input_shape_and_non_finite_input():
    qmodel = dfqvit.compile(TINY_MODELS["vit"](), bits=8, **FAST)
    with pytest.raises(InputShapeError, match=r"\(16, 16\)"):
        qmodel(torch.randn(1, 3, 16, 16))
    with pytest.raises(InputShapeError, match="expected"):
        qmodel(torch.randn(3, 32, 32))
    with pytest.raises(InputShapeError, match="dtype"):
        qmodel(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    x = torch.randn(2, 3, 32, 32)
    x[1, 0, 3, 3] = float("nan")
    with pytest.raises(NonFiniteInputError, match="1 NaN"):
        qmodel(x)
    x[1, 0, 3, 3], x[0, 2, 1, 1] = float("inf"), float("-inf")  # the sum is NaN
    with pytest.raises(NonFiniteInputError, match="2 NaN/Inf"):
        qmodel(x)
    x[0, 2, 1, 1] = 0.0  # only +inf: the sum is inf
    with pytest.raises(NonFiniteInputError, match="1 NaN/Inf"):
        qmodel(x)


def test_finite_input_whose_sum_overflows_is_accepted():
    from dfqvit.models.quantized import validate_images

    qmodel = dfqvit.compile(TINY_MODELS["vit"](), bits=8, **FAST)
    x = torch.full((2, 3, 32, 32), 3e38)  # finite, but the sum overflows to inf: the full check decides
    assert not torch.isfinite(x.sum())
    validate_images(x, qmodel.input_spec)


def test_inputs_in_other_layouts_give_the_same_logits_without_warnings():
    """channels_last, non-contiguous, float64 and requires_grad inputs: the engine's logits are those of the
    plain float32 batch, and the input check (a reduction) warns about nothing."""
    import warnings

    engine = dfqvit.compile(TINY_MODELS["vit"](), bits=8, **{**FAST, "backend": "auto"})
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = engine(x)
    variants = {"channels_last": x.to(memory_format=torch.channels_last), "float64": x.double(),
                "non-contiguous": x.transpose(2, 3).contiguous().transpose(2, 3),
                "requires_grad": x.clone().requires_grad_()}
    for name, images in variants.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(engine(images), expected), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_is_calibrated_in_fp32(dtype):
    """A model cast to fp16 / bf16 (as for GPU inference) quantizes like the fp32 model of the same weights;
    the model passed in is left as it was."""
    import copy

    low = TINY_MODELS["vit"]().to(dtype)
    same_weights = copy.deepcopy(low).float()
    kwargs = {**FAST, "calib": torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    engine, expected = (dfqvit.compile(m, bits=8, **kwargs) for m in (low, same_weights))
    assert torch.equal(_outputs(same_weights, engine)[1], _outputs(same_weights, expected)[1])
    assert all(p.dtype == dtype for p in low.parameters())


def test_bad_calibration_data():
    model = TINY_MODELS["vit"]()
    with pytest.raises(CalibrationError, match="unknown calibration method"):
        dfqvit.compile(model, bits=4, calib="imagenet", progress=False)
    with pytest.raises(NonFiniteInputError):
        dfqvit.compile(model, bits=4, calib=torch.full((4, 3, 32, 32), float("inf")), progress=False)
    with pytest.raises(InputShapeError):
        dfqvit.compile(model, bits=4, calib=torch.randn(4, 3, 64, 64), progress=False)
    with pytest.raises(CalibrationError):
        dfqvit.compile(model, bits=4, calib=12, progress=False)


def test_missing_checkpoint_and_gpu(tmp_path):
    from dfqvit.models.loading import load_model
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope.json"))
    with pytest.raises(CheckpointNotFoundError):
        load_model("vit_tiny_patch16_224", checkpoint=str(tmp_path / "missing.safetensors"))
    if not torch.cuda.is_available():
        with pytest.raises(MissingGPUError, match="cpu"):
            dfqvit.compile(TINY_MODELS["vit"](), bits=4, device="cuda", progress=False)


def test_backend_choice_returns_engine_or_fake_model(tmp_path):
    from dfqvit.engine import QuantizedViT
    from dfqvit.engine.backends import native_is_default

    model = TINY_MODELS["vit"]()
    engine = dfqvit.compile(model, bits=8, **FAST)  # the default: the integer engine for the device
    fake = dfqvit.compile(model, bits=8, backend="fake", **FAST)
    torch_engine = dfqvit.compile(model, bits=8, backend="torch", **FAST)
    assert isinstance(engine, QuantizedViT) and isinstance(fake, dfqvit.QuantizedModel)
    assert engine.backend == ("native" if native_is_default() else "torch") and torch_engine.backend == "torch"
    _, out_engine = _outputs(model, engine)
    _, out_fake = _outputs(model, fake)
    assert torch.equal(out_engine, _outputs(model, torch_engine)[1]), "the engine's backends agree bit for bit"
    assert cosine(out_fake, out_engine) >= 0.999, "integer engine and fake-quant model of one calibration agree"
    # The engine keeps its artifact: saving it writes what saving the fake-quant model writes, and loading
    # either file gives the same engine and the same fake-quant model back.
    for name, qmodel in (("engine", engine), ("fake", fake)):
        path = str(tmp_path / f"{name}.safetensors")
        dfqvit.save(qmodel, path)
        loaded = dfqvit.load(path, model=model)
        assert isinstance(loaded, QuantizedViT) and loaded.artifact is not None
        assert torch.equal(_outputs(model, loaded)[1], out_engine)
        assert torch.equal(_outputs(model, dfqvit.load(path, model=model, backend="fake"))[1], out_fake)
        dfqvit.save(loaded, str(tmp_path / f"{name}_again.safetensors"))  # a loaded engine saves again
        again = dfqvit.load(str(tmp_path / f"{name}_again.safetensors"), model=model)
        assert torch.equal(_outputs(model, again)[1], out_engine)
    assert torch.equal(_outputs(model, engine.artifact.to_model(model))[1], out_fake)


def _tanh_gelu_vit():
    return TINY_MODELS["vit"](act_layer=partial(torch.nn.GELU, approximate="tanh"))


def _vit_with_padded_patch_conv():
    model = TINY_MODELS["vit"]()
    model.patch_embed.proj.padding = (1, 1)  # overlapping patches: not one GEMM over flattened patches
    return model


def _res_post_block():
    from timm.models.vision_transformer import ResPostBlock
    return ResPostBlock


def _geglu():
    from functools import partial

    from timm.layers import GluMlp
    return partial(GluMlp, act_layer=torch.nn.GELU)


# Models the integer engine does not run: (builder, compile kwargs, what the error names).
ENGINE_UNSUPPORTED = {
    "tanh_gelu": (_tanh_gelu_vit, {}, "exact \\(erf\\) GELU.*approximate='tanh'.*at blocks.0.mlp, blocks.1.mlp"),
    "dynamic_img_size": (lambda: TINY_MODELS["vit"](dynamic_img_size=True), {}, "dynamic_img_size=True"),
    "swin_dynamic_mask": (lambda: tiny_swin(dynamic_img_size=True), {}, "dynamic_mask=True.*at layers.0.blocks.0, layers.0.blocks.1"),
    "padded_patch_conv": (_vit_with_padded_patch_conv,
                          dict(config=dfqvit.QuantConfig(w_bits=8, a_bits=8, quantize_patch_embed=True), bits=None),
                          "patch-embedding conv other than stride = kernel.*at patch_embed.proj"),
    # the engine was built, then every call failed with "'RmsNorm' object has no attribute 'bias'"
    "rms_norm": (lambda: TINY_MODELS["vit"](norm_layer="rmsnorm"), {},
                 r"norm other than LayerNorm before a quantized layer.*\(RmsNorm\) at blocks.0.norm1, blocks.0.norm2"),
    # the engine ran them as pre-norm blocks: cosine 0.32 to fp32, no error
    "post_norm_block": (lambda: TINY_MODELS["vit"](block_fn=_res_post_block()), {},
                        r"pre-norm Block / SwinTransformerBlock \(ResPostBlock\) at blocks.0, blocks.1"),
    # fc1's doubled output went into fc2: every call failed with a shape error
    "gated_mlp": (lambda: TINY_MODELS["vit"](mlp_layer=_geglu()), {}, r"timm's Mlp.*\(GluMlp.*at blocks.0.mlp"),
}


class CalibrationStarted(Exception):
    pass


@pytest.fixture
def no_calibration(monkeypatch):
    """dfqvit.compile stops where its calibration would start."""
    def refuse(*args, **kwargs):
        raise CalibrationStarted
    monkeypatch.setattr(dfqvit.api, "run_pipeline", refuse)


@pytest.mark.parametrize("name", sorted(ENGINE_UNSUPPORTED))
def test_named_backend_refuses_an_unsupported_model_before_calibrating(name, no_calibration):
    build, kwargs, what = ENGINE_UNSUPPORTED[name]
    kwargs = {"bits": 8, **kwargs}
    with pytest.raises(UnsupportedModelError, match=f"engine does not implement.*{what}.*backend='fake'"):
        dfqvit.compile(build(), backend="torch", **kwargs, **FAST)
    with pytest.warns(UserWarning, match=f"cannot run this model.*{what}"), pytest.raises(CalibrationStarted):
        dfqvit.compile(build(), **kwargs, **FAST)  # auto: says so at once, then calibrates for the fake model
    with pytest.raises(CalibrationStarted):  # the fake-quant model runs it: no check
        dfqvit.compile(build(), backend="fake", **kwargs, **FAST)


def test_missing_engine_backend_is_reported_before_calibrating(monkeypatch, no_calibration):
    from dfqvit.engine import backends
    from dfqvit.kernels import native

    model = TINY_MODELS["vit"]()
    monkeypatch.setattr(backends, "triton_runs_on", lambda device: False)
    with pytest.raises(MissingGPUError, match="backend='triton' on device cpu"):
        dfqvit.compile(model, bits=8, backend="triton", **FAST)
    monkeypatch.setattr(native, "available", lambda: False)
    with pytest.raises(MissingBackendError, match="native CPU backend is unavailable.*backend='torch'"):
        dfqvit.compile(model, bits=8, backend="native", **FAST)
    with pytest.raises(CalibrationStarted):  # auto takes what there is (here: the PyTorch backend)
        dfqvit.compile(model, bits=8, **FAST)


def test_auto_backend_falls_back_to_the_fake_model_with_a_warning():
    """A model the engine cannot run (here: tanh GELU; the engine fuses the exact one) still comes back from the
    calibration under "auto", with a warning that says why; built from the calibrated model, the engine gives
    the same answer as the check before the calibration."""
    model = _tanh_gelu_vit()
    with pytest.warns(UserWarning, match="engine cannot run this model.*exact \\(erf\\) GELU.*backend='fake'"):
        qmodel = dfqvit.compile(model, bits=8, **FAST)
    assert isinstance(qmodel, dfqvit.QuantizedModel)
    ref, out = _outputs(model, qmodel)
    assert cosine(ref, out) >= W8A8_MIN_COSINE
    with pytest.raises(UnsupportedModelError, match=ENGINE_UNSUPPORTED["tanh_gelu"][2]):
        dfqvit.api.as_backend(qmodel, "torch")
    with pytest.warns(UserWarning, match="exact \\(erf\\) GELU"):
        assert dfqvit.api.as_backend(qmodel) is qmodel


def test_saving_an_engine_without_its_artifact_says_what_to_save(tmp_path):
    from dfqvit.engine import QuantizedViT

    fake = dfqvit.compile(TINY_MODELS["vit"](), bits=8, backend="fake", **FAST)
    with pytest.raises(DFQViTError, match="save the QuantizedModel"):
        dfqvit.save(QuantizedViT(fake, "torch"), str(tmp_path / "a.safetensors"))
    with pytest.raises(DFQViTError, match="QuantizedViT engine or a QuantizedModel.*Linear"):
        dfqvit.save(torch.nn.Linear(3, 3), str(tmp_path / "b.safetensors"))
    # a safetensors file named model.pt was written; torch.load then failed on it without saying what it is
    for name in ("model.pt", "model.PTH", "model.json"):
        with pytest.raises(DFQViTError, match=f"not a .* file; name it .*model.safetensors"):
            dfqvit.save(fake, str(tmp_path / name))
        assert not (tmp_path / name).exists()
    dfqvit.save(fake, str(tmp_path / "model.dfq"))  # a name of no other format is taken as it is
    with pytest.raises(DFQViTError, match="name it .*model.safetensors'$"):  # was model.safetensors.safetensors
        dfqvit.save(fake, str(tmp_path / "model.safetensors.pt"))


def test_tracing_works_and_export_is_refused_with_a_clear_error(tmp_path):
    """torch.jit.trace records both models (the same logits at another batch size); torch.export, ONNX and
    TorchScript failed deep inside the exporter ("'dict' object has no attribute 'detach'", "Could not guard on
    data-dependent expression", "import statements aren't supported") and now say what works instead."""
    import warnings

    model = TINY_MODELS["vit"]()
    x, other = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)
    for backend in ("auto", "torch", "fake"):  # torch: an internal assert on Tensor.view(dtype) in the tracer
        qmodel = dfqvit.compile(model, bits=(4, 8), backend=backend, **FAST)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's own warnings about Python values in the graph
            traced = torch.jit.trace(qmodel, x)
            assert torch.equal(traced(other), qmodel(other)), backend
        exporters = [lambda: torch.export.export(qmodel, (x,)), lambda: torch.jit.script(qmodel)]
        exporters.append(lambda: torch.onnx.export(qmodel, (x,), str(tmp_path / "m.onnx"), dynamo=False))
        for export in exporters:
            with pytest.raises(DFQViTError, match="not supported.*torch.jit.trace.*dfqvit.save"), \
                    warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                export()


def test_bad_backend():
    with pytest.raises(DFQViTError, match="backend='cuda'.*allowed"):
        dfqvit.compile(TINY_MODELS["vit"](), bits=8, backend="cuda", **FAST)


def test_compile_inside_no_grad_inference_mode_or_autocast():
    """Inference scripts often wrap everything in no_grad / inference_mode / autocast; the synthesis and the
    reconstruction take gradients anyway (both used to fail with "element 0 of tensors does not require grad"), and the result
    is the one compile gives outside (calibration images made inside inference_mode included)."""
    from dfqvit.calib.recon import ReconConfig
    from dfqvit.config import SynthConfig

    model = TINY_MODELS["vit"]()
    settings = dict(bits=None, config=dfqvit.QuantConfig(w_bits=4, a_bits=4, calib_images=8),
                    synth=SynthConfig(iterations=2), recon=ReconConfig(iterations=2),
                    correction=None, progress=False, backend="fake")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    def images():
        return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(4))

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: calibrating in bf16 differed
        synthesized = dfqvit.compile(model, **settings)
    with torch.inference_mode():
        real = dfqvit.compile(model, **{**settings, "calib": images(), "synth": None})
    assert torch.is_grad_enabled()
    assert torch.equal(synthesized(x), dfqvit.compile(model, **settings)(x))
    assert torch.equal(real(x), dfqvit.compile(model, **{**settings, "calib": images(), "synth": None})(x))


def test_a_model_built_under_inference_mode_quantizes():
    """A model built (or adapted) inside torch.inference_mode() holds inference tensors: compile failed in the weight
    check ("abs(): functions with out=... arguments don't support automatic differentiation"), synthesis and
    reconstruction on its adapted copy with "Inference tensors cannot be saved for backward", and the stage functions
    called inside inference mode on a model adapted there with "Inplace update to inference tensor"."""
    from dfqvit.calib import calibrate_model, correct_activations, reconstruct
    from dfqvit.config import ReconConfig, SynthConfig
    from dfqvit.synth import synthesize

    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    settings = dict(bits=4, calib=x, recon=ReconConfig(iterations=2), correction=None, progress=False,
                    backend="fake")
    expected = dfqvit.compile(TINY_MODELS["vit"](depth=1), **settings)(x)
    with torch.inference_mode():
        model = TINY_MODELS["vit"](depth=1)
        inside = dfqvit.compile(model, **settings)(x)
        qmodel = dfqvit.adapt(TINY_MODELS["vit"](depth=1), dfqvit.QuantConfig(4, 4))
        assert not any(t.is_inference() for t in qmodel.state_dict().values())
        synthesize("spdfq", qmodel, num_images=2, config=SynthConfig(iterations=1), progress=False)
        calibrate_model(qmodel, x, progress=False)
        correct_activations(qmodel, x, progress=False)
        reconstruct(qmodel, x, ReconConfig(iterations=1), progress=False)
    assert torch.equal(dfqvit.compile(model, **settings)(x), expected) and torch.equal(inside, expected)

def test_preflight_checks_the_model_device_and_config_under_every_backend():
    """backend='fake' answered 'fake' for a model dfqvit cannot quantize, and a config of the wrong type raised
    AttributeError; compile refused both later."""
    for backend in ("fake", "auto", "torch"):
        with pytest.raises(UnsupportedModelError):
            dfqvit.preflight_backend(torch.nn.Linear(3, 3), backend)
        with pytest.raises(DFQViTError, match="config"):
            dfqvit.preflight_backend(TINY_MODELS["vit"](), backend, config=4)
    if not torch.cuda.is_available():
        with pytest.raises(MissingGPUError):
            dfqvit.preflight_backend(TINY_MODELS["vit"](), "fake", device="cuda")
    assert dfqvit.preflight_backend(TINY_MODELS["vit"](), "fake") == "fake"


def test_quant_config_takes_numpy_integers_and_refuses_bad_values_at_once():
    """numpy integers are plain ints in the config (the artifact's JSON failed on int64 after the whole run);
    counts given as floats or strings, and unknown names, are refused by the constructor instead of failing deep
    in the calibration (slice indices, ZeroDivisionError, ...)."""
    import numpy as np

    config = dfqvit.QuantConfig(w_bits=np.int64(4), a_bits=np.int32(8), calib_images=np.int64(4))
    assert (type(config.w_bits), type(config.a_bits), type(config.calib_images)) == (int, int, int)
    assert config.to_dict()["_data"]["w_bits"] == 4 and json.dumps(config.to_dict())
    assert dfqvit.QuantConfig(*dfqvit.parse_bits((np.int64(3), 16))).a_bits == 16
    for bad, message in [(dict(calib_images=2.5), "calib_images=2.5"), (dict(calib_images="4"), "calib_images"),
                         (dict(search_max_elements=0), "search_max_elements=0"),
                         (dict(w_bits=4.0), "weight bits 4.0"), (dict(w_bits="4"), "weight bits '4'"),
                         (dict(softmax_quantizer="LOG2"), "allowed: \\['log2'"),
                         (dict(weight_percentiles=0.99), "weight_percentiles=0.99")]:
        with pytest.raises(DFQViTError, match=message):
            dfqvit.QuantConfig(**bad)


def test_a_synth_dict_and_fewer_calibration_images_are_named():
    with pytest.raises(DFQViTError, match="synth must be a dfqvit.SynthConfig"):  # was a dataclasses TypeError
        dfqvit.compile(TINY_MODELS["vit"](), synth={"iterations": 2}, progress=False)
    assert dfqvit.SynthConfig is dfqvit.config.SynthConfig  # the name the message gives exists (it did not)
    with pytest.warns(UserWarning, match="calibrating on 4 images, fewer than calib_images=32"):
        dfqvit.compile(TINY_MODELS["vit"](), calib=torch.randn(4, 3, 32, 32), recon=None, correction=None,
                       progress=False, backend="fake")


def test_normalization_takes_one_number_or_one_per_channel_and_refuses_the_rest():
    """(0.5, 0.5) raised a TypeError from map(float, 0.5); std 0 and a wrong channel count were accepted."""
    from dfqvit.models.quantized import adapt

    model = TINY_MODELS["vit"]()
    for given in ((0.5, 0.25), ((0.5,), (0.25,)), ([0.5] * 3, torch.full((3,), 0.25))):
        spec = adapt(model, normalization=given).input_spec
        assert (spec.mean, spec.std) == ((0.5,) * 3, (0.25,) * 3)
    for bad, why in (((0.5,), "got"), ((0.5, 0.0), "must be finite and > 0"), (((0.1, 0.2), 0.5), "mean has 2"),
                     ((float("nan"), 1.0), "must be finite"), (("a", 1.0), "is not numbers")):
        with pytest.raises(DFQViTError, match=why):
            dfqvit.compile(model, normalization=bad, **FAST)


@pytest.mark.parametrize("seed", [None, 1.5, "3", True, 2 ** 64, -(2 ** 63) - 1])
def test_seed_must_be_an_int(seed):
    with pytest.raises(DFQViTError, match="give an int"):  # 2**64 was "Overflow when unpacking long long"
        dfqvit.compile(TINY_MODELS["vit"](), seed=seed, **FAST)


def test_progress_takes_counts_and_numpy_bools():
    import numpy as np

    for progress in (0, np.bool_(False)):  # argparse action="count" gives an int
        dfqvit.compile(TINY_MODELS["vit"](depth=1), bits=8, calib=torch.randn(4, 3, 32, 32), recon=None,
                       correction=None, progress=progress, backend="fake")


def test_the_largest_seeds_run_through_the_reconstruction():
    """check_seed allows up to 2**64 - 1; the reconstruction's batch generator multiplied it past 64 bits."""
    for seed in (2 ** 62, 2 ** 64 - 1, -(2 ** 63)):
        dfqvit.compile(TINY_MODELS["vit"](depth=1), bits=8, seed=seed, calib=torch.randn(4, 3, 32, 32),
                       recon=dfqvit.ReconConfig(iterations=1), correction=None, progress=False, backend="fake")


@pytest.mark.parametrize("kwargs, message", [
    (dict(progress="no"), "progress='no': give True or False"),  # showed the bars
    (dict(progress=None), "progress=None: give True or False"),
    (dict(stages_dir=5), "stages_dir=5: give a folder path"),  # a raw TypeError
    (dict(device="meta"), "runs on 'cpu' or 'cuda'"),  # failed on .item() in the calibration
    (dict(calib=torch.randn(4, 3, 32, 32), synth=dfqvit.SynthConfig(iterations=2)),
     "synth= configures a synthesis method, but calib is Tensor"),  # silently unused
])
def test_arguments_that_would_be_ignored_or_fail_late_are_refused(kwargs, message, no_calibration):
    with pytest.raises(DFQViTError, match=message):
        dfqvit.compile(TINY_MODELS["vit"](), **{**FAST, **kwargs})


def test_calibration_loaders_of_dicts_or_single_images():
    """A Hugging Face style loader ({"pixel_values": ...}) failed with "yielded NoneType"; a Dataset of (C, H, W)
    tensors was concatenated along channels."""
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kwargs = dict(bits=8, recon=None, correction=None, progress=False, backend="fake",
                  config=dfqvit.QuantConfig(8, 8, calib_images=8))
    expected = dfqvit.compile(TINY_MODELS["vit"](), calib=images, **kwargs)
    x = torch.randn(4, 3, 32, 32)
    for loader in ([{"pixel_values": images[:4]}, {"pixel_values": images[4:]}],
                   [(image, 0) for image in images],
                   # map-style Datasets have no __iter__: "calib=TensorDataset is not usable" (README said they work)
                   torch.utils.data.TensorDataset(images, torch.zeros(8)), torch.utils.data.TensorDataset(images)):
        qmodel = dfqvit.compile(TINY_MODELS["vit"](), calib=loader, **kwargs)
        assert torch.equal(qmodel(x), expected(x))
    with pytest.raises(dfqvit.InputShapeError, match="calibration images of different sizes"):  # torch.cat's error
        dfqvit.compile(TINY_MODELS["vit"](), calib=[images[:4], images[4:, :, :16, :16]], **kwargs)
    with pytest.raises(CalibrationError, match=r"keys \['label', 'pixels'\]; dfqvit reads the images from one of"):
        dfqvit.compile(TINY_MODELS["vit"](), calib=[{"pixels": images, "label": 0}], **kwargs)


def test_a_weight_only_model_with_rms_norm_runs_on_the_engine():
    """RmsNorm is refused only where the engine fuses it with a quantizer: at A16 it runs the float norm."""
    model = TINY_MODELS["vit"](norm_layer="rmsnorm")
    assert dfqvit.preflight_backend(model, "torch", dfqvit.QuantConfig(4, 16)) == "torch"
    engine = dfqvit.compile(model, bits=(4, 16), backend="torch", **FAST)
    fake = dfqvit.compile(model, bits=(4, 16), backend="fake", **FAST)
    x, y = _outputs(model, engine)
    assert cosine(fake(torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))), y) >= 0.9999


def test_wrapped_meta_and_dynamic_size_models_are_named():
    """DataParallel / torch.compile wrappers said only "no dfqvit adapter"; a meta-device model failed in deepcopy
    ("Cannot copy out of meta tensor"); a dynamic-size model fed a size off the patch grid hit timm's assert."""
    model = TINY_MODELS["vit"]()
    for wrapped, attr in ((torch.nn.DataParallel(model), "module"), (torch.compile(model), "_orig_mod")):
        with pytest.raises(UnsupportedModelError, match=f"wrapped .*pass the model itself: model.{attr}"):
            dfqvit.compile(wrapped, **FAST)
    with torch.device("meta"):
        on_meta = TINY_MODELS["vit"]()
    with pytest.raises(DFQViTError, match="meta device .*to_empty"):
        dfqvit.compile(on_meta, **FAST)
    dynamic = dfqvit.compile(TINY_MODELS["vit"](dynamic_img_size=True), backend="fake", **FAST)
    assert dynamic(torch.randn(2, 3, 40, 40)).shape == (2, 10)
    with pytest.raises(InputShapeError, match=r"multiple of its patch size \(8, 8\)"):
        dynamic(torch.randn(2, 3, 36, 36))


def test_a_float64_default_dtype_gives_the_same_model():
    """torch.set_default_dtype(torch.float64) before compile: SPDFQ failed ("Input type (double) and bias type
    (float)") and tensor calibration gave another model (0.018 on the logits)."""
    model, x = TINY_MODELS["vit"](), torch.randn(2, 3, 32, 32)
    kwargs = dict(bits=4, synth=dfqvit.SynthConfig(iterations=2), recon=dfqvit.ReconConfig(iterations=2),
                  progress=False, backend="fake")
    expected = dfqvit.compile(model, **kwargs)(x)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = dfqvit.compile(model, **kwargs)
        assert torch.get_default_dtype() == torch.float64, "the caller's default comes back"
    finally:
        torch.set_default_dtype(previous)
    assert torch.equal(got(x), expected)
