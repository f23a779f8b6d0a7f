"""benchmarks/accuracy.py: grid cells, synthesis reuse, mean ± std, targets, reports, errors (tiny ViT)."""
from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dfqvit.errors import CheckpointNotFoundError, DFQViTError, MissingGPUError, UnsupportedBitsError

from conftest import tiny_vit

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy.py"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616)
TINY_KWARGS = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)


@pytest.fixture(scope="module")
def acc():
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def write_npz(path: Path, count: int, seed: int) -> Path:
    """An image pack in the ../shared/data format: JPEG bytes, offsets, labels, classes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    blobs = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    np.savez(path, blob=np.concatenate(blobs), offsets=offsets, labels=(np.arange(count) % 10).astype(np.uint8),
             classes=np.array([f"c{i}" for i in range(10)]))
    return path


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """A reference-model JSON + checkpoint of the tiny ViT, 30 evaluation and 24 'real' images."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("acc")
    save_file(tiny_vit().state_dict(), str(root / "tiny.safetensors"))
    meta = {"name": "tiny", "timm_module": "timm.models.vision_transformer", "timm_class": "VisionTransformer",
            "kwargs": TINY_KWARGS, "files": ["tiny.safetensors"], "mean": list(MEAN), "std": list(STD)}
    (root / "tiny.json").write_text(json.dumps(meta))
    return {"model": root / "tiny.json", "data": write_npz(root / "test.npz", 30, 0),
            "real": write_npz(root / "real.npz", 24, 1), "root": root}


def args_for(files, out, *extra):
    return ["--model", str(files["model"]), "--data", str(files["data"]), "--real", str(files["real"]),
            "--out", str(out), "--device", "cpu", "--no-progress", *extra]


# ------------------------------------------------------------------------------------------ grid definition


def test_full_grid_has_every_row_column_seed_and_ablation(acc):
    cells = acc.grid_cells(acc.FULL_GRID)
    keys = {c.key for c in cells}
    assert len(keys) == len(cells), "duplicate runs in the grid"
    columns = ["W4A4", "W5A5", "W6A6", "W4A8", "W8A8", "W4A8-uniform", "W8A8-uniform", "W3A16"]
    assert [s.name for s in acc.FULL_GRID.settings] == columns
    for source in ("real", "gaussian", "psaq", "psaq_v2", "spdfq", "dfqvit"):
        variant = "APA+MSR+SL" if source == "spdfq" else None
        for column in columns:
            seeds = (0, 1, 2) if column == "W4A4" else (0,)
            for seed in seeds:
                assert (source, column, seed, variant) in keys, (source, column, seed)
        assert (source, "W8A8", 1, variant) not in keys
    for name in acc.ABLATIONS:
        for seed in (0, 1, 2):
            assert ("spdfq", "W4A4", seed, name) in keys
    uniform = next(s for s in acc.FULL_GRID.settings if s.name == "W8A8-uniform")
    assert uniform.quant_config(32).softmax_quantizer.value == "uniform"
    assert acc.FULL_GRID.synth_iters == 1000 and acc.FULL_GRID.recon_iters == 100
    # 6 sources x (7 columns + 3 W4A4 seeds) + 7 ablation variants x 3 seeds (APA+MSR+SL = the SPDFQ row)
    assert len(cells) == 6 * 10 + 7 * 3


def test_synthetic_sets_are_shared_across_bits_except_psaq_v2_and_dfqvit(acc):
    grid = acc.QUICK_GRID
    w4, w8 = acc.parse_setting("W4A4"), acc.parse_setting("8,8")
    for source in ("gaussian", "psaq", "spdfq", "real"):
        assert acc.synth_key(acc.Cell(source, w4, 0), grid) == acc.synth_key(acc.Cell(source, w8, 0), grid)
        assert acc.synth_key(acc.Cell(source, w4, 0), grid) != acc.synth_key(acc.Cell(source, w4, 1), grid)
    for source in ("psaq_v2", "dfqvit"):
        assert acc.synth_key(acc.Cell(source, w4, 0), grid) != acc.synth_key(acc.Cell(source, w8, 0), grid)
    assert (acc.synth_key(acc.Cell("spdfq", w4, 0, "APA"), grid)
            != acc.synth_key(acc.Cell("spdfq", w4, 0, "APA+MSR+SL"), grid))
    baseline = acc.synth_config(acc.Cell("spdfq", w4, 0, "baseline"), grid)
    assert (baseline.apa, baseline.msr, baseline.soft_labels) == (False, False, False)
    assert baseline.iterations == 50


