"""QuantArtifact: save -> load gives bit-identical outputs; truncated, corrupted, version-mismatched or
mismatching artifacts are refused with ArtifactError and nothing is loaded."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dfqvit
from conftest import TINY_MODELS, tiny_vit
from dfqvit.artifact import ARTIFACT_VERSION, QuantArtifact, set_build_info
from dfqvit.config import CorrectionConfig, ReconConfig
from dfqvit.errors import ArtifactError, CheckpointNotFoundError, DFQViTError

TINY_KWARGS = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
# The fake-quant model: these tests check that every tensor it needs survives the round trip
# (tests/test_api.py saves and loads the integer engine that dfqvit.compile returns by default).
FAST = dict(calib="gaussian", recon=ReconConfig(iterations=2), progress=False, backend="fake")


def _x(n=8):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A W4A4 tiny ViT that records its constructor arguments, compiled and saved once."""
    model = set_build_info(tiny_vit(), TINY_KWARGS)
    qmodel = dfqvit.compile(model, bits=4, **FAST)
    path = str(tmp_path_factory.mktemp("artifact") / "vit_w4a4.safetensors")
    dfqvit.save(qmodel, path)
    return qmodel, path


def test_round_trip_is_bit_exact_and_rebuilds_the_model(saved):
    qmodel, path = saved
    loaded = dfqvit.load(path, backend="fake")
    with torch.no_grad():
        assert torch.equal(qmodel(_x()), loaded(_x()))


def test_saving_the_same_model_twice_gives_the_same_bytes(saved, tmp_path):
    """safetensors writes its metadata in hash-map order: 10 saves of one model gave up to 7 different files
    (and hashes); the header is rewritten with sorted keys."""
    qmodel, path = saved
    copies = []
    for i in range(4):
        dfqvit.save(qmodel, str(tmp_path / f"copy{i}.safetensors"))
        copies.append((tmp_path / f"copy{i}.safetensors").read_bytes())
    assert all(c == copies[0] for c in copies) and copies[0] == open(path, "rb").read()
    assert torch.equal(dfqvit.load(str(tmp_path / "copy0.safetensors"), backend="fake")(_x()), qmodel(_x()))


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
@pytest.mark.parametrize("form", ["diag", "full"])
def test_round_trip_every_family_with_a_skeleton(tmp_path, name, form):
    qmodel = dfqvit.compile(TINY_MODELS[name](), bits=(4, 8), calib="gaussian", recon=None,
                            correction=CorrectionConfig(form=form), progress=False, backend="fake")
    dfqvit.save(qmodel, str(tmp_path / "a.safetensors"))
    loaded = dfqvit.load(str(tmp_path / "a.safetensors"), model=TINY_MODELS[name](), backend="fake")
    with torch.no_grad():
        assert torch.equal(qmodel(_x()), loaded(_x()))


