"""The compile pipeline: resumable stages (resume = straight run under one seed), settings-aware reuse,
the default data-free path, and SPDFQ beating Gaussian images at W4A4 on the CIFAR reference model."""
import os

import numpy as np
import pytest
import torch

import dfqvit
from dfqvit.config import SynthConfig
from conftest import CIFAR_TEST, TINY_MODELS, load_cifar_model
from dfqvit.calib.pipeline import run_pipeline
from dfqvit.calib.stages import STAGE_FILES
from dfqvit.config import CorrectionConfig, QuantConfig, ReconConfig
from dfqvit.errors import ArtifactError, DFQViTError
from dfqvit.synth import available_methods

FAST_RECON = ReconConfig(iterations=3)


def _x():
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _run(model, stages_dir, recon=FAST_RECON, correction=CorrectionConfig()):
    return run_pipeline(model, QuantConfig(4, 4), "gaussian", seed=3, progress=False, recon=recon,
                        correction=correction, stages_dir=stages_dir)


def test_resume_from_each_stage_equals_a_straight_run(tmp_path):
    model = TINY_MODELS["vit"]()
    straight = _run(model, None).qmodel
    folder = str(tmp_path / "stages")
    first = _run(model, folder)
    assert first.resumed_from is None and set(os.listdir(folder)) == set(STAGE_FILES.values())
    with torch.no_grad():
        expected = straight(_x())
        assert torch.equal(first.qmodel(_x()), expected)
    # Interrupted runs: the files of the stages after the last finished one are missing.
    for missing, resumed in ((("correct",), "recon"), (("recon", "correct"), "calib")):
        for stage in missing:
            os.remove(os.path.join(folder, STAGE_FILES[stage]))
        again = _run(model, folder)
        assert again.resumed_from == resumed
        with torch.no_grad():
            assert torch.equal(again.qmodel(_x()), expected), f"resumed after {resumed}"
    assert _run(model, folder).resumed_from == "correct"


def test_changed_settings_rerun_only_the_later_stages(tmp_path):
    model = TINY_MODELS["vit"]()
    folder = str(tmp_path / "stages")
    _run(model, folder)
    changed = _run(model, folder, recon=ReconConfig(iterations=4))
    assert changed.resumed_from == "calib" and changed.recon
    other_model = TINY_MODELS["vit"](depth=1)
    assert _run(other_model, folder).resumed_from is None, "another model's stage files are not reused"


def test_same_weights_in_another_structure_do_not_resume(tmp_path):
    """3 or 6 heads, token or average pooling: the same state dict, another model (its stages were resumed)."""
    folder = str(tmp_path / "stages")
    model = TINY_MODELS["vit"]()
    _run(model, folder, recon=None, correction=None)
    for overrides in ({"num_heads": 6}, {"global_pool": "avg", "fc_norm": False}):
        other = TINY_MODELS["vit"](**overrides)
        other.load_state_dict(model.state_dict())
        assert _run(other, folder, recon=None, correction=None).resumed_from is None, overrides


def test_a_dataloader_is_resumed_only_while_its_images_stay_the_same(tmp_path):
    """A DataLoader was fingerprinted by its id: changed images resumed the stale calibration."""
    folder, data = str(tmp_path / "stages"), _x()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=4)

    def run():
        return run_pipeline(TINY_MODELS["vit"](), QuantConfig(4, 4), loader, seed=3, progress=False, recon=None,
                            correction=None, stages_dir=folder)

    run()
    assert run().resumed_from == "calib"
    data.mul_(5)
    fresh = run()
    assert fresh.resumed_from is None
    straight = run_pipeline(TINY_MODELS["vit"](), QuantConfig(4, 4), data, seed=3, progress=False, recon=None,
                            correction=None)
    with torch.no_grad():
        assert torch.equal(fresh.qmodel(_x()), straight.qmodel(_x()))


def test_real_images_do_not_resume_another_models_stages(tmp_path):
    """Real-image stages were keyed on the images only: a model with other weights got the first model back."""
    folder = str(tmp_path / "stages")
    first = TINY_MODELS["vit"]()
    run_pipeline(first, QuantConfig(4, 4), _x(), progress=False, recon=None, correction=None, stages_dir=folder)
    other = TINY_MODELS["vit"]()
    with torch.no_grad():
        other.head.weight.mul_(-1)
    again = run_pipeline(other, QuantConfig(4, 4), _x(), progress=False, recon=None, correction=None,
                         stages_dir=folder)
    assert again.resumed_from is None


def test_stages_dir_under_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    _run(TINY_MODELS["vit"](), "~/stages", recon=None, correction=None)
    assert (tmp_path / "home" / "stages" / STAGE_FILES["calib"]).exists()
    assert not (tmp_path / "~").exists(), "a folder named '~' was made in the working directory"


