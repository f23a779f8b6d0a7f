"""The native engine checks the numbers of its grids once, when it is built, and then calls ``native``'s unchecked entry
points (those checks on every call cost 1-2% of a batch-1 forward); the public ``native.*`` functions keep every check,
and a grid written later (``load_state_dict``) is still refused before it reaches the C++ kernels."""
from __future__ import annotations

import copy
import importlib

import pytest
import torch

import dfqvit
from dfqvit.engine import backends, build_engine
from dfqvit.errors import DFQViTError, UnsupportedModelError
from dfqvit.kernels import KernelInputError, native

from conftest import TINY_MODELS

GEN = torch.Generator().manual_seed(7)
UNCHECKED = ("qgemm_prepacked", "qgemm_prepacked_norm", "layernorm_quant", "quantize", "attention")


@pytest.fixture(scope="module")
def qmodel():
    try:
        importlib.import_module("dfqvit._C")
    except ImportError:
        pytest.skip("dfqvit._C not built (DFQVIT_BUILD_EXT=1 pip install -e . builds it)")
    torch.manual_seed(1)
    return dfqvit.compile(TINY_MODELS["vit"](depth=2), bits=(4, 8), calib=torch.randn(4, 3, 32, 32, generator=GEN),
                          recon=None, correction=None, progress=False, backend="fake")


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))


class CheckedNative:
    """``native`` as the engine saw it before: each ``_*_unchecked`` entry is the public, checked function."""

    def __getattr__(self, name):
        public = name.removeprefix("_").removesuffix("_unchecked")
        return getattr(native, public if public in UNCHECKED else name)


class KernelSpy:
    """Stands in for dfqvit._C (``native._EXT``): records which kernels were called."""

    def __init__(self, ext):
        self.ext, self.calls = ext, []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append(name)
            return getattr(self.ext, name)(*args)
        return call


def test_the_native_engine_checks_its_numbers_once(qmodel, monkeypatch):
    """A forward runs none of the number checks (grids, attention scalars, eps: done when built), still checks the
    qkv column grids (a buffer), and gives the logits of the checked entry points and of the torch backend."""
    engine = build_engine(qmodel, backend="native")
    x = images()
    with torch.no_grad():
        unchecked = engine(x)
        assert torch.equal(unchecked, build_engine(qmodel, backend="torch")(x))
    counts = {"check_requant_grid": 0, "check_attention_scalars": 0, "check_layernorm_eps": 0,
              "check_requant_columns": 0}
    for name in counts:
        def spy(*args, _name=name, _check=getattr(native, name)):
            counts[_name] += 1
            return _check(*args)
        monkeypatch.setattr(native, name, spy)
    with torch.no_grad():
        assert torch.equal(engine(x), unchecked)
    assert counts == {"check_requant_grid": 0, "check_attention_scalars": 0, "check_layernorm_eps": 0,
                      "check_requant_columns": 2}  # one qkv GEMM per block
    # Every call the engine makes passes the public checks, with the same bits.
    monkeypatch.setattr(backends, "native", CheckedNative())
    with torch.no_grad():
        assert torch.equal(engine(x), unchecked)
    assert counts["check_requant_grid"] > 0 and counts["check_attention_scalars"] == 2


@pytest.mark.parametrize("where", ["input", "softmax"])
def test_a_grid_the_kernels_cannot_take_is_refused_when_built(qmodel, where):
    """The forward no longer checks it, so the build does (before: every forward raised a KernelInputError).
    An UnsupportedModelError, so "auto" falls back to the fake-quant model; the torch backend runs it."""
    bad = copy.deepcopy(qmodel)
    block = bad.model.blocks[1]
    with torch.no_grad():
        if where == "input":  # a subnormal scale: no normal fp32 reciprocal
            block.mlp.fc2.input_quantizer.scale.fill_(1e-40)
            match = r"blocks\.1\.mlp\.fc2\.act: out_scale=9\.99.*e-41"
        else:
            block.attn.attn_quantizer.delta.fill_(-1.0)
            match = r"blocks\.1\.attn: p_delta=-1\.0"
    with pytest.raises(UnsupportedModelError, match=match + ".*backend='torch' runs it"):
        build_engine(bad, backend="native")
    with torch.no_grad():
        build_engine(bad, backend="torch")(images())