@pytest.mark.parametrize("text, expected", [("4", (4, 4, "log2")), ("4,8", (4, 8, "log2")),
                                            ("W3A16", (3, 16, "log2")), ("8,8:uniform", (8, 8, "uniform")),
                                            ("W4A8-uniform", (4, 8, "uniform")), ("w4a8", (4, 8, "log2")),
                                            ("4/8", (4, 8, "log2")), ("W8A8:log2", (8, 8, "log2"))])
def test_parse_setting(acc, text, expected):
    s = acc.parse_setting(text)
    assert (s.w_bits, s.a_bits, s.softmax) == expected


@pytest.mark.parametrize("text, error", [("9", UnsupportedBitsError), ("4,3", UnsupportedBitsError),
                                         ("2,16", UnsupportedBitsError), ("four", DFQViTError),
                                         ("4,4:cubic", DFQViTError), ("W4A16-uniform", DFQViTError)])
def test_bad_settings_raise_typed_errors(acc, text, error):
    with pytest.raises(error, match="not|allowed"):
        acc.parse_setting(text)


@pytest.mark.parametrize("text", ["A8", "W4A", ",8", "W4AA8", "wa4", "W4A8-", "4,8:", "4,8,8", "W4 A8", "8w8a"])
def test_settings_outside_the_documented_forms_are_refused(acc, text):
    """The letter stripping read "A8" as W8A8, "W4A" as W4A4, ",8" as W8A8, "W4AA8" as W4A8 and took "W4A8-"."""
    with pytest.raises(DFQViTError, match="is not a bit width; give 4 .*W4A8.*:uniform"):
        acc.parse_setting(text)


def grid_of(acc, *argv):
    return acc.build_grid(acc.build_parser().parse_args(["--quick", *argv]))


def test_sources_and_bits_without_spdfq_w4a4_leave_out_the_ablation(acc):
    """--quick --sources real --bits 8 ran 3 SPDFQ W4A4 ablation runs as well."""
    for argv in (["--sources", "real", "--bits", "8"], ["--sources", "spdfq", "--bits", "8"],
                 ["--bits", "4,8"]):
        grid = grid_of(acc, *argv)
        assert grid.ablations == () and acc.grid_cells(grid) == acc.main_cells(grid), argv
    assert {c.source for c in acc.grid_cells(grid_of(acc, "--sources", "real", "--bits", "8"))} == {"real"}
    # the ablation's SPDFQ W4A4 cell is selected, or --ablations asks for it: it runs
    assert grid_of(acc, "--sources", "spdfq", "--bits", "4").ablations == ("baseline", "APA", "APA+MSR+SL")
    explicit = grid_of(acc, "--sources", "real", "--bits", "8", "--ablations", "APA")
    assert [(c.source, c.setting.name, c.variant) for c in acc.grid_cells(explicit)] == [
        ("real", "W8A8", None), ("spdfq", "W4A4", "APA")]


def test_a_source_asked_for_at_bits_its_grid_does_not_run_is_refused(acc):
    """--quick --sources psaq_v2 --bits 4,8 ran 0 cells and wrote an empty table (exit 0), and --bits 4 4,8 its W4A4
    cell only; without --sources the sources the quick grid restricts are just not run at those bits."""
    with pytest.raises(DFQViTError, match="runs PSAQ-ViT V2 only at W4A4, W8A8, not at W4A8"):
        grid_of(acc, "--sources", "psaq_v2", "--bits", "4,8")
    with pytest.raises(DFQViTError, match="runs DFQ-ViT only at W4A4, W8A8, W3A16, not at W4A8"):
        grid_of(acc, "--sources", "dfqvit", "gaussian", "--bits", "4,8")
    with pytest.raises(DFQViTError, match="PSAQ-ViT V2 only at W4A4, W8A8, not at W4A8"):  # ran W4A4 only, exit 0
        grid_of(acc, "--sources", "psaq_v2", "--bits", "4", "4,8")
    assert len(acc.grid_cells(grid_of(acc, "--sources", "psaq_v2", "--bits", "4", "8", "--seeds", "0"))) == 2
    assert {c.source for c in acc.grid_cells(grid_of(acc, "--bits", "4,8"))} == {"real", "gaussian", "psaq", "spdfq"}