def test_contents_integer_codes_scales_and_versions(saved):
    _, path = saved
    artifact = QuantArtifact.load(path)
    codes = artifact.tensors["blocks.0.attn.qkv.weight_codes"]
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert "blocks.0.attn.qkv.weight" not in artifact.tensors
    assert artifact.tensors["blocks.0.attn.qkv.weight_quantizer.scale"].shape == (3 * 48,)
    for key in ("blocks.0.attn.qkv.input_quantizer.scale", "blocks.0.attn.attn_quantizer.delta",
                "blocks.0.norm1.weight", "pos_embed", "cls_token", "head.bias"):
        assert key in artifact.tensors, key
    config = artifact.config
    assert set(config["versions"]) == {"dfqvit", "torch", "timm"}
    assert config["layers"]["head"]["w_bits"] == 4 and config["build"]["kwargs"] == TINY_KWARGS


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
def test_packed_codes_round_trip(bits, dtype):
    """Every code of a 3-/4-bit grid, unsigned [0, 2^b - 1] or signed [-2^(b-1), 2^(b-1) - 1], survives packing;
    K not a multiple of the packing group, and a conv's 4-d shape, included."""
    from dfqvit.artifact import PACKED_GROUP_K, PackedCodes

    low = -(2 ** (bits - 1)) if dtype == torch.int8 else 0
    gen = torch.Generator().manual_seed(bits)
    for shape in ((5, 77), (6, 3, 5, 5)):
        codes = torch.randint(low, low + 2 ** bits, shape, generator=gen).to(dtype)
        packed = PackedCodes.pack(codes, bits)
        rows, k = shape[0], codes[0].numel()
        group = PACKED_GROUP_K[bits]
        assert packed.data.nbytes == rows * -(-k // group) * group * bits // 8  # K padded to whole groups
        out = packed.unpack()
        assert out.dtype == dtype and torch.equal(out, codes)


def test_compact_artifact_saves_the_same_file_in_less_memory(saved, tmp_path):
    """What an engine keeps: 4-bit codes packed, the same file written, the same model built."""
    from dfqvit.artifact import PackedCodes

    qmodel, path = saved
    artifact = QuantArtifact.load(path)
    compact = artifact.compact()
    codes = [k for k in artifact.tensors if k.endswith(".weight_codes")]
    assert codes and all(isinstance(compact.tensors[k], PackedCodes) for k in codes)
    saved_bytes = sum(artifact.tensors[k].nbytes - compact.tensors[k].data.nbytes for k in codes)
    assert artifact.nbytes() - compact.nbytes() == saved_bytes > 0.3 * sum(artifact.tensors[k].nbytes for k in codes)
    compact.save(str(tmp_path / "again.safetensors"))
    _assert_same_artifact(artifact, QuantArtifact.load(str(tmp_path / "again.safetensors")))
    with torch.no_grad():
        assert torch.equal(compact.to_model().eval()(_x()), qmodel(_x()))
    engine = dfqvit.load(path, backend="torch")
    assert engine.artifact.nbytes() == compact.nbytes()
    dfqvit.save(engine, str(tmp_path / "engine.safetensors"))
    _assert_same_artifact(artifact, QuantArtifact.load(str(tmp_path / "engine.safetensors")))


def _assert_same_artifact(a: QuantArtifact, b: QuantArtifact) -> None:
    # Not the file bytes: safetensors writes its metadata in hash-map order, which varies between saves.
    assert a.config == b.config and a.tensors.keys() == b.tensors.keys()
    for key, tensor in a.tensors.items():
        assert tensor.dtype == b.tensors[key].dtype and torch.equal(tensor, b.tensors[key]), key


def _rewrite(path, out, tensors=None, **header_changes):
    with safe_open(path, framework="pt") as f:
        header = dict(f.metadata())
        stored = {k: f.get_tensor(k) for k in f.keys()}
    header.update(header_changes)
    save_file(tensors if tensors is not None else stored, out, metadata=header)


def test_corrupted_truncated_and_mismatched_files_are_refused(saved, tmp_path):
    _, path = saved
    data = open(path, "rb").read()
    corrupted = tmp_path / "corrupted.safetensors"
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF  # a byte of tensor data
    corrupted.write_bytes(bytes(flipped))
    with pytest.raises(ArtifactError, match="corrupted"):
        dfqvit.load(str(corrupted))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated"):
        dfqvit.load(str(truncated))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ArtifactError):
        dfqvit.load(str(garbage))
    newer = tmp_path / "newer.safetensors"
    _rewrite(path, str(newer), format_version=str(ARTIFACT_VERSION + 1))
    with pytest.raises(ArtifactError, match="version"):
        dfqvit.load(str(newer))
    other = tmp_path / "other.safetensors"
    _rewrite(path, str(other), format="dfqvit.SomethingElse")
    with pytest.raises(ArtifactError, match="not a dfqvit.QuantArtifact"):
        dfqvit.load(str(other))
    with pytest.raises(CheckpointNotFoundError):
        dfqvit.load(str(tmp_path / "missing.safetensors"))


def _edited(path, out, edit_config=None, edit_tensors=None):
    """``path`` rewritten with its JSON config and / or tensors edited, checksum recomputed (as a tool would)."""
    from dfqvit.artifact import write_container, ARTIFACT_FORMAT

    artifact = QuantArtifact.load(path)
    config, tensors = json.loads(json.dumps(artifact.config)), dict(artifact.tensors)
    (edit_config or (lambda c: None))(config)
    (edit_tensors or (lambda t: None))(tensors)
    write_container(out, tensors, ARTIFACT_FORMAT, ARTIFACT_VERSION, config)
    return out


def _first_layer(config):
    return next(iter(config["layers"].values()))


