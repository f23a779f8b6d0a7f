"""benchmarks/kernels.py: flags the chosen benchmark would ignore are refused, reports never overwrite each other
and record DFQVIT_AUTOTUNE (the weight-byte part runs without a GPU)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def kernels(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import kernels
    import kernels_cpu
    calls = []
    monkeypatch.setattr(kernels_cpu, "run", lambda out, **kw: calls.append(kw) or 0)
    kernels.cpu_runs = calls
    yield kernels
    for name in ("kernels", "kernels_cpu"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("extra, message", [
    (["--cpu", "--models", "vit_b"], "--models has no effect with --cpu"),
    (["--cpu", "--models", "vit_b", "--batches", "1"], "--batches and --models have no effect with --cpu"),
    (["--quick"], "--quick applies only with --cpu; add --cpu or drop it"),
    (["--engine-batch", "3", "--default-malloc"], "--engine-batch and --default-malloc apply only with --cpu"),
    (["--cpu", "--engine-batch", "0"], "--engine-batch must be >= 1, got 0"),
    (["--cpu", "--engine-batch", "-2"], "--engine-batch must be >= 1, got -2"),
    (["--batches", "8", "0"], "--batches must be >= 1, got 8 0")])
def test_ignored_flags_and_bad_counts_are_refused_before_any_work(kernels, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        kernels.main(["--out", str(tmp_path), *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert kernels.cpu_runs == [] and not list(tmp_path.iterdir())


def test_cpu_flags_reach_the_cpu_benchmark(kernels, tmp_path):
    assert kernels.main(["--cpu", "--quick", "--engine-batch", "3", "--default-malloc", "--out", str(tmp_path)]) == 0
    assert kernels.cpu_runs == [{"engine_batch": 3, "quick": True, "steady_malloc": False}]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script times every kernel")
def test_runs_in_the_same_second_keep_both_reports_with_their_autotune_mode(kernels, tmp_path, monkeypatch):
    monkeypatch.setattr(kernels.time, "strftime", lambda fmt, *args: "20260101_000000")
    monkeypatch.delenv("DFQVIT_AUTOTUNE", raising=False)
    assert kernels.main(["--models", "deit_s", "--out", str(tmp_path)]) == 0
    monkeypatch.setenv("DFQVIT_AUTOTUNE", "quick")
    assert kernels.main(["--models", "vit_b", "--out", str(tmp_path)]) == 0
    first, second = (json.loads((tmp_path / f"kernels_nogpu_20260101_000000{n}.json").read_text())
                     for n in ("", "-2"))
    assert (list(first["models"]), first["autotune"]) == (["deit_s"], "full")  # the library's default
    assert (list(second["models"]), second["autotune"]) == (["vit_b"], "quick")
