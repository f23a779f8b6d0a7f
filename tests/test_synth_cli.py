"""``dfqvit synth`` logic (dfqvit/synth/cli.py) and the PNG grid."""
import argparse
import json

import pytest
import torch
from PIL import Image

import dfqvit
from conftest import tiny_vit
from dfqvit.errors import DFQViTError, MissingGPUError
from dfqvit.synth import SyntheticSet, synthesize
from dfqvit.synth.cli import add_synth_arguments, run_synth
from dfqvit.synth.grid import denormalize, image_label, save_grid

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616)


def write_model_json(folder):
    """A reference-model description (../shared/models format) of a tiny ViT."""
    from safetensors.torch import save_file

    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
    save_file(tiny_vit(**kwargs).state_dict(), str(folder / "tiny.safetensors"))
    meta = {"timm_module": "timm.models.vision_transformer", "timm_class": "VisionTransformer", "kwargs": kwargs,
            "files": ["tiny.safetensors"], "mean": list(MEAN), "std": list(STD)}
    path = folder / "tiny.json"
    path.write_text(json.dumps(meta))
    return str(path)


def parse(*argv):
    return add_synth_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_run_synth_writes_set_and_grid(tmp_path, capsys):
    spec = write_model_json(tmp_path)
    out, grid = tmp_path / "set.safetensors", tmp_path / "grid.png"
    args = parse("--model", spec, "--method", "spdfq", "--num-images", "3", "--iterations", "2", "--seed", "5",
                 "--out", str(out), "--grid", str(grid), "--device", "cpu", "--quiet",
                 "--class-names", ",".join(f"c{i}" for i in range(10)))
    assert run_synth(args) == 0
    loaded = SyntheticSet.load(str(out))
    assert loaded.images.shape == (3, 3, 32, 32) and loaded.method == "spdfq" and loaded.seed == 5
    assert loaded.config["_data"]["iterations"] == 2
    with Image.open(grid) as png:
        assert png.format == "PNG" and png.size[0] > 100
    assert "synthesized 3 spdfq images" in capsys.readouterr().out


def test_run_synth_needs_an_output(tmp_path):
    with pytest.raises(DFQViTError, match="--out"):
        run_synth(parse("--model", "unused.json"))


def test_run_synth_checks_its_outputs_before_synthesizing(tmp_path, monkeypatch):
    """--num-images 0 wrote an empty set, -2 raised a traceback; an --out in a missing folder, a --grid with an
    extension matplotlib does not write, or an --out not named .safetensors failed (or misled later) after the
    synthesis. All are refused first; a missing folder is created."""
    import dfqvit.synth.cli as synth_cli

    def synthesize_nothing(*args, **kwargs):
        raise AssertionError("the synthesis started")

    monkeypatch.setattr(synth_cli, "synthesize", synthesize_nothing)
    model = write_model_json(tmp_path)
    (tmp_path / "folder.safetensors").mkdir()
    for flags, message in [(["--num-images", "0", "--grid", "g.png"], "--num-images 0"),
                           (["--num-images", "-2", "--grid", "g.png"], "--num-images -2"),
                           (["--out", str(tmp_path / "set.npz")], "name it PATH.safetensors"),
                           (["--grid", str(tmp_path / "grid.txt")], "ending in one of .png"),
                           (["--out", str(tmp_path / "folder.safetensors")], "is a folder")]:
        with pytest.raises(DFQViTError, match=message):
            run_synth(parse("--model", model, *flags))
    with pytest.raises(AssertionError, match="synthesis started"):  # a new folder is fine: created, then on
        run_synth(parse("--model", model, "--out", str(tmp_path / "new" / "set.safetensors")))
    assert (tmp_path / "new").is_dir()


def test_run_synth_refuses_to_overwrite_its_inputs(tmp_path):
    """--out over the model's weights replaced them with a SyntheticSet, exit 0."""
    spec = write_model_json(tmp_path)
    weights = tmp_path / "tiny.safetensors"
    before = weights.read_bytes()
    for extra in ([], ["--checkpoint", str(weights)]):
        with pytest.raises(DFQViTError, match="--out and .*are the same file"):
            run_synth(parse("--model", spec, "--method", "gaussian", "--out", str(weights), *extra))
    assert weights.read_bytes() == before


