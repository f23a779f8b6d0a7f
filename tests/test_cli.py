"""The dfqvit command line runs the same functions as the API and reports errors without a traceback."""
import json
import re

import pytest
import torch

from conftest import CIFAR_MODEL_JSON, CIFAR_TEST, load_cifar_model
from dfqvit.cli import main
from dfqvit.engine.backends import native_is_default


def test_quantize_and_eval_on_reference_model(tmp_path, capsys):
    load_cifar_model()  # skips when the reference model is absent
    report = tmp_path / "report.json"
    artifact = tmp_path / "w4a8.safetensors"
    rc = main(["quantize", "--model", str(CIFAR_MODEL_JSON), "--bits", "4,8", "--calib", "gaussian",
               "--calib-images", "16", "--recon-iters", "0", "--eval", str(CIFAR_TEST), "--limit", "100",
               "--report", str(report), "--out", str(artifact)])
    assert rc == 0
    data = json.loads(report.read_text())
    assert data["bits"] == [4, 8] and data["eval_images"] == 100 and data["recon_iters"] == 0
    assert data["calib_images"] == data["calib_images_used"] == 16
    assert 0 <= data["quant_top1"] <= 100 and data["top1_agreement"] >= 50
    engine = "native (isa=" if native_is_default() else "torch"  # --eval runs the integer engine by default
    assert data["eval_backend"].startswith(engine)
    assert "top-1 on 100 images" in capsys.readouterr().out
    rc = main(["eval", "--model", str(CIFAR_MODEL_JSON), "--data", str(CIFAR_TEST), "--limit", "50"])
    assert rc == 0 and "fp32 top-1" in capsys.readouterr().out
    # the saved artifact rebuilds the JSON-described model by itself and scores what quantize reported (the
    # engine's backends give the same logits bit for bit)
    rc = main(["eval", "--artifact", str(artifact), "--data", str(CIFAR_TEST), "--limit", "100"])
    out = capsys.readouterr().out
    assert rc == 0 and f"top-1: {data['quant_top1']:.2f}%" in out and engine in out
    rc = main(["eval", "--artifact", str(artifact), "--backend", "torch", "--data", str(CIFAR_TEST), "--limit", "100"])
    out = capsys.readouterr().out
    assert rc == 0 and "w4a8.safetensors, torch) top-1" in out and f"top-1: {data['quant_top1']:.2f}%" in out
    rc = main(["eval", "--artifact", str(artifact), "--backend", "fake", "--data", str(CIFAR_TEST), "--limit", "100"])
    assert rc == 0 and "fake-quant) top-1" in capsys.readouterr().out
    # options that cannot apply to a saved model are refused, not ignored
    assert main(["eval", "--artifact", str(artifact), "--bits", "4", "--data", str(CIFAR_TEST)]) == 2
    assert "--bits W4A4 does not match the artifact, which is W4A8" in capsys.readouterr().err  # said "(4, 4)"
    assert main(["eval", "--artifact", str(artifact), "--bits", "4,8", "--data", str(CIFAR_TEST), "--limit", "10"]) == 0
    assert main(["eval", "--artifact", str(artifact), "--model", str(CIFAR_MODEL_JSON), "--data", str(CIFAR_TEST)]) == 2
    assert main(["eval", "--model", str(CIFAR_MODEL_JSON), "--backend", "torch", "--data", str(CIFAR_TEST)]) == 2
    assert "--bits" in capsys.readouterr().err


def test_pipeline_flags_reach_compile(tmp_path, capsys):
    load_cifar_model()
    report = tmp_path / "report.json"
    rc = main(["quantize", "--model", str(CIFAR_MODEL_JSON), "--bits", "8", "--calib", "spdfq",
               "--calib-images", "4", "--synth-iters", "2", "--recon-iters", "1", "--correction", "full",
               "--stages-dir", str(tmp_path / "stages"), "--report", str(report)])
    assert rc == 0
    data = json.loads(report.read_text())
    assert (data["synth_iters"], data["recon_iters"], data["correction"]) == (2, 1, "full")
    assert any((tmp_path / "stages").iterdir()), "each stage is saved for resuming"
    assert main(["quantize", "--model", str(CIFAR_MODEL_JSON), "--recon-iters", "-1"]) == 2
    assert "--recon-iters" in capsys.readouterr().err


def test_eval_backend_is_checked_before_quantizing(monkeypatch, capsys):
    """`quantize --eval --backend native` without the native kernels stops before the calibration."""
    import dfqvit.cli
    from dfqvit.kernels import native

    load_cifar_model()
    monkeypatch.setattr(native, "available", lambda: False)

    def calibrate(*args, **kwargs):
        raise AssertionError("the calibration started")

    monkeypatch.setattr(dfqvit.cli, "_quantize", calibrate)
    rc = main(["quantize", "--model", str(CIFAR_MODEL_JSON), "--bits", "4,8", "--eval", str(CIFAR_TEST),
               "--backend", "native"])
    assert rc == 2 and "native CPU backend is unavailable" in capsys.readouterr().err


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "missing.json"), "--data", "x.npz"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["quantize", "--model", "vit_tiny_patch16_224", "--bits", "2"]) == 2
    assert "allowed" in capsys.readouterr().err
    assert main(["eval", "--data", "x.npz"]) == 2
    assert "--model" in capsys.readouterr().err