def test_ablation_runs_outside_the_main_grid_stay_out_of_the_main_table(acc):
    """An ablation's APA+MSR+SL run, without SPDFQ W4A4 in the main grid, became an SPDFQ row of the main table."""
    grid = grid_of(acc, "--sources", "real", "--bits", "8", "--ablations", "baseline", "APA+MSR+SL")
    rows = [result(acc, "real", "W8A8", 0, 64.0), result(acc, "spdfq", "W4A4", 0, 55.0, "baseline"),
            result(acc, "spdfq", "W4A4", 0, 60.0, "APA+MSR+SL")]
    summary = acc.aggregate(rows, 65.0, grid.ablations, grid.ablation_seeds,
                            main_keys={c.key for c in acc.main_cells(grid)})
    assert set(summary["main"]) == {"fp32", "real"} and set(summary["main"]["fp32"]) == {"W8A8"}
    assert summary["ablation"]["APA+MSR+SL"]["values"] == [60.0]


# ------------------------------------------------------------------------------------------- aggregation


def result(acc, source, setting, seed, top1, variant=None):
    s = acc.parse_setting(setting)
    return acc.CellResult(source, s.name, s.w_bits, s.a_bits, s.softmax, seed, variant, top1, 90.0, 100,
                          0.0, False, 0.0, 0.0, 0.0)


def test_aggregate_mean_and_sample_std(acc):
    rows = [result(acc, "spdfq", "W4A4", seed, v, "APA+MSR+SL") for seed, v in enumerate((60.0, 62.0, 67.0))]
    rows += [result(acc, "gaussian", "W4A4", seed, v) for seed, v in enumerate((50.0, 50.0, 53.0))]
    rows += [result(acc, "gaussian", "W8A8", 0, 64.5), result(acc, "spdfq", "W4A4", 0, 55.0, "baseline")]
    summary = acc.aggregate(rows, fp32_top1=65.0, ablations=("baseline", "APA+MSR+SL"), ablation_seeds=(0,))
    spdfq = summary["main"]["spdfq"]["W4A4"]
    assert spdfq["mean"] == pytest.approx(63.0) and spdfq["n"] == 3
    assert spdfq["std"] == pytest.approx(np.std([60, 62, 67], ddof=1))
    assert summary["main"]["gaussian"]["W4A4"]["std"] == pytest.approx(np.sqrt(3.0))
    assert summary["main"]["gaussian"]["W8A8"] == {"mean": 64.5, "std": None, "n": 1, "values": [64.5]}
    assert summary["main"]["fp32"]["W8A8"]["mean"] == 65.0 and "baseline" not in str(summary["main"])
    # the ablation uses seed 0 only, so its full-SPDFQ row is the seed-0 run, not the 3-seed mean
    assert summary["ablation"]["APA+MSR+SL"]["values"] == [60.0]
    assert summary["ablation"]["baseline"]["mean"] == 55.0
    table = "\n".join(acc.main_table(summary, ["W4A4", "W8A8"]))
    assert "| SPDFQ | 63.00 ± 3.61 | – |" in table
    assert "| Gaussian noise | 51.00 ± 1.73 | 64.50 |" in table
    assert "| Full precision | 65.00 | 65.00 |" in table


