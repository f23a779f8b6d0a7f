"""benchmarks/kernels.py runs without a GPU: it says GPU figures are unmeasured, writes byte ratios, exits 0."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs the full timing sweep")
def test_benchmark_without_gpu_writes_byte_ratios(tmp_path, capsys):
    module = _load_script()
    assert module.main(["--out", str(tmp_path), "--models", "deit_s"]) == 0
    assert "UNMEASURED" in capsys.readouterr().out
    (report_path,) = tmp_path.glob("kernels_nogpu_*.json")
    report = json.loads(report_path.read_text())
    assert report["gemm"] is None and report["env"]["device"] is None
    assert report["env"]["torch"] == torch.__version__
    ratios = {(r["layer"], r["bits"]): r for r in report["weight_bytes"]}
    assert all(r["meets_target"] for r in ratios.values() if r["target"] is not None)
    assert ratios[("fc1", 4)]["ratio_vs_fp16"] <= 0.27 and ratios[("fc1", 3)]["ratio_vs_fp16"] <= 0.21


def _load_script():
    spec = importlib.util.spec_from_file_location("kernels_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_w4a8_target_uses_the_path_the_engine_takes():
    """Both GEMM paths are timed; the speed-up target reads the one recorded as the default at that M."""
    module = _load_script()
    Timing, Result = module.Timing, module.ExperimentResult

    def row(batch, default_path):
        return Result({"batch": batch, "default_path": default_path},
                      [Timing("cublas_fp16", 3.0), Timing("ours_w4a8_fused", 6.0),
                       Timing("ours_w4a8_unpack_first", 1.5)])

    targets = module.evaluate_targets([row(64, "unpack_first"), row(1, "fused")], [])
    assert targets["w4a8_speedup_vs_fp16_at_batch_ge_64"] == {"target": ">= 1.5", "min": 2.0, "met": True}
    targets = module.evaluate_targets([row(64, "fused")], [])
    assert targets["w4a8_speedup_vs_fp16_at_batch_ge_64"]["min"] == 0.5


def test_gemm_path_context_forces_and_restores_the_rule(monkeypatch):
    from dfqvit.kernels.qgemm import GemmConfig, gemm_path, use_unpack_first

    monkeypatch.setenv("DFQVIT_UNPACK_FIRST_MIN_M", "5000")
    with gemm_path(True):
        assert use_unpack_first(None, 197, 4)
        with gemm_path(False):
            assert not use_unpack_first(None, 50_000, 3)
        assert use_unpack_first(None, 197, 4)
        assert not use_unpack_first(GemmConfig(unpack_first=False), 197, 4)  # an explicit config wins
    assert not use_unpack_first(None, 4999, 4) and use_unpack_first(None, 5000, 4)


def test_autotune_choices_are_recorded_as_json():
    """What the GPU benchmarks store: the tile per autotune key of each kernel (here a made-up entry)."""
    import triton

    from dfqvit.kernels import autotune_choices
    from dfqvit.kernels.attention import _attention_kernel_autotuned

    key = (197, 64, 0, 4, False, False)
    _attention_kernel_autotuned.cache[key] = triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=1)
    try:
        choices = json.loads(json.dumps(autotune_choices()))
    finally:
        del _attention_kernel_autotuned.cache[key]
    assert set(choices) == {"qgemm", "attention"}
    assert "BLOCK_M: 64" in choices["attention"][repr(key)] and "num_warps: 4" in choices["attention"][repr(key)]


def test_both_gemm_paths_are_timed_under_their_names():
    from dfqvit.kernels.qgemm import use_unpack_first

    module = _load_script()
    seen = []
    timings = module._bench_paths("ours_w3a8", lambda: seen.append(use_unpack_first(None, 197, 3)))
    assert [t.provider for t in timings] == ["ours_w3a8_fused", "ours_w3a8_unpack_first"]
    assert seen[:1] == [False] and seen[-1:] == [True]  # the warm-up call ran on each path (timing needs CUDA)
