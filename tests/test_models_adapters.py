"""Adapters: with quantization off the swapped model is timm's model; taps; unsupported variants."""
import pytest
import torch
from torch import nn

import dfqvit

from conftest import TINY_MODELS, tiny_vit
from dfqvit.errors import DFQViTError, UnsupportedModelError
from dfqvit.models import adapt
from dfqvit.nn import QuantAttentionBase, QuantLinear


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_disabled_quantization_matches_timm_fp32(name):
    model = TINY_MODELS[name]()
    qmodel = adapt(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), qmodel.quant_state(weights=False, activations=False):
        expected = model(x)
        fast = qmodel(x)
        with qmodel.record_attention(probs=True, context=True):  # forces the explicit attention path
            explicit = qmodel(x)
    assert (fast - expected).abs().max() <= 1e-5
    assert (explicit - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_every_linear_is_swapped_and_original_untouched(name):
    model = TINY_MODELS[name]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = adapt(model)
    plain = [n for n, m in qmodel.model.named_modules() if type(m) is nn.Linear]
    assert plain == [], f"un-swapped Linear layers: {plain}"
    assert list(qmodel.skipped) == ["patch_embed.proj"], "patch embedding stays float by default (I&S)"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, QuantAttentionBase) for m in model.modules())


def test_taps_shapes_and_prefix_tokens():
    for name, prefix in [("vit", 1), ("deit_distilled", 2), ("vit_avgpool", 0)]:
        qmodel = adapt(TINY_MODELS[name]())
        assert qmodel.num_prefix_tokens == prefix
        with qmodel.quant_state(False, False), qmodel.record_attention(probs=True, context=True) as taps:
            qmodel(torch.randn(2, 3, 32, 32))
        tokens = 16 + prefix
        assert len(taps) == 2
        assert taps[0].probs.shape == (2, 3, tokens, tokens)
        assert taps[0].context.shape == (2, 3, tokens, 16)
        torch.testing.assert_close(taps[0].probs.sum(-1), torch.ones(2, 3, tokens))
    assert all(m.tap is None for m in qmodel.attention_modules()), "taps are removed afterwards"


def test_adapted_model_is_in_eval_mode_so_dropout_never_runs():
    """The swapped attention modules were made in training mode: with attention dropout the float path (weight-only
    models, the pipeline's float reference) dropped probabilities, 0.06-0.11 on these logits, different per call."""
    model = tiny_vit(attn_drop_rate=0.5, proj_drop_rate=0.5, drop_rate=0.5, drop_path_rate=0.5).train()
    qmodel = adapt(model)
    assert not any(m.training for m in qmodel.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), qmodel.quant_state(weights=False, activations=False):
        assert (qmodel(x) - model.eval()(x)).abs().max() <= 1e-5


def test_the_callers_hooks_are_not_copied():
    """deepcopy carried the caller's hooks over: the fake-quant model ran them (during calibration too) and the
    engine did not (cosine 0.77 between them); they kept firing after the caller removed them from the original."""
    model = tiny_vit()
    shift = torch.randn(48)
    handle = model.blocks[0].register_forward_hook(lambda module, args, out: out + shift)
    model.register_forward_pre_hook(lambda module, args: None)
    with pytest.warns(UserWarning, match="hooks registered on the model, blocks.0 are not copied"):
        qmodel = adapt(model)
    handle.remove()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), qmodel.quant_state(weights=False, activations=False):
        assert (qmodel(x) - model(x)).abs().max() <= 1e-5


def test_nested_attention_records_give_the_outer_taps_back():
    qmodel = adapt(TINY_MODELS["vit"]())
    x = torch.randn(1, 3, 32, 32)
    with qmodel.quant_state(False, False), qmodel.record_attention() as outer:
        with qmodel.record_attention(probs=False, context=True) as inner:
            qmodel(x)
        assert inner[0].context is not None
        qmodel(x)  # the inner exit used to clear every tap: the outer ones stayed empty
        assert outer[0].probs is not None and outer[0].probs.shape == (1, 3, 17, 17)
    assert all(m.tap is None for m in qmodel.attention_modules())


def test_quant_state_takes_true_or_false_only():
    qmodel = adapt(TINY_MODELS["vit"]())
    with pytest.raises(DFQViTError, match="activations='off': give True or False"):  # "off" is truthy: it was on
        qmodel.set_quant_state(False, "off")
    with pytest.raises(DFQViTError, match="weights=1"):
        with qmodel.quant_state(1, False):
            pass


def test_swin_taps_are_per_window():
    qmodel = adapt(TINY_MODELS["swin"]())
    with qmodel.quant_state(False, False), qmodel.record_attention() as taps:
        qmodel(torch.randn(2, 3, 32, 32))
    # 16x16 tokens in 4x4 windows -> 16 windows per image in stage 1, 4 in stage 2
    assert [t.probs.shape for t in taps] == [(32, 2, 16, 16)] * 2 + [(8, 4, 16, 16)] * 2


def test_swin_keeps_relative_position_bias_and_shift_mask():
    qmodel = adapt(TINY_MODELS["swin"]())
    shifted = qmodel.blocks[1]
    assert shifted.attn_mask is not None, "second block of a stage is shifted"
    assert isinstance(shifted.attn.relative_position_bias_table, nn.Parameter)


@pytest.mark.parametrize("kwargs, what", [
    (dict(qk_norm=True), "qk_norm"),
    (dict(global_pool="map"), "map"),
])
def test_unsupported_vit_variants_are_named(kwargs, what):
    with pytest.raises(UnsupportedModelError, match=what):
        adapt(tiny_vit(**kwargs))


def test_unsupported_model_type():
    with pytest.raises(UnsupportedModelError, match="supported timm families"):
        adapt(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten()))


def test_head_can_stay_float():
    from dfqvit.config import QuantConfig
    qmodel = adapt(TINY_MODELS["deit_distilled"](), QuantConfig(quantize_head=False))
    assert set(qmodel.skipped) == {"patch_embed.proj", "head", "head_dist"}
    assert not isinstance(qmodel.model.head, QuantLinear)


def test_weights_with_nan_or_inf_are_named():
    """NaN weights spread into other layers' scales through calibration (NaN logits), or failed late while packing."""
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[0, 0] = float("nan")
        model.cls_token[0, 0, 0] = float("inf")
    with pytest.raises(DFQViTError, match="cls_token, blocks.1.mlp.fc1.weight hold NaN or Inf"):
        dfqvit.compile(model, bits=8, calib=torch.randn(4, 3, 32, 32), progress=False, backend="fake")
    adapt(model)  # a skeleton for an artifact's weights may hold anything