def test_synthetic_images_are_not_reused_under_another_normalization_or_quantization(tmp_path):
    """Synthetic images live in the normalized input space: another normalization reloaded them unchanged."""
    model = TINY_MODELS["vit"]()
    folder = str(tmp_path / "stages")

    def run(norm, bits=(4, 4), calib="gaussian"):
        return run_pipeline(model, QuantConfig(*bits), calib, seed=3, progress=False, recon=None, correction=None,
                            normalization=norm, stages_dir=folder, synth=SynthConfig(iterations=1, groups=2))

    def synthesized_again(*args, **kwargs) -> bool:  # reused images are read, not written again
        path = os.path.join(folder, STAGE_FILES["synth"])
        before = open(path, "rb").read() if os.path.exists(path) else None
        run(*args, **kwargs)
        return open(path, "rb").read() != before

    assert synthesized_again(((0.5,) * 3, (0.5,) * 3))
    assert not synthesized_again(((0.5,) * 3, (0.5,) * 3))
    assert synthesized_again(((0.4,) * 3, (0.2,) * 3))
    assert not synthesized_again(((0.4,) * 3, (0.2,) * 3), bits=(8, 8)), "gaussian images do not read Q"
    assert synthesized_again(None, calib="dfqvit")
    assert synthesized_again(None, bits=(8, 8), calib="dfqvit"), "the dfqvit method's images read Q"


def test_a_damaged_stage_file_is_refused(tmp_path):
    model = TINY_MODELS["vit"]()
    folder = str(tmp_path / "stages")
    _run(model, folder, recon=None, correction=None)
    path = os.path.join(folder, STAGE_FILES["calib"])
    data = bytearray(open(path, "rb").read())
    data[-10] ^= 0xFF
    open(path, "wb").write(bytes(data))
    # it said "save it again", advice for an artifact, not for a stage file
    with pytest.raises(ArtifactError, match="stage file .*corrupted.*; delete it \\(or the stages folder\\) to run"):
        _run(model, folder, recon=None, correction=None)


def test_a_resumed_run_says_so(tmp_path, capsys):
    """With every stage reused no progress bar runs: the run printed nothing at all."""
    model = TINY_MODELS["vit"]()
    folder = str(tmp_path / "stages")
    _run(model, folder, recon=None, correction=None)
    run_pipeline(model, QuantConfig(4, 4), "gaussian", seed=3, progress=True, recon=None, correction=None,
                 stages_dir=folder)
    assert f"dfqvit: resumed after stage 'calib' from {os.path.join(folder, STAGE_FILES['calib'])}" in \
        capsys.readouterr().err


def test_stage_configs_are_type_checked():
    with pytest.raises(DFQViTError, match="recon must be"):
        dfqvit.compile(TINY_MODELS["vit"](), bits=4, calib="gaussian", recon={"iterations": 3}, progress=False)


@pytest.mark.skipif("spdfq" not in available_methods(), reason="the spdfq synthesis method is not registered yet")
def test_default_pipeline_runs_spdfq(tmp_path):
    from dfqvit.config import SynthConfig
    qmodel = dfqvit.compile(TINY_MODELS["vit"](), bits=4, synth=SynthConfig(iterations=2), recon=FAST_RECON,
                            stages_dir=str(tmp_path), progress=False)
    assert os.path.exists(tmp_path / STAGE_FILES["synth"])
    with torch.no_grad():
        assert torch.isfinite(qmodel(_x())).all()


# CPU-sized settings for the CIFAR comparison (see README "Calibration, reconstruction and artifacts").
CIFAR_SYNTH_ITERATIONS = 50
CIFAR_RECON = ReconConfig(iterations=20)
CIFAR_EVAL_IMAGES = 1000


@pytest.mark.slow  # about 2 minutes on 2 idle CPU cores
@pytest.mark.skipif("spdfq" not in available_methods(), reason="the spdfq synthesis method is not registered yet")
def test_cifar_w4a4_spdfq_beats_gaussian():
    from dfqvit.config import SynthConfig
    from dfqvit.data import load_images
    from dfqvit.evaluate import evaluate

    model, norm = load_cifar_model()
    if not CIFAR_TEST.exists():
        pytest.skip("CIFAR-10 test images not found")
    test = load_images(str(CIFAR_TEST), (32, 32), *norm, limit=CIFAR_EVAL_IMAGES)
    top1 = {}
    for method in ("gaussian", "spdfq"):
        qmodel = dfqvit.compile(model, bits=4, calib=method, normalization=norm, seed=0, progress=False,
                                synth=SynthConfig(iterations=CIFAR_SYNTH_ITERATIONS), recon=CIFAR_RECON)
        top1[method] = evaluate(qmodel, test, progress=False).top1
    print(f"W4A4 top-1 on {CIFAR_EVAL_IMAGES} CIFAR-10 test images: {top1}")
    assert top1["spdfq"] > top1["gaussian"]