def test_targets_and_paper_ordering(acc):
    def summary_of(values):
        rows = [result(acc, src, setting, 0, v) for (src, setting), v in values.items()]
        return acc.aggregate(rows, fp32_top1=65.0)

    good = summary_of({("real", "W4A4"): 64.0, ("spdfq", "W4A4"): 62.0, ("psaq", "W4A4"): 60.0,
                       ("gaussian", "W4A4"): 58.0, ("gaussian", "W8A8"): 64.5, ("psaq", "W8A8"): 64.2,
                       ("spdfq", "W8A8"): 65.3, ("dfqvit", "W8A8"): 64.0, ("psaq_v2", "W8A8"): 64.1,
                       ("psaq_v2", "W4A4"): 59.0})
    assert all(t["met"] for t in acc.check_targets(good))
    assert acc.paper_ordering(good)["W4A4"] == {"holds": True, "broken": []}
    swapped = summary_of({("real", "W4A4"): 64.0, ("spdfq", "W4A4"): 62.0, ("psaq", "W4A4"): 60.0,
                          ("gaussian", "W4A4"): 58.0, ("psaq_v2", "W4A4"): 61.0})
    assert acc.paper_ordering(swapped)["W4A4"]["broken"] == ["PSAQ-ViT > PSAQ-ViT V2"]

    bad = summary_of({("real", "W4A4"): 66.0, ("spdfq", "W4A4"): 62.5, ("psaq", "W4A4"): 63.0,
                      ("gaussian", "W4A4"): 62.0, ("gaussian", "W8A8"): 63.9})
    verdicts = {t["target"]: t["met"] for t in acc.check_targets(bad)}
    assert verdicts["W4A4: SPDFQ > PSAQ-ViT"] is False
    assert verdicts["W4A4: SPDFQ > Gaussian noise"] is True
    assert verdicts["W4A4: SPDFQ within 3 points of Real"] is False      # 3.5 points
    assert verdicts["W8A8: Gaussian noise within 1 point of full precision"] is False
    assert verdicts["W8A8: DFQ-ViT within 1 point of full precision"] is None  # not run
    assert verdicts["W8A8: PSAQ-ViT V2 within 1 point of full precision"] is None
    assert acc.paper_ordering(bad)["W4A4"]["broken"] == ["SPDFQ > PSAQ-ViT"]


# ------------------------------------------------------------------------------------------ end to end


def test_grid_on_tiny_model_writes_json_markdown_png(acc, tiny_files, tmp_path, capsys, monkeypatch):
    import dfqvit.synth as synth

    calls = []
    real_synthesize = synth.synthesize

    def counting(method, qmodel, *args, **kwargs):
        calls.append((method, qmodel.config.w_bits, qmodel.config.a_bits, kwargs["seed"]))
        return real_synthesize(method, qmodel, *args, **kwargs)

    monkeypatch.setattr(synth, "synthesize", counting)
    argv = args_for(tiny_files, tmp_path, "--quick", "--bits", "4", "8,8", "3,16", "--seeds", "0", "1",
                    "--ablations", "baseline", "APA+MSR+SL", "--synth-iters", "1", "--calib-images", "4",
                    "--limit", "20")
    assert acc.main(argv) == 0
    out = capsys.readouterr().out
    (json_path,) = tmp_path.glob("accuracy_quick_custom_cpu_*.json")
    report = json.loads(json_path.read_text())
    md = json_path.with_suffix(".md").read_text()
    png = json_path.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not list(tmp_path.glob("*.partial.json"))  # removed once the reports are written

    grid = report["grid"]
    assert grid["settings"] == ["W4A4", "W8A8", "W3A16"] and grid["seeds"] == [0, 1]
    assert grid["recon_iters"] == 0 and grid["eval_limit"] == 20 and grid["synth_iters"] == 1
    assert report["env"]["torch"] == torch.__version__ and report["env"]["device_type"] == "cpu"
    assert report["data"]["eval_images"] == 20
    main = report["summary"]["main"]
    # quick grid: DFQ-ViT only at W4A4, W8A8, W3A16 and PSAQ-ViT V2 at W4A4, W8A8 (their images depend on the bits)
    assert set(main["psaq_v2"]) == {"W4A4", "W8A8"}
    for source in ("fp32", "real", "gaussian", "psaq", "psaq_v2", "spdfq", "dfqvit"):
        assert set(main[source]) == ({"W4A4", "W8A8"} if source == "psaq_v2" else {"W4A4", "W8A8", "W3A16"}), source
        if source != "fp32":
            assert main[source]["W4A4"]["n"] == 2 and main[source]["W8A8"]["n"] == 1
            values = [c["top1"] for c in report["cells"] if c["source"] == source and c["setting"] == "W4A4"
                      and c["variant"] in (None, "APA+MSR+SL")]
            assert main[source]["W4A4"]["mean"] == pytest.approx(np.mean(values))
    assert set(report["summary"]["ablation"]) == {"baseline", "APA+MSR+SL"}
    assert report["summary"]["ablation"]["baseline"]["n"] == 1  # quick grid: ablation on the first seed
    # 5 sources x (2 W4A4 seeds + 2 columns) + PSAQ-ViT V2 (2 seeds + W8A8) + 1 ablation row (the full-SPDFQ one
    # is the SPDFQ row)
    assert len(report["cells"]) == 5 * 4 + 3 + 1
    assert all(0 <= c["top1"] <= 100 and c["images"] == 20 for c in report["cells"])

    # one synthesis per (method, seed, variant); DFQ-ViT once per bit width as well
    reused = {(c["source"], c["setting"], c["seed"]): c["synth_reused"] for c in report["cells"]
              if c["variant"] in (None, "APA+MSR+SL")}
    assert reused[("spdfq", "W8A8", 0)] and reused[("psaq", "W3A16", 0)] and reused[("real", "W8A8", 0)]
    assert not reused[("dfqvit", "W8A8", 0)] and not reused[("spdfq", "W4A4", 1)]
    methods = [c[0] for c in calls]
    assert methods.count("spdfq") == 3 and methods.count("psaq") == 2 and methods.count("gaussian") == 2
    assert sorted((b, s) for m, _, b, s in calls if m == "dfqvit") == [(4, 0), (4, 1), (8, 0), (16, 0)]
    assert sorted((b, s) for m, _, b, s in calls if m == "psaq_v2") == [(4, 0), (4, 1), (8, 0)]

    for label in ("Full precision", "Real", "Gaussian noise", "PSAQ-ViT", "PSAQ-ViT V2", "SPDFQ", "DFQ-ViT"):
        assert f"| {label} |" in md and f"| {label} |" in out
    assert "| method | W4A4 | W8A8 | W3A16 |" in md
    assert "±" in md and "Targets:" in md and "Device cpu" in md and "grid `quick_custom`" in md
    assert "|  |  |  |" in md  # the one-hot baseline row of the ablation
    assert len(report["targets"]) == 8 and "total" in out


