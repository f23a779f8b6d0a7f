"""benchmarks/synthesis.py times one synthesis run and writes a self-describing JSON."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "synthesis.py"


def _load():
    spec = importlib.util.spec_from_file_location("synthesis_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_synthesis_benchmark_writes_json(tmp_path, capsys):
    bench = _load()
    assert bench.main(["--iterations", "2", "--images", "2", "--device", "cpu", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("synthesis_cpu-target_cpu_*.json")
    data = json.loads(path.read_text())
    assert data["result"]["iterations"] == 2 and data["result"]["images"] == 2
    assert data["result"]["wall_s"] >= 0 and data["env"]["torch"]
    assert "2 images x 2 iterations" in capsys.readouterr().out


def test_synthesis_benchmark_refuses_cuda_without_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit):
        _load().main(["--device", "cuda", "--iterations", "1"])


def test_a_file_as_out_is_refused_before_the_synthesis(tmp_path, capsys):
    """It used to synthesize first and then fail with a raw FileExistsError (the same check guards the
    latency, kernels and accuracy benchmarks)."""
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit):
        _load().main(["--iterations", "1", "--images", "1", "--device", "cpu", "--out", str(blocker / "sub")])
    assert "cannot make the folder (it or a folder above it is a file)" in capsys.readouterr().err
