"""benchmarks/latency.py without a GPU: it says nothing was measured and exits 0; its row bookkeeping."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "latency.py"


@pytest.fixture(scope="module")
def latency():
    spec = importlib.util.spec_from_file_location("latency_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs the whole sweep")
def test_without_cuda_it_says_so_and_exits_0(latency, capsys, tmp_path):
    assert latency.main(["--gemm-paths", "default", "fused", "--softmax-maths", "default", "exact", "--profile", "--out-dir",
                         str(tmp_path)]) == 0
    assert "no CUDA device; nothing measured" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_fused_gemm_rows_only_for_packed_weights(latency):
    rows = latency.engine_variants(["W4A8", "W8A8", "W3A16"], ["default", "fused"])
    assert rows == [("dfqvit W4A8", "W4A8", "default", "default"),
                    ("dfqvit W4A8 fused-GEMM", "W4A8", "fused", "default"),
                    ("dfqvit W8A8", "W8A8", "default", "default"),
                    ("dfqvit W3A16", "W3A16", "default", "default"),
                    ("dfqvit W3A16 fused-GEMM", "W3A16", "fused", "default")]
    assert latency.engine_variants(["W4A4"], ["default"]) == [("dfqvit W4A4", "W4A4", "default", "default")]


def test_exact_softmax_rows_only_where_attention_is_quantized(latency):
    rows = latency.engine_variants(["W4A8", "W3A16"], ["default", "fused"], ["default", "exact"])
    assert rows == [("dfqvit W4A8", "W4A8", "default", "default"),
                    ("dfqvit W4A8 fused-GEMM", "W4A8", "fused", "default"),
                    ("dfqvit W4A8 exact-softmax", "W4A8", "default", "exact"),
                    ("dfqvit W3A16", "W3A16", "default", "default"),
                    ("dfqvit W3A16 fused-GEMM", "W3A16", "fused", "default")]


def test_every_engine_row_is_compared_with_the_best_fp16_row_of_its_batch(latency):
    def row(variant, batch, ips):
        return {"model": "m", "batch": batch, "variant": variant, "images_per_s": ips, "latency_ms": batch / ips * 1e3}

    rows = [row("fp16 CUDA graphs", 64, 1000.0), row("torch.compile fp16", 64, 1250.0),
            row("dfqvit W4A8", 64, 2500.0), row("dfqvit W4A8 fused-GEMM", 64, 500.0), row("fp16 CUDA graphs", 1, 900.0)]
    got = {r["variant"]: r for r in latency.ratios(rows)}
    assert set(got) == {"dfqvit W4A8", "dfqvit W4A8 fused-GEMM"}
    assert got["dfqvit W4A8"]["best_fp16"] == "torch.compile fp16"
    assert got["dfqvit W4A8"]["speedup_vs_best_fp16"] == pytest.approx(2.0)
    assert got["dfqvit W4A8 fused-GEMM"]["speedup_vs_best_fp16"] == pytest.approx(0.4)


def test_engine_runner_forces_the_fused_path_only_inside_the_call(latency):
    from dfqvit.kernels.qgemm import use_unpack_first

    seen = []
    runner = latency.engine_runner(lambda x: seen.append(use_unpack_first(None, 10 ** 6, 4)) or x, "fused")
    assert runner(3) == 3 and seen == [False]
    assert use_unpack_first(None, 10 ** 6, 4)
    engine = object()
    assert latency.engine_runner(engine, "default") is engine


def test_engine_runner_sets_the_softmax_math_only_inside_the_call(latency, monkeypatch):
    from dfqvit.kernels.attention import resolve_softmax_math

    monkeypatch.delenv("DFQVIT_SOFTMAX_MATH", raising=False)
    cuda = torch.device("cuda")
    seen = []
    runner = latency.engine_runner(lambda x: seen.append(resolve_softmax_math(cuda)) or x, "default", "exact")
    assert runner(3) == 3 and seen == ["exact"]
    assert resolve_softmax_math(cuda) == "fast"


def test_profile_groups_kernel_time_per_call_by_the_engine_part(latency):
    """--profile's table: the engine's Triton kernels by name, everything else PyTorch's, per call."""
    from types import SimpleNamespace as Event

    events = [Event(key="_qgemm_kernel", self_device_time_total=3000.0, count=147),
              Event(key="_attention_kernel", self_device_time_total=1500.0, count=36),
              Event(key="_layernorm_quant_kernel", self_device_time_total=300.0, count=72),
              Event(key="void at::native::vectorized_elementwise_kernel<4>", self_device_time_total=90.0, count=3),
              Event(key="cudnn::engines::nchwToNhwcKernel", self_device_time_total=60.0, count=3),
              Event(key="aten::copy_", self_device_time_total=900.0, count=3),  # repeats its kernels' time
              Event(key="cudaLaunchKernel", self_device_time_total=0.0, count=250)]  # host side: no GPU time
    got = latency.group_times(events, iters=3)
    assert got["by_group"] == {"gemm": 1.0, "attention": 0.5, "layernorm_quant": 0.1, "torch": 0.05}
    assert list(got["by_group"]) == ["gemm", "attention", "layernorm_quant", "torch"]  # largest first
    assert got["top"][0] == ["_qgemm_kernel", 1.0, 49.0] and len(got["top"]) == 5


@pytest.mark.parametrize("extra, message", [(["--iters", "0"], "--iters must be >= 1, got 0"),
                                            (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
                                            (["--batches", "1", "0"], "--batches must be >= 1, got 0")])
def test_bad_counts_are_refused_before_any_model_is_built(latency, capsys, tmp_path, extra, message):
    """--iters 0 raised StatisticsError (median of no timings) after the models were built on the GPU."""
    with pytest.raises(SystemExit) as exit_info:
        latency.main([*extra, "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