def test_pipeline_uses_the_curriculum_on_an_easy_to_hard_set(tmp_path, monkeypatch):
    """compile / run_pipeline with dfqvit images (given, or read back from the stage files) draws the
    reconstruction's batches and the Adam correction's steps easy first (METHODS §4.1); other images keep uniform
    batches and all rows."""
    import dfqvit.calib.correction as correction
    import dfqvit.calib.recon as recon
    from dfqvit.synth import SyntheticSet

    seen, corrected = [], []
    batch_rows, fit = recon.batch_rows, correction.fit_diag_adam
    monkeypatch.setattr(recon, "batch_rows", lambda *args: seen.append(args[4]) or batch_rows(*args))
    monkeypatch.setattr(correction, "fit_diag_adam", lambda *args: corrected.append(args[4]) or fit(*args))
    model = TINY_MODELS["vit"](depth=1)
    adam = CorrectionConfig(solver="adam", adam_steps=2)
    for method, expected in (("dfqvit", True), ("spdfq", False), ("images", False)):
        seen.clear(), corrected.clear()
        calib = SyntheticSet(images=_x(), targets=None, method=method, seed=0)
        run_pipeline(model, QuantConfig(4, 4, calib_images=8), calib, progress=False, recon=FAST_RECON,
                     correction=adam, stages_dir=str(tmp_path / method))
        assert seen and set(seen) == {expected} and corrected and set(corrected) == {expected}, method
    for method, expected in (("dfqvit", True), ("gaussian", False)):
        for recon_config in (FAST_RECON, ReconConfig(iterations=2)):  # the second reads the saved images back
            seen.clear(), corrected.clear()
            run_pipeline(model, QuantConfig(4, 4, calib_images=4), method, progress=False, recon=recon_config,
                         correction=adam, stages_dir=str(tmp_path / "made"), synth=SynthConfig(iterations=1, groups=2))
            assert seen and set(seen) == {expected} and set(corrected) == {expected}, method


def test_a_stage_trained_with_the_curriculum_is_not_resumed_without_it(tmp_path):
    """The same images as a dfqvit set (curriculum on) and as a plain tensor (off) share the calibration stage, but
    the tensor run resumed the set run's reconstruction (its logits, not its own)."""
    from dfqvit.synth import SyntheticSet

    model, x = TINY_MODELS["vit"](depth=1), _x()
    kwargs = dict(progress=False, recon=ReconConfig(iterations=6, batch_size=2), correction=None)
    as_set = SyntheticSet(images=x, targets=None, method="dfqvit", seed=0)
    with_curriculum = run_pipeline(model, QuantConfig(4, 4, calib_images=8), as_set, stages_dir=str(tmp_path),
                                   **kwargs)
    resumed = run_pipeline(model, QuantConfig(4, 4, calib_images=8), x, stages_dir=str(tmp_path), **kwargs)
    fresh = run_pipeline(model, QuantConfig(4, 4, calib_images=8), x, **kwargs)
    assert resumed.resumed_from == "calib"
    probe = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(resumed.qmodel(probe), fresh.qmodel(probe))
        assert not torch.equal(resumed.qmodel(probe), with_curriculum.qmodel(probe))


def test_calib_as_images_and_labels_or_a_numpy_array():
    """calib=(images, labels) was read as a stream of two batches ("calibration images of different sizes"), and a
    numpy array as one of single images ("calibration loader yielded ndarray")."""
    model, x = TINY_MODELS["vit"](depth=1), _x()
    kwargs = dict(progress=False, recon=None, correction=None)
    expected = run_pipeline(model, QuantConfig(4, 4, calib_images=8), x, **kwargs).qmodel(x)
    class SizedStream(torch.utils.data.IterableDataset):  # a __len__ sent it to the map-style path: raw error
        def __len__(self):
            return 8

        def __iter__(self):
            return iter(x)

    for calib in ((x, torch.zeros(8, dtype=torch.long)), [x, torch.arange(8)], x.numpy(), (x.numpy(), np.arange(8)),
                  (x, list(range(8))), (list(x), list(range(8))), (list(x), torch.arange(8)), SizedStream(),
                  (x, list(torch.arange(8))), (x, [[0]] * 8)):
        assert torch.equal(run_pipeline(model, QuantConfig(4, 4, calib_images=8), calib, **kwargs).qmodel(x), expected)