def test_bad_image_options_are_reported(tmp_path, capsys):
    """--limit 0 scored nothing and printed 0.00%; --batch-size 0 and a folder without images raised tracebacks."""
    load_cifar_model()
    base = ["eval", "--model", str(CIFAR_MODEL_JSON), "--data", str(CIFAR_TEST)]
    assert main(base + ["--limit", "0"]) == 2
    assert "limit=0: give at least 1 image" in capsys.readouterr().err
    assert main(base + ["--limit", "10", "--batch-size", "0"]) == 2
    assert "--batch-size 0: give a batch size of at least 1" in capsys.readouterr().err
    (tmp_path / "cat").mkdir()  # a class folder with no image in it
    assert main(["quantize", "--model", str(CIFAR_MODEL_JSON), "--calib", str(tmp_path), "--recon-iters", "0"]) == 2
    assert "cat' holds no .png" in capsys.readouterr().err


def test_quantize_checks_eval_data_and_outputs_before_calibrating(tmp_path, monkeypatch, capsys):
    """A missing --eval file, --limit 0, --batch-size 0 or an unwritable --out / --report stopped the command only
    after the calibration (about a minute on a CPU): now they stop it before."""
    import dfqvit.cli

    load_cifar_model()

    def calibrate(*args, **kwargs):
        raise AssertionError("the calibration started")

    monkeypatch.setattr(dfqvit.cli, "_quantize", calibrate)
    base = ["quantize", "--model", str(CIFAR_MODEL_JSON), "--bits", "4,8"]
    junk_folder = tmp_path / "images"
    (junk_folder / "cat").mkdir(parents=True)
    (junk_folder / "cat" / "junk.png").write_bytes(b"not an image")
    cases = [(["--eval", str(tmp_path / "missing.npz")], "does not exist"),
             (["--eval", str(CIFAR_TEST), "--limit", "0"], "limit=0"),
             (["--eval", str(CIFAR_TEST), "--batch-size", "0"], "--batch-size 0"),
             (["--out", str(tmp_path)], "--out .*is a folder"),
             (["--out", str(tmp_path / "model.pt")], "--out .*model.pt: .*name it .*model.safetensors"),
             (["--report", "/proc/no/such/report.json"], "--report .*cannot create its folder"),
             (["--limit", "10"], "--limit 10: no effect here .*--eval"),
             (["--backend", "torch"], "--backend torch: no effect here"),
             # the report overwrote the artifact (exit 0, the artifact truncated)
             (["--out", str(tmp_path / "a.safetensors"), "--report", str(tmp_path / "a.safetensors")],
              "--out and --report are the same file"),
             (["--report", str(CIFAR_MODEL_JSON)], "--report and --model are the same file"),
             # a file that is not an image: a raw PIL traceback after the whole quantization
             (["--eval", str(junk_folder)], "junk.png' cannot be read as an image")]
    for flags, message in cases:
        assert main(base + flags) == 2, flags
        assert re.search(message, capsys.readouterr().err), flags


def test_quantize_refuses_to_overwrite_the_model_weights(tmp_path, capsys):
    """--out over the weights a --model .json lists replaced them (exit 0); every later run failed to load."""
    from test_synth_cli import write_model_json

    spec = write_model_json(tmp_path)
    weights = tmp_path / "tiny.safetensors"
    before = weights.read_bytes()
    assert main(["quantize", "--model", spec, "--calib", "gaussian", "--out", str(weights)]) == 2
    assert "--out and the weights of --model (tiny.safetensors) are the same file" in capsys.readouterr().err
    assert weights.read_bytes() == before


def test_flags_that_would_change_nothing_are_refused(tmp_path, capsys):
    load_cifar_model()
    fp32 = ["eval", "--model", str(CIFAR_MODEL_JSON), "--data", str(CIFAR_TEST), "--limit", "10"]
    assert main(fp32 + ["--calib", "gaussian", "--synth-iters", "3"]) == 2
    err = capsys.readouterr().err
    assert "--calib gaussian, --synth-iters 3: no effect here" in err and "without --bits" in err
    quantize = ["quantize", "--model", str(CIFAR_MODEL_JSON)]
    # both had no effect; the report said --synth-iters was used
    assert main(quantize + ["--calib", str(CIFAR_TEST), "--calib-images", "4", "--synth-iters", "5"]) == 2
    assert "--synth-iters 5: no effect with --calib" in capsys.readouterr().err
    assert main(quantize + ["--bits", "4,16", "--softmax", "uniform"]) == 2
    assert "no effect at a_bits=16" in capsys.readouterr().err
    artifact = ["eval", "--artifact", str(tmp_path / "a.safetensors"), "--data", str(CIFAR_TEST)]
    assert main(artifact + ["--recon-iters", "7", "--correction", "full"]) == 2
    assert "quantized already" in capsys.readouterr().err


