"""The dfqvit command line runs the same functions as the API and reports errors without a traceback."""
import json

from conftest import CIFAR_MODEL_JSON, CIFAR_TEST, load_cifar_model
from dfqvit.cli import main


def test_quantize_and_eval_on_reference_model(tmp_path, capsys):
    load_cifar_model()  # skips when the reference model is absent
    report = tmp_path / "report.json"
    rc = main(["quantize", "--model", str(CIFAR_MODEL_JSON), "--bits", "4,8", "--calib", "gaussian",
               "--calib-images", "16", "--eval", str(CIFAR_TEST), "--limit", "100", "--report", str(report)])
    assert rc == 0
    data = json.loads(report.read_text())
    assert data["bits"] == [4, 8] and data["eval_images"] == 100
    assert 0 <= data["quant_top1"] <= 100 and data["top1_agreement"] >= 50
    assert "top-1 on 100 images" in capsys.readouterr().out
    rc = main(["eval", "--model", str(CIFAR_MODEL_JSON), "--data", str(CIFAR_TEST), "--limit", "50"])
    assert rc == 0 and "fp32 top-1" in capsys.readouterr().out


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "missing.json"), "--data", "x.npz"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["quantize", "--model", "vit_tiny_patch16_224", "--bits", "2"]) == 2
    assert "allowed" in capsys.readouterr().err