def test_runner_evaluation_matches_dfqvit_evaluate(acc, tiny_files):
    import dfqvit
    from dfqvit.evaluate import evaluate
    from dfqvit.models.loading import load_model

    model, norm = load_model(str(tiny_files["model"]))
    spec = dfqvit.adapt(model, normalization=norm).input_spec
    eval_set = acc.load_eval_set(str(tiny_files["data"]), spec, limit=None)
    assert len(eval_set) == 30
    grid = acc.dataclasses.replace(acc.QUICK_GRID, calib_images=4)
    runner = acc.GridRunner(model, norm, grid, eval_set, batch_size=7, progress=False)
    qmodel = runner.quantize(acc.Cell("gaussian", acc.parse_setting("4"), 0),
                             runner.calibration_set(acc.Cell("gaussian", acc.parse_setting("4"), 0))[0])
    ours, theirs = runner.evaluate(qmodel), evaluate(qmodel, eval_set, 7, reference=model, progress=False)
    assert (ours.top1, ours.images, ours.agreement) == (theirs.top1, theirs.images, theirs.agreement)
    assert runner.evaluate(model).agreement == 100.0


def test_runner_scores_the_integer_engine_when_asked(acc, tiny_files):
    """--backend torch: each cell scores the engine built from the same calibration as the fake-quant cell, and
    the report says what it scored."""
    import dfqvit
    from dfqvit.models.loading import load_model

    model, norm = load_model(str(tiny_files["model"]))
    spec = dfqvit.adapt(model, normalization=norm).input_spec
    eval_set = acc.load_eval_set(str(tiny_files["data"]), spec, limit=None)
    grid = acc.dataclasses.replace(acc.QUICK_GRID, calib_images=4)
    cell = acc.Cell("gaussian", acc.parse_setting("8"), 0)
    fake, engine = (acc.GridRunner(model, norm, grid, eval_set, batch_size=7, progress=False, backend=backend)
                    .run_cell(cell) for backend in ("fake", "torch"))
    assert (fake.runs_on, engine.runs_on) == ("fake-quant", "torch")
    assert abs(fake.top1 - engine.top1) <= 100 / 30 + 1e-9, "W8A8 engine and fake-quant model differ on <= 1 image"
    cells = [acc.dataclasses.asdict(r) for r in (fake, engine)]
    assert acc._scored({"cells": cells[:1]}) == "fake-quant model"
    assert acc._scored({"cells": cells}) == "integer engine (torch)"


