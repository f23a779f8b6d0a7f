"""benchmarks/kernels.py --cpu: runs end to end on a tiny configuration and writes a complete report."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_cpu_benchmark_writes_json_and_markdown(tmp_path, monkeypatch):
    from dfqvit.kernels import native
    if not native.available():
        pytest.skip("dfqvit._C not built: the script only reports that the native backend is unmeasured")
    monkeypatch.syspath_prepend(str(BENCH))
    import kernels_cpu
    monkeypatch.setattr(kernels_cpu, "GEMM_CASES", [("cifar_vit", 1)])
    monkeypatch.setitem(kernels_cpu.SHAPES, "deit_s", (64, 128, 9))  # the ISA comparison's GEMMs, made small
    assert kernels_cpu.run(str(tmp_path), engine_batch=2, quick=True) == 0
    (report_path,) = tmp_path.glob("kernels_cpu_*.json")
    report = json.loads(report_path.read_text())
    assert report["isa"] == native.isa() and report["env"]["torch"]
    assert {r["layer"] for r in report["gemm"]} == {"qkv", "proj", "fc1", "fc2"}
    assert all(r["ms"]["fp32_linear"] > 0 and r["speedup_vs_fp32"]["w4a8_f32out"] > 0 for r in report["gemm"])
    assert report["targets"]["gemm_shapes"] == 4
    if "ms" in report["engine"]:  # the CIFAR reference model is present
        assert report["engine"]["linear_weight_bytes"]["ratio_vs_fp32"] < 0.25
        assert "engine_meets_target" in report["targets"]
    comparison = report["isa_comparison"]
    assert comparison["isas"] == kernels_cpu.isa_ladder()
    if len(comparison["isas"]) > 1:  # the same calls under every ISA: same outputs, a time for each
        assert len(comparison["rows"]) >= 8
        for row in comparison["rows"]:
            assert row["bit_identical"] and set(row["ms"]) == set(comparison["isas"])
            assert row["speedup_vs_avx2"]["avx2"] == 1.0
    assert (tmp_path / (report_path.stem + ".md")).read_text().startswith("# Native CPU backend")
    sys.modules.pop("kernels_cpu", None)


@pytest.mark.parametrize("engine_batch", [0, -3])
def test_engine_batch_below_1_is_refused_before_any_work(tmp_path, monkeypatch, engine_batch):
    """-3 crashed after every measurement (nothing written); 0 wrote a report of zeros with a NaN in its JSON."""
    from dfqvit.errors import DFQViTError

    monkeypatch.syspath_prepend(str(BENCH))
    import kernels_cpu

    def no_work(*args, **kwargs):
        raise AssertionError("timed before checking engine_batch")

    monkeypatch.setattr(kernels_cpu, "gemm_rows", no_work)
    with pytest.raises(DFQViTError, match="engine_batch .*must be an integer >= 1"):
        kernels_cpu.run(str(tmp_path), engine_batch=engine_batch, quick=True)
    assert not list(tmp_path.iterdir())
    sys.modules.pop("kernels_cpu", None)