@pytest.mark.parametrize("edit, message", [
    # an edited layer table re-packed the 4-bit codes at 3 bits on the next save (logits moved by 0.25)
    (dict(edit_config=lambda c: _first_layer(c).update(w_bits=3)), "layer table says"),
    (dict(edit_tensors=lambda t: t.update({"blocks.0.attn.qkv.weight_codes": t["blocks.0.attn.qkv.weight_codes"]
                                           .clone().fill_(100)})), "codes from 100 to 100, outside 4-bit"),
    (dict(edit_tensors=lambda t: t["blocks.0.attn.qkv.input_quantizer.scale"].fill_(float("nan"))),
     "input_quantizer.scale: not finite"),  # loaded silently
    (dict(edit_tensors=lambda t: t["blocks.0.attn.qkv.input_quantizer.scale"].fill_(-0.5)),
     "input_quantizer.scale: not finite and > 0"),  # a raw RuntimeError of the native grid check
    (dict(edit_config=lambda c: c["build"]["kwargs"].update(future_option=1)), "installed timm cannot build"),
    (dict(edit_config=lambda c: c.update(build=None)), "build record is NoneType"),
    (dict(edit_config=lambda c: c.update(full_corrections=[{"site": "blocks.7.mlp", "channels": 48}])),
     "activation corrections do not fit"),
])
def test_edited_artifacts_are_refused(saved, tmp_path, edit, message):
    """The checksum covers the tensors only; the JSON and the values themselves are checked on load."""
    _, path = saved
    edited = _edited(path, str(tmp_path / "edited.safetensors"), **edit)
    with pytest.raises(ArtifactError, match=message):
        dfqvit.load(edited, backend="fake")


def test_wrong_architecture_is_refused(saved):
    _, path = saved
    with pytest.raises(ArtifactError, match="does not fit|layers"):
        dfqvit.load(path, model=tiny_vit(embed_dim=24))
    with pytest.raises(ArtifactError, match=r"quantizes 9 layers, the model has 5: only in the artifact "
                                            r"\['blocks.1.attn.proj', .*only in the model \[\]"):
        dfqvit.load(path, model=tiny_vit(depth=1))


def test_settings_the_build_record_does_not_keep_are_not_lost(tmp_path):
    """timm.create_model(name, num_heads=6): the record keeps the timm name, num_classes and img_size, so the
    rebuilt model had 3 heads and the same tensor shapes, and loaded silently as another model (logits cosine
    0.998; avg pooling loaded as token pooling: 0.43). Now the artifact keeps each module's settings: save warns,
    load without a model refuses and says why, and a model built the same way loads bit for bit."""
    import timm

    def build(**overrides):
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10,
                                 **overrides).eval()

    qmodel = dfqvit.compile(build(num_heads=6), bits=8, calib="gaussian", recon=None, correction=None,
                            progress=False, backend="fake")
    path = str(tmp_path / "heads6.safetensors")
    with pytest.warns(UserWarning, match="num_heads: 6 saved vs 3.*dfqvit.load will need model="):
        dfqvit.save(qmodel, path)
    with pytest.raises(ArtifactError, match="rebuilt from the artifact's record.*num_heads: 6 saved vs 3"):
        dfqvit.load(path, backend="fake")
    with pytest.raises(ArtifactError, match="model passed is not built like.*num_heads: 6 saved vs 3"):
        dfqvit.load(path, model=build(), backend="fake")
    loaded = dfqvit.load(path, model=build(num_heads=6), backend="fake")
    with torch.no_grad():
        assert torch.equal(loaded(_x()), qmodel(_x()))

    pooled = dfqvit.compile(build(global_pool="avg", fc_norm=False), bits=8, calib="gaussian", recon=None,
                            correction=None, progress=False, backend="fake")
    with pytest.warns(UserWarning, match="global_pool: 'avg' saved vs 'token'"):
        dfqvit.save(pooled, path)
    with pytest.raises(ArtifactError, match="global_pool: 'avg' saved vs 'token'"):
        dfqvit.load(path, backend="fake")


def test_a_model_built_as_recorded_saves_without_warning_and_old_artifacts_still_load(saved, tmp_path):
    import warnings

    qmodel, path = saved
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dfqvit.save(qmodel, str(tmp_path / "again.safetensors"))
    # Artifacts written before the settings were recorded load as before (unchecked).
    with safe_open(path, framework="pt") as f:
        config = json.loads(f.metadata()["config"])
    del config["structure"]
    config["quant_config"]["_data"]["calib_batch_size"] = 32  # a retired field (it never changed a result)
    old = str(tmp_path / "old.safetensors")
    _rewrite(path, old, config=json.dumps(config))
    with torch.no_grad():
        assert torch.equal(dfqvit.load(old, backend="fake")(_x()), qmodel(_x()))