def test_model_files_that_cannot_be_read_are_named(tmp_path):
    """A corrupt checkpoint, a list saved with torch.save and a JSON without weights gave raw tracebacks (or
    "checkpoint '' does not fit"); a safetensors file named .pth was unpickled."""
    from dfqvit.models.loading import load_model

    spec = write_model_json(tmp_path)
    renamed = tmp_path / "weights.pth"
    renamed.write_bytes((tmp_path / "tiny.safetensors").read_bytes())
    load_model(spec, str(renamed))  # read by its content
    (tmp_path / "bad.safetensors").write_bytes(b"\x01\x00")
    torch.save([1, 2], str(tmp_path / "list.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk" * 10)
    for name, message in (("bad.safetensors", "cannot be read"), ("list.pth", "holds a list, not a state dict"),
                          ("junk.pth", "cannot be read")):
        with pytest.raises(DFQViTError, match=f"{name}.*{message}"):
            load_model(spec, str(tmp_path / name))
    meta = json.loads(open(spec).read())
    meta["files"] = []
    (tmp_path / "none.json").write_text(json.dumps(meta))
    with pytest.raises(DFQViTError, match="lists no weight files"):
        load_model(str(tmp_path / "none.json"))


def test_run_synth_rejects_missing_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(MissingGPUError):
        run_synth(parse("--model", write_model_json(tmp_path), "--grid", str(tmp_path / "g.png"), "--device", "cuda"))
    with pytest.raises(DFQViTError, match="--device gpu: give cpu or cuda"):  # was torch's RuntimeError
        run_synth(parse("--model", write_model_json(tmp_path), "--grid", str(tmp_path / "g.png"), "--device", "gpu"))


def test_alpha_option_takes_numbers_and_names():
    assert parse("--model", "m", "--alpha-apa", "1e3").alpha_apa == 1000.0
    assert parse("--model", "m", "--alpha-apa", "deit_small").alpha_apa == "deit_small"


def test_save_grid_labels_and_denormalizes(tmp_path):
    qmodel = dfqvit.adapt(tiny_vit(), normalization=(MEAN, STD))
    result = synthesize("gaussian", qmodel, num_images=5, seed=0)
    path = tmp_path / "noise.png"
    save_grid(result, str(path), MEAN, STD)  # no targets: labels are indices
    with Image.open(path) as png:
        assert png.format == "PNG"
    pixels = denormalize(torch.zeros(1, 3, 2, 2), MEAN, STD)
    assert torch.allclose(pixels[0, :, 0, 0], torch.tensor(MEAN))
    assert image_label(3, 2, ["a", "b", "cat"]) == "#3: cat"
    assert image_label(3, 7, None) == "#3: class 7" and image_label(0, None, None) == "#0"


def test_run_synth_bits_reach_the_student_and_are_recorded(tmp_path):
    """psaq_v2 / dfqvit images are made against a quantized model: dfqvit synth had no --bits (always W4A4) and the
    set did not say which; a set used at other bits now warns. --bits on a method that ignores it is refused."""
    import warnings

    import dfqvit

    model = write_model_json(tmp_path)
    out = tmp_path / "v2.safetensors"
    assert run_synth(parse("--model", model, "--method", "psaq_v2", "--bits", "8", "--num-images", "2",
                           "--iterations", "1", "--out", str(out), "--device", "cpu", "--quiet")) == 0
    made = SyntheticSet.load(str(out))
    quant = made.config["quant"]
    assert (quant["w_bits"], quant["a_bits"], quant["softmax_quantizer"], quant["image_bits"]) == (8, 8, "log2", 8)
    from dfqvit.models.loading import load_model
    float_model, norm = load_model(model)
    settings = dict(calib=made, normalization=norm, recon=None, correction=None, progress=False, backend="fake")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dfqvit.compile(float_model, bits=8, **settings)
        assert not [w for w in caught if "were made against" in str(w.message)]
        dfqvit.compile(float_model, bits=4, **settings)
    assert any("made against a model quantized with a_bits=8, w_bits=8, and this one has a_bits=4, w_bits=4"
               in str(w.message) for w in caught)
    with pytest.raises(DFQViTError, match="--bits: the spdfq method does not read the quantized model"):
        run_synth(parse("--model", model, "--method", "spdfq", "--bits", "8", "--out", str(out)))
