"""Integer exactness: every packed GEMM of the engine, on the engine's own int8 codes, gives the same int32
accumulators as the fake-quant layer's integer codes (reference math and the Triton kernel); plus the
CUDA-graph bucketing and padding logic, which runs on CPU."""
from __future__ import annotations

import pytest
import torch

from dfqvit.engine import build_engine
from dfqvit.engine.backends import TorchKernels
from dfqvit.engine.graphs import CUDAGraphRunner, bucket_for, pad_batch, split_batches
from dfqvit.engine.pack import PackedLinear
from dfqvit.errors import InputShapeError
from dfqvit.kernels import qgemm_accumulator_triton, reference

from test_engine_model import calibrated


@pytest.mark.parametrize("bits", [(8, 8), (4, 8), (3, 8), (4, 4)], ids=["W8A8", "W4A8", "W3A8", "W4A4"])
def test_gemm_accumulators_equal_fake_quant_integer_codes(bits):
    _, qmodel = calibrated("vit_depth1", bits)
    engine = build_engine(qmodel, backend="torch")
    fake_layers = dict(qmodel.weight_layers())
    # Engine modules mirror timm's names under "trunk." (blocks.0.attn.qkv, blocks.0.mlp.fc1, head, ...).
    engine_layers = {name.removeprefix("trunk."): m for name, m in engine.named_modules() if isinstance(m, PackedLinear)}
    checked = 0
    for name, layer in engine_layers.items():
        fake = fake_layers[name]
        x = torch.randn(5, layer.k, generator=torch.Generator().manual_seed(checked)) * 2
        a_fake = fake.input_quantizer.quantize(x).to(torch.int64)          # unsigned codes
        w_fake = fake.weight_quantizer.quantize(fake.weight.detach()).reshape(layer.n, -1).to(torch.int64)
        expected = (a_fake - int(fake.input_quantizer.zero_point)) @ \
                   (w_fake - fake.weight_quantizer.zero_point.to(torch.int64)[:, None]).T
        a8 = TorchKernels().quantize(x, layer.act)
        assert torch.equal(a8.to(torch.int64) - layer.act.zero, a_fake - int(fake.input_quantizer.zero_point))
        codes = reference.unpack_any_reference(layer.data, layer.layout.storage_bits, layer.k, layer.group_k)
        acc_ref = reference.qgemm_accumulator_reference(a8, layer.act.zero, codes, layer.w_zero)
        assert torch.equal(acc_ref.to(torch.int64), expected), name
        acc_triton = qgemm_accumulator_triton(a8, layer.act.zero, layer.data, layer.w_zero, layer.w_col_sums,
                                              layer.layout.storage_bits, layer.k, layer.group_k)
        assert torch.equal(acc_triton.to(torch.int64), expected), name
        checked += 1
    assert checked == 5  # qkv, proj, fc1, fc2, head


def test_bucketing_and_padding():
    assert [bucket_for(b) for b in (1, 2, 3, 5, 64, 65, 256)] == [1, 2, 4, 8, 64, 128, 256]
    with pytest.raises(InputShapeError):
        bucket_for(0)
    with pytest.raises(InputShapeError):
        bucket_for(257)
    assert split_batches(3) == ((0, 3, 4),)
    assert split_batches(600) == ((0, 256, 256), (256, 512, 256), (512, 600, 128))
    x = torch.randn(3, 2)
    padded = pad_batch(x, 4)
    assert padded.shape == (4, 2) and torch.equal(padded[:3], x) and not padded[3].any()
    assert pad_batch(x, 3) is x


def test_cuda_graph_runner_refuses_cpu_inputs():
    runner = CUDAGraphRunner(lambda images: images)
    with pytest.raises(InputShapeError, match="CUDA"):
        runner(torch.randn(2, 3, 8, 8))


class _EmulatedGraph:
    """torch.cuda.CUDAGraph on the CPU: capture records nothing, replay is not needed here."""

    def pool(self):
        return None


def test_cuda_graph_runner_empty_batch_and_inputs_that_require_grad(monkeypatch):
    """An empty batch failed in torch.cat (no chunk to replay); an input that requires grad was cloned with its
    graph into the static input, and each replay's copy chained onto it (memory grew on every call)."""
    import contextlib
    from types import SimpleNamespace

    runner = CUDAGraphRunner(lambda images: ("eager", images.shape[0]))
    assert runner(SimpleNamespace(device=torch.device("cuda"), shape=(0, 3, 8, 8))) == ("eager", 0)
    stream = SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _EmulatedGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None: contextlib.nullcontext())
    runner = CUDAGraphRunner(lambda images: images * 2)
    captured = runner._capture(torch.randn(2, 3, 8, 8, requires_grad=True))
    assert not captured.static_in.requires_grad and not captured.static_out.requires_grad