def test_home_paths_and_file_permissions(saved, tmp_path, monkeypatch):
    """"~/..." is the home folder (it used to create a folder named "~" in the working directory), and a saved
    file takes the usual permissions of new files (the temporary file it is renamed from made it owner-only)."""
    qmodel, _ = saved
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    previous = os.umask(0o022)
    try:
        dfqvit.save(qmodel, "~/models/w4a4.safetensors")
    finally:
        os.umask(previous)
    path = tmp_path / "models" / "w4a4.safetensors"
    assert path.exists() and not (tmp_path / "~").exists()
    assert (path.stat().st_mode & 0o777) == 0o644
    with torch.no_grad():
        assert torch.equal(dfqvit.load("~/models/w4a4.safetensors", backend="fake")(_x()), qmodel(_x()))


def test_saving_to_a_folder_names_the_file_to_give(saved, tmp_path):
    qmodel, _ = saved
    with pytest.raises(DFQViTError, match="is a folder; give the file to write, e.g. .*model.safetensors"):
        dfqvit.save(qmodel, str(tmp_path))
    assert not os.listdir(tmp_path) and not [f for f in os.listdir(tmp_path.parent) if f.startswith(".tmp-")]



def test_a_path_that_cannot_be_written_is_named_not_its_temporary_file(saved, tmp_path, monkeypatch):
    """Saving into an unwritable folder raised PermissionError naming '.tmp-xxxx.safetensors'. (The tests run as
    root, which writes anywhere: a parent that is a file, and a failing write, stand in for it.)"""
    qmodel, _ = saved
    (tmp_path / "file").write_text("")
    with pytest.raises(DFQViTError, match=r"cannot write '.*file/w4a4.safetensors': a part of its folder is a file"):
        dfqvit.save(qmodel, str(tmp_path / "file" / "w4a4.safetensors"))

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("safetensors.torch.save_file", refused)
    with pytest.raises(DFQViTError, match=r"cannot write '.*w4a4.safetensors': Permission denied .*folder you can"):
        dfqvit.save(qmodel, str(tmp_path / "w4a4.safetensors"))
    assert sorted(os.listdir(tmp_path)) == ["file"]  # no temporary file left

def test_a_model_without_build_info_needs_a_skeleton(tmp_path):
    qmodel = dfqvit.compile(tiny_vit(), bits=8, calib="gaussian", recon=None, correction=None, progress=False)
    dfqvit.save(qmodel, str(tmp_path / "a.safetensors"))
    with pytest.raises(ArtifactError, match="model="):
        dfqvit.load(str(tmp_path / "a.safetensors"))


def test_uncalibrated_model_cannot_be_saved(tmp_path):
    with pytest.raises(ArtifactError, match="uncalibrated"):
        dfqvit.save(dfqvit.adapt(tiny_vit()), str(tmp_path / "a.safetensors"))
    assert not os.listdir(tmp_path), "nothing written"


def test_config_json_is_plain_json(saved):
    _, path = saved
    with safe_open(path, framework="pt") as f:
        json.loads(f.metadata()["config"])


def test_a_config_saved_before_image_bits_reads_as_it_ran():
    """A quantized patch embedding's image is quantized at image_bits (8, RepQ); configs saved before the field
    quantized it at a_bits, and read back so (their artifacts keep their image grids)."""
    from dfqvit.config import QuantConfig, config_from_dict
    from dfqvit.errors import UnsupportedBitsError

    payload = QuantConfig(4, 4, quantize_patch_embed=True).to_dict()
    del payload["_data"]["image_bits"]
    assert config_from_dict(payload) == QuantConfig(4, 4, quantize_patch_embed=True, image_bits=4)
    payload = QuantConfig(4, 16).to_dict()
    del payload["_data"]["image_bits"]
    assert config_from_dict(payload).image_bits == 8  # no image quantizer at A16 anyway
    for bad in (3, 16, 8.5, "8"):
        with pytest.raises(UnsupportedBitsError, match="image_bits"):
            QuantConfig(image_bits=bad)


def test_an_a16_config_saved_with_the_uniform_softmax_still_reads():
    """Older dfqvit saved QuantConfig(a_bits=16, softmax_quantizer='uniform') (no effect at A16); refused for new
    configs since, it must still load from artifacts and stage files, as log2."""
    from dfqvit.config import QuantConfig, config_from_dict

    payload = QuantConfig(4, 16).to_dict()
    payload["_data"]["softmax_quantizer"] = "uniform"
    assert config_from_dict(payload) == QuantConfig(4, 16)
    with pytest.raises(DFQViTError, match="no effect at a_bits=16"):
        QuantConfig(4, 16, softmax_quantizer="uniform")