def test_a_bad_column_grid_loaded_later_is_refused_before_the_kernel(qmodel, monkeypatch):
    """The qkv column grids are buffers: a state dict with this engine's grids (its ``_extra_state``) but a qmax of 300
    in a qkv_grid loads, by copy or by assignment; the next forward refuses it before any qkv GEMM runs (its codes
    would wrap in the int8 store). The numbers passed unchecked cannot change that way: a state dict with other
    grids does not load."""
    engine = build_engine(qmodel, backend="native")
    x = images()
    with torch.no_grad():
        before = engine(x)
    good = copy.deepcopy(engine.state_dict())
    bad = copy.deepcopy(good)
    bad["trunk.blocks.1.attn.qkv_grid"][3, 5] = 300.0
    spy = KernelSpy(native._ext())
    monkeypatch.setattr(native, "_EXT", spy)
    with torch.no_grad():
        engine(x)
    block = ["qgemm_prepacked", "attention", "qgemm_prepacked_norm", "qgemm_prepacked", "qgemm_prepacked_norm"]
    # qkv GEMM, attention, proj (+ norm2), fc1, fc2 (+ the next block's norm1)
    assert spy.calls[:10] == ["layernorm_quant"] + block + block[:4]
    for assign in (False, True):
        engine.load_state_dict(bad, assign=assign)
        spy.calls.clear()
        with torch.no_grad(), pytest.raises(KernelInputError, match=r"out_grid column 5 .*qmax"):
            engine(x)
        assert spy.calls == ["layernorm_quant"] + block  # block 1's qkv GEMM never reached the kernel
        engine.load_state_dict(good, assign=assign)
        with torch.no_grad():
            assert torch.equal(engine(x), before)
    other = copy.deepcopy(good)
    name = "blocks.1.mlp.fc2"
    other["_extra_state"][name] = [other["_extra_state"][name][0], [1e-40, 0, -128, 127]]
    with pytest.raises(DFQViTError, match="other grids"):
        engine.load_state_dict(other)


def test_what_can_change_between_calls_is_still_checked_on_the_engines_path(qmodel):
    """The unchecked entry points still check a LayerNorm's eps (a module attribute, outside the grids the engine
    fixes) and the attention's out_dtype; the public functions check everything, with the same messages."""
    engine = build_engine(qmodel, backend="native")
    norm = engine.trunk.blocks[1].norm1
    with torch.no_grad():
        engine(images())
        for eps in (0.0, float("nan")):
            norm.eps = eps
            with pytest.raises(KernelInputError, match="native.qgemm_prepacked_norm: eps="):
                engine(images())
    x = torch.randn(3, 8, generator=GEN)
    with pytest.raises(KernelInputError, match="native.layernorm_quant: eps=-1.0"):
        native._layernorm_quant_unchecked(x, torch.ones(8), torch.zeros(8), -1.0, 0.1, 0, -128, 127)
    q = torch.zeros(1, 1, 4, 8, dtype=torch.int8)
    attn = (q, q, q, 0.1, 0, 0.1, 0, 0.1, 0, 0.3, None, None, native.P_MODE_LOG2, 0.9, 0, 4)
    with pytest.raises(KernelInputError, match="out_dtype=torch.int8"):
        native._attention_unchecked(*attn, torch.int8)
    with pytest.raises(KernelInputError, match="native.attention: p_bits=0"):
        native.attention(*attn[:-1], 0, torch.float32)
    with pytest.raises(KernelInputError, match="native.quantize: out_qmax=300"):
        native.quantize(x, 0.1, 0, -128, 300)
    with pytest.raises(KernelInputError, match="native.layernorm_quant: out_scale=1e-40"):
        native.layernorm_quant(x, torch.ones(8), torch.zeros(8), 1e-6, 1e-40, 0, -128, 127)
