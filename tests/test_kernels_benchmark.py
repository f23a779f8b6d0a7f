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
    spec = importlib.util.spec_from_file_location("kernels_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    assert module.main(["--out", str(tmp_path), "--models", "deit_s"]) == 0
    assert "UNMEASURED" in capsys.readouterr().out
    (report_path,) = tmp_path.glob("kernels_nogpu_*.json")
    report = json.loads(report_path.read_text())
    assert report["gemm"] is None and report["env"]["device"] is None
    assert report["env"]["torch"] == torch.__version__
    ratios = {(r["layer"], r["bits"]): r for r in report["weight_bytes"]}
    assert all(r["meets_target"] for r in ratios.values() if r["target"] is not None)
    assert ratios[("fc1", 4)]["ratio_vs_fp16"] <= 0.27 and ratios[("fc1", 3)]["ratio_vs_fp16"] <= 0.21
