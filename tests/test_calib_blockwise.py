"""Block-wise calibration: same scales as the one-pass path, family-agnostic unit walk, and the §1.4
post-LayerNorm re-parameterisation keeps both the float function and the quantization codes."""
import pytest
import torch

from conftest import CALLER_STATES, TINY_MODELS, sqnr_db
from dfqvit.calib import calibrate, calibrate_blockwise
from dfqvit.calib.reparam import channelwise_input_quantizer, fold_into_per_tensor
from dfqvit.calib.walk import model_units
from dfqvit.config import QuantConfig
from dfqvit.models import adapt
from dfqvit.nn import QuantLinear

# The fold only reorders float arithmetic: the float model after it matches fp32 to rounding noise.
REPARAM_FLOAT_MIN_SQNR_DB = 100.0


def _images(n=32, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_blockwise_equals_one_pass_without_reparam(name):
    model, images = TINY_MODELS[name](), _images()
    one_pass = calibrate(adapt(model, QuantConfig(4, 4)), images, progress=False)
    blockwise = calibrate_blockwise(adapt(model, QuantConfig(4, 4)), images, reparam_post_ln=False, progress=False)
    for (n1, q1), (n2, q2) in zip(one_pass.quantizers(), blockwise.quantizers()):
        assert n1 == n2
        s1, s2 = q1.state_dict(), q2.state_dict()
        assert all(torch.equal(s1[k], s2[k]) for k in s1), n1
    x = _images(8, seed=1)
    with torch.no_grad():
        assert torch.equal(one_pass(x), blockwise(x))


def test_units_follow_the_forward_for_every_family():
    units = {name: [(u.name, u.is_block) for u in model_units(adapt(fn()))] for name, fn in TINY_MODELS.items()}
    assert units["vit"] == [("blocks.0", True), ("blocks.1", True), ("head", False)]
    assert units["deit_distilled"][-2:] == [("head", False), ("head_dist", False)]
    # timm >= 0.9 Swin: patch merging at the start of stage 2, between the blocks of stage 1 and 2.
    assert units["swin"] == [("layers.0.blocks.0", True), ("layers.0.blocks.1", True),
                             ("layers.1.downsample.reduction", False), ("layers.1.blocks.0", True),
                             ("layers.1.blocks.1", True), ("head.fc", False)]


PADDED_SWIN = "swin_padded"  # 40 px, patch 4: 10x10 tokens in 4x4 windows, padded to 12x12 after norm1


def _model(name):
    if name == PADDED_SWIN:
        from conftest import tiny_swin
        return tiny_swin(img_size=40, patch_size=4, window_size=4)
    return TINY_MODELS[name]()


@pytest.mark.parametrize("name", ["vit", "swin", PADDED_SWIN])
def test_reparam_keeps_the_float_model_and_calibrates_everything(name):
    """The padded Swin: folding norm1 into qkv changed the zeros timm pads after norm1 (qkv(0) = bias became
    bias + W r b), 5% relative error in the logits with every quantizer off."""
    model = _model(name)
    size = 40 if name == PADDED_SWIN else 32
    images = torch.randn(32, 3, size, size, generator=torch.Generator().manual_seed(0))
    qmodel = calibrate_blockwise(adapt(model, QuantConfig(4, 4)), images, progress=False)
    assert all(bool(q.initialized) for _, q in qmodel.quantizers())
    assert all(q.channels is None for n, q in qmodel.activation_quantizers() if hasattr(q, "channels")), \
        "after the fold every activation quantizer is per-tensor again"
    x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), qmodel.quant_state(False, False):
        assert sqnr_db(model(x), qmodel(x)) > REPARAM_FLOAT_MIN_SQNR_DB


def test_fold_gives_the_channelwise_codes():
    """METHODS §1.4: the per-tensor quantizer on the folded LayerNorm output yields exactly the codes of
    the channel-wise quantizer on the original output, and the next Linear's output is unchanged."""
    torch.manual_seed(0)
    channels = 16
    norm = torch.nn.LayerNorm(channels)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(channels) * 3 + 0.1)
        norm.bias.copy_(torch.randn(channels))
    layer = QuantLinear(torch.nn.Linear(channels, 8), QuantConfig(4, 4))
    layer.calibrate_weight()
    x = torch.randn(64, 10, channels) * torch.linspace(0.2, 5, channels)
    with torch.no_grad():
        channelwise = channelwise_input_quantizer(layer)
        channelwise.calibrate(norm(x))
        codes_before = channelwise.quantize(norm(x))
        out_before = torch.nn.functional.linear(channelwise.fake(norm(x)), layer.weight, layer.bias)
        per_tensor = layer.input_quantizer
        fold_into_per_tensor(norm, layer, channelwise, per_tensor)
        codes_after = per_tensor.quantize(norm(x))
        out_after = torch.nn.functional.linear(per_tensor.fake(norm(x)), layer.weight, layer.bias)
    assert (codes_before != codes_after).float().mean() < 1e-3  # ties at .5 may flip by float rounding
    assert sqnr_db(out_before, out_after) > 80


def test_a_nearly_constant_layernorm_channel_is_not_folded():
    """A LayerNorm channel with gamma = 0 and beta = 0.5 is constant: its channel-wise zero point was -1e6, the fold
    shifted it by ~2e4 and the next layer's quantized weights carried that (W8A8 cosine to fp32: -0.41)."""
    from conftest import cosine, tiny_vit
    import dfqvit

    model = tiny_vit(depth=1)
    with torch.no_grad():
        model.blocks[0].norm1.weight[3] = 0.0
        model.blocks[0].norm1.bias[3] = 0.5
    qmodel = dfqvit.compile(model, bits=(8, 8), calib=_images(8), recon=None, correction=None, progress=False,
                            backend="fake")
    x = _images(16, seed=1)
    with torch.no_grad():
        assert cosine(model(x), qmodel(x)) >= 0.999
    assert abs(float(qmodel.model.blocks[0].attn.qkv.input_quantizer.zero_point)) <= 255


@pytest.mark.parametrize("state", sorted(CALLER_STATES))
@pytest.mark.parametrize("entry", ["calibrate", "calibrate_blockwise", "calibrate_model"])
def test_calibration_called_directly_ignores_the_callers_torch_state(entry, state):
    """The calibration functions are public: under a caller's bf16 autocast they calibrated on bf16 activations
    (other scales than the same call outside it), and under inference_mode their buffers became inference tensors
    that a later reconstruction could not update. They give the same model as outside, and the model still trains."""
    from dfqvit.calib import calibrate_model, reconstruct
    from dfqvit.config import ReconConfig

    run = {"calibrate": lambda q, x: calibrate(q, x, progress=False),
           "calibrate_blockwise": lambda q, x: calibrate_blockwise(q, x, progress=False),
           "calibrate_model": lambda q, x: calibrate_model(q, x, progress=False)}[entry]
    model, images = TINY_MODELS["vit"](depth=1), _images(8)
    expected = run(adapt(model, QuantConfig(4, 4)), images)
    qmodel = adapt(model, QuantConfig(4, 4))
    with CALLER_STATES[state]():
        run(qmodel, images)
    for (name, a), b in zip(expected.state_dict().items(), qmodel.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert not any(t.is_inference() for t in qmodel.state_dict().values())
    reconstruct(qmodel, images, ReconConfig(iterations=1), progress=False)
