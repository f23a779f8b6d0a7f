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


@pytest.mark.parametrize("extra, message", [
    (["--iterations", "0"], "--iterations must be >= 1, got 0"),  # ran the shape's default 200 instead
    (["--iterations", "-3"], "--iterations must be >= 1, got -3"),
    (["--images", "0"], "--images must be >= 1, got 0"),
    (["--method", "nope"], "--method 'nope' is not a synthesis method; choose from"),
    (["--device", "foo"], "give 'cpu' or 'cuda'"),  # a raw torch RuntimeError
    (["--device", "meta"], "dfqvit runs on 'cpu' or 'cuda'")])  # was run and recorded as cpu
def test_bad_arguments_are_refused_before_the_synthesis(tmp_path, capsys, monkeypatch, extra, message):
    bench = _load()

    def no_work(*args, **kwargs):
        raise AssertionError("synthesized before checking the arguments")

    monkeypatch.setattr(bench, "time_synthesis", no_work)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--images", "1", "--device", "cpu", "--out", str(tmp_path), *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "error: " in err and message in err
    assert not list(tmp_path.iterdir())


def test_runs_in_the_same_second_keep_every_report(tmp_path, monkeypatch):
    """Runs of different methods (or the same one twice) in one second wrote one file."""
    bench = _load()
    monkeypatch.setattr(bench.time, "strftime", lambda fmt, *args: "20260101_000000")
    for method in ("gaussian", "psaq", "gaussian"):
        assert bench.main(["--method", method, "--iterations", "1", "--images", "1", "--device", "cpu",
                           "--out", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["synthesis_cpu-target_cpu_gaussian_20260101_000000-2.json",
                     "synthesis_cpu-target_cpu_gaussian_20260101_000000.json",
                     "synthesis_cpu-target_cpu_psaq_20260101_000000.json"]
    assert json.loads((tmp_path / names[2]).read_text())["result"]["method"] == "psaq"


def test_environment_names_the_device_it_is_given():
    """Every device that was not CUDA was recorded as "cpu (...)"."""
    import torch

    from dfqvit.environment import describe_environment

    meta = describe_environment(torch.device("meta"))
    assert (meta["device"], meta["device_type"]) == ("meta", "meta")
    assert describe_environment("cpu")["device"].startswith("cpu (")