def test_paths_and_devices_that_are_not_there_are_named(tmp_path, capsys):
    load_cifar_model()
    base = ["quantize", "--model", str(CIFAR_MODEL_JSON), "--recon-iters", "0"]
    assert main(base + ["--calib", str(tmp_path / "missing.npz")]) == 2  # was "unknown calibration method"
    assert "no such file or folder" in capsys.readouterr().err
    assert main(base + ["--device", "gpu"]) == 2  # was a torch RuntimeError traceback
    assert "--device gpu: give cpu or cuda (or cuda:N)" in capsys.readouterr().err  # said device='gpu'
    (tmp_path / "stages").write_text("")
    assert main(base + ["--calib", "gaussian", "--stages-dir", str(tmp_path / "stages")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["eval", "--artifact", str(tmp_path), "--data", str(CIFAR_TEST)]) == 2
    assert "is a folder" in capsys.readouterr().err
    for device in ("gpu", "cuda") if not torch.cuda.is_available() else ("gpu",):  # the fp32 eval: raw errors
        assert main(["eval", "--model", str(CIFAR_MODEL_JSON), "--data", str(CIFAR_TEST), "--device", device]) == 2
        assert "device" in capsys.readouterr().err


def test_bad_bits_text_and_model_paths_are_named(tmp_path, capsys):
    """--bits abc named argparse's converter ("invalid _bits value"); a weights file or a missing path given as
    --model got timm's "looks like a Hugging Face Hub repo id" ValueError."""
    import pytest

    for text in ("abc", "a8", "w4a", "4,4,4"):  # a8 was read as W8A8 and w4a as W4A4
        with pytest.raises(SystemExit):
            main(["quantize", "--model", "vit_tiny_patch16_224", "--bits", text])
        assert f"'{text}': give 4 (= W4A4) or weight,activation bits" in capsys.readouterr().err
    from dfqvit.cli import _bits
    assert [_bits(t) for t in ("4", "4,8", "4/8", "w4a8", "W3A16")] == [4, (4, 8), (4, 8), (4, 8), (3, 16)]
    (tmp_path / "weights.pth").write_bytes(b"")
    for path, what in ((tmp_path / "weights.pth", "is a file"), (tmp_path / "nope.pth", "does not exist")):
        assert main(["quantize", "--model", str(path), "--bits", "4"]) == 2
        err = capsys.readouterr().err
        assert what in err and "--checkpoint" in err and "Traceback" not in err


def test_the_report_says_how_many_images_calibrated(tmp_path, capsys):
    """Calibrating on a source with fewer images than --calib-images warned, but the report kept the request."""
    import numpy as np
    import pytest

    load_cifar_model()
    pixels = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "four.npz", images=pixels, labels=np.zeros(4, dtype=np.int64))
    report = tmp_path / "report.json"
    with pytest.warns(UserWarning, match="calibrating on 4 images, fewer than calib_images=8"):
        assert main(["quantize", "--model", str(CIFAR_MODEL_JSON), "--calib", str(tmp_path / "four.npz"),
                     "--calib-images", "8", "--recon-iters", "0", "--correction", "none",
                     "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert (data["calib_images"], data["calib_images_used"]) == (8, 4)


def test_warnings_print_as_one_line_and_unsaved_models_are_mentioned(tmp_path, capsys):
    """A warning printed the console script's own line ("bin/dfqvit:8: UserWarning ... sys.exit(main())"); a
    quantization without --out ended without a word that nothing was kept."""
    import warnings

    from dfqvit.cli import _format_warning

    assert _format_warning(UserWarning("dfqvit: calibrating on 4 images"), UserWarning, "bin/dfqvit", 8) == \
        "dfqvit: warning: calibrating on 4 images\n"
    default = warnings.formatwarning
    load_cifar_model()
    assert main(["quantize", "--model", str(CIFAR_MODEL_JSON), "--calib", "gaussian", "--calib-images", "4",
                 "--recon-iters", "0", "--correction", "none"]) == 0
    assert "the quantized model is not saved (--out FILE.safetensors keeps it)" in capsys.readouterr().out
    assert warnings.formatwarning is default  # restored for whoever called main()


def test_device_errors_are_worded_as_the_flag(capsys):
    """The command line said "use device='cpu'" (the Python argument) for --device cuda without a GPU."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["quantize", "--model", str(CIFAR_MODEL_JSON), "--device", "cuda"]) == 2
    assert "--device cuda was requested but no CUDA device is available; use --device cpu" in capsys.readouterr().err


def test_correction_flag_values_map_to_configs():
    """--correction diag / diag-adam / full / none: the CorrectionConfig compile gets."""
    import argparse

    from dfqvit.cli import _pipeline_configs
    from dfqvit.config import CorrectionConfig

    def configs(value):
        return _pipeline_configs(argparse.Namespace(recon_iters=0, correction=value, stages_dir=None,
                                                    synth_iters=None))["correction"]

    assert configs("diag") == CorrectionConfig() and configs("full") == CorrectionConfig(form="full")
    assert configs("diag-adam") == CorrectionConfig(solver="adam") and configs("none") is None