# --------------------------------------------------------------------------------------------------- errors


def test_missing_files_fail_with_clear_errors(acc, tiny_files, tmp_path, capsys):
    missing = str(tmp_path / "nope.npz")
    for flag, what in (("--data", "evaluation data"), ("--real", "real-image data"),
                       ("--model", "model description")):
        value = missing.replace(".npz", ".json") if flag == "--model" else missing
        argv = args_for(tiny_files, tmp_path, "--quick") + [flag, value]
        assert acc.main(argv) == 2
        err = capsys.readouterr().err
        assert what in err and "does not exist" in err
    with pytest.raises(CheckpointNotFoundError, match="checkpoint"):
        acc.run(acc.build_parser().parse_args(args_for(tiny_files, tmp_path, "--checkpoint", missing)))
    assert not list(tmp_path.glob("accuracy_*"))


def test_bad_arguments_fail_before_any_work(acc, tiny_files, tmp_path, capsys, monkeypatch):
    from dfqvit.kernels import native

    monkeypatch.setattr(native, "available", lambda: False)  # as on a machine without the built extension
    for extra, message in ((["--backend", "native"], "native CPU backend is unavailable"),
                           (["--bits", "4", "9"], "weight bits 9 not supported"),
                           (["--sources", "spdfq", "imagenet"], "unknown"),
                           (["--ablations", "APA+TV"], "unknown"),
                           (["--seeds", "1", "1"], "distinct"),
                           (["--limit", "0"], "--limit must be >= 1"),
                           (["--batch-size", "0"], "--batch-size must be >= 1"),  # was a raw range() error
                           # a file as --out: a raw FileExistsError after the fp32 evaluation
                           (["--out", str(tiny_files["data"])], "cannot make the folder (it or a folder above"),
                           (["--device", "tpu"], "device")):
        assert acc.main(args_for(tiny_files, tmp_path, "--quick", *extra)) == 2
        assert message in capsys.readouterr().err, extra
    if not torch.cuda.is_available():
        with pytest.raises(MissingGPUError, match="no CUDA device"):
            acc.resolve_device("cuda")
    assert not list(tmp_path.glob("accuracy_*"))


def test_too_few_real_images_is_a_calibration_error(acc, tiny_files, tmp_path, capsys):
    argv = args_for(tiny_files, tmp_path, "--quick", "--sources", "real", "--bits", "8", "--seeds", "0",
                    "--ablations", "--limit", "10")  # 32 calibration images wanted, the pack has 24
    assert acc.main(argv) == 2
    assert "holds 24 images; the grid needs 32" in capsys.readouterr().err


def test_a_run_in_the_same_second_leaves_the_other_runs_files_alone(acc, tiny_files, tmp_path, monkeypatch):
    """Both runs named their files by the second, so the later one overwrote the first one's reports and deleted
    its .partial.json; the JSON is strict (no NaN)."""
    monkeypatch.setattr(acc.time, "strftime", lambda fmt, *args: "20260101_000000")
    other = tmp_path / "accuracy_quick_custom_cpu_20260101_000000.partial.json"
    other.write_text('{"cells": ["another run, still going"]}')
    argv = args_for(tiny_files, tmp_path, "--quick", "--sources", "gaussian", "--bits", "8", "--seeds", "0",
                    "--ablations", "--synth-iters", "1", "--calib-images", "4", "--limit", "10")
    assert acc.main(argv) == 0
    assert other.read_text() == '{"cells": ["another run, still going"]}'
    ours = sorted(p.name for p in tmp_path.iterdir() if p != other)
    assert ours == [f"accuracy_quick_custom_cpu_20260101_000000-2.{ext}" for ext in ("json", "md", "png")]

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    report = json.loads((tmp_path / ours[0]).read_text(), parse_constant=refuse)
    assert [c["source"] for c in report["cells"]] == ["gaussian"] and report["grid"]["ablations"] == []
