"""Two-stage block reconstruction: it lowers every block's output error versus calibration alone, trains
only the current block, and leaves LayerNorm and every scale / zero point frozen."""
import copy

import pytest
import torch

from conftest import TINY_MODELS
from dfqvit.calib import calibrate_blockwise, reconstruct
from dfqvit.calib.recon import batch_rows, learnable_parameters, train_unit
from dfqvit.calib.walk import float_unit_io, model_units, unit_input
from dfqvit.config import QuantConfig, ReconConfig
from dfqvit.errors import CalibrationError
from dfqvit.models import adapt
from dfqvit.synth import SyntheticSet, curriculum_prefix

# The paper's lr (4e-5) with few iterations keeps the test fast.
TEST_RECON = ReconConfig(iterations=15)


def _images(n=32, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def block_errors(qmodel, reference, images):
    """Per block: mean squared error between the quantized model's block output (quantized inputs) and
    the FP model's block output."""
    errors = {}
    for unit in model_units(qmodel):
        if not unit.is_block:
            continue
        _, target = float_unit_io(reference, unit, images)
        with torch.no_grad(), qmodel.quant_state(True, True):
            out = unit_input(qmodel, unit, images).run(unit.module(qmodel))
        errors[unit.name] = float((out - target).pow(2).mean())
    return errors


@pytest.mark.parametrize("name", ["vit", "deit_distilled"])
def test_reconstruction_lowers_every_block_error(name):
    model, images = TINY_MODELS[name](), _images()
    calibrated = calibrate_blockwise(adapt(model, QuantConfig(4, 4)), images, progress=False)
    reference = copy.deepcopy(calibrated)
    before = block_errors(calibrated, reference, images)
    reports = reconstruct(calibrated, images, TEST_RECON, reference=reference, progress=False)
    after = block_errors(calibrated, reference, images)
    print({k: f"{before[k]:.3g} -> {after[k]:.3g}" for k in before})
    assert all(after[k] < before[k] for k in before), (before, after)
    assert {r.stage for r in reports} == {1, 2} and all(r.after < r.before for r in reports)


def test_only_the_current_block_learns_and_lnorm_and_scales_stay_frozen():
    model, images = TINY_MODELS["swin"](), _images(8)
    qmodel = calibrate_blockwise(adapt(model, QuantConfig(4, 4)), images, progress=False)
    unit = model_units(qmodel)[0]
    block = unit.module(qmodel)
    learned = {id(p) for p in learnable_parameters(block)}
    assert any(p.shape[-1] == 2 and p.dim() == 2 for p in learnable_parameters(block)), \
        "Swin's relative-position bias table is learned"
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    inputs, target = float_unit_io(copy.deepcopy(qmodel), unit, images)
    with qmodel.quant_state(True, True):
        train_unit(block, inputs, target, TEST_RECON, torch.Generator().manual_seed(0))
    changed = {k for k, v in qmodel.state_dict().items() if not torch.equal(v, before[k])}
    params = dict(qmodel.named_parameters())
    assert changed, "the block's weights moved"
    assert all(k in params and id(params[k]) in learned for k in changed), sorted(changed)
    assert all(not p.requires_grad for p in qmodel.parameters())


def test_batch_larger_than_the_image_count_is_clipped():
    model, images = TINY_MODELS["vit"](), _images(4)
    qmodel = calibrate_blockwise(adapt(model, QuantConfig(8, 8)), images, progress=False)
    reports = reconstruct(qmodel, images, ReconConfig(iterations=2, batch_size=64), progress=False)
    assert len(reports) == 2 * 3  # 2 blocks + head, two stages


def test_weight_only_skips_stage_one():
    model, images = TINY_MODELS["vit"](), _images(8)
    qmodel = calibrate_blockwise(adapt(model, QuantConfig(4, 16)), images, progress=False)
    reports = reconstruct(qmodel, images, ReconConfig(iterations=2), progress=False)
    assert {r.stage for r in reports} == {2}


@pytest.mark.parametrize("bad", [dict(iterations=-1), dict(lr=0), dict(batch_size=0), dict(betas=(0.9, 1.0)),
                                 dict(lr=float("inf")), dict(weight_decay=float("nan")), dict(two_stage="no"),
                                 dict(curriculum="yes"), dict(curriculum=1)])
def test_recon_config_validation(bad):
    with pytest.raises(CalibrationError, match="invalid ReconConfig"):
        ReconConfig(**bad)


def test_a_unit_that_training_makes_worse_keeps_its_weights():
    """Adam's steps (~lr, 4e-5) dwarf weights of 1e-6: the head's loss rose from 6e-14 to 5e-6 and was kept (cosine
    to fp32 0.99 -> 0.10). Such a unit is given its weights back."""
    model = TINY_MODELS["vit"](depth=1)
    with torch.no_grad():
        model.head.weight.mul_(1e-4)
    images = _images(8)
    calibrated = calibrate_blockwise(adapt(model, QuantConfig(4, 8)), images, progress=False)
    reference = copy.deepcopy(calibrated)
    head_before = calibrated.model.head.weight.detach().clone()
    reports = reconstruct(calibrated, images, ReconConfig(iterations=2), reference=reference, progress=False)
    assert all(r.after <= r.before for r in reports)
    head_reports = [r for r in reports if r.unit == "head"]
    assert head_reports and all(r.after == r.before for r in head_reports)
    assert torch.equal(calibrated.model.head.weight, head_before)


def test_reconstruct_called_directly_ignores_the_callers_torch_state():
    """reconstruct is public: under a caller's inference_mode its cached block inputs were inference tensors, and
    under autocast it trained in bf16 (another model than the same call outside it)."""
    model, images = TINY_MODELS["vit"](depth=1), _images(8)
    calibrated = calibrate_blockwise(adapt(model, QuantConfig(4, 8)), images, progress=False)
    config = ReconConfig(iterations=3)
    expected = copy.deepcopy(calibrated)
    reconstruct(expected, images, config, progress=False)
    for state in (torch.inference_mode, torch.no_grad, lambda: torch.autocast("cpu", dtype=torch.bfloat16)):
        qmodel = copy.deepcopy(calibrated)
        with state():
            reconstruct(qmodel, images, config, progress=False)
        for (name, a), b in zip(expected.state_dict().items(), qmodel.state_dict().values()):
            assert torch.equal(a, b), (state, name)


# -- the easy -> hard curriculum (METHODS §4.1) -------------------------------------------------------

def test_curriculum_batches_grow_from_the_easy_front():
    """With the curriculum, step t = 1..T draws only from the first ceil(n·(0.5 + 0.5·t/T)) rows (the easy end of a
    dfqvit set): in the first steps the hard half is never drawn, later it is, and the last step draws
    from all of them (with t counted from 0 the last rows were never drawn at T <= n/2). Without it, the batches are
    exactly the uniform draws reconstruction always made."""
    n, batch, steps = 32, 8, 50
    seen_first, seen_last = set(), set()
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        rows = batch_rows(n, batch, step, steps, True, generator)
        assert rows.numel() == batch and rows.unique().numel() == batch
        assert int(rows.max()) < curriculum_prefix(n, step + 1, steps)
        (seen_first if step < 5 else seen_last).update(rows.tolist())
        assert torch.equal(batch_rows(n, batch, step, steps, False, torch.Generator().manual_seed(step)),
                           torch.randperm(n, generator=torch.Generator().manual_seed(step))[:batch])
    assert max(seen_first) < 19 < max(seen_last)
    # A prefix smaller than the batch gives the whole prefix: SPDFQ's setting (32 images, batch 32) starts on 17.
    assert sorted(batch_rows(32, 32, 0, 100, True, torch.Generator()).tolist()) == list(range(17))
    for n, steps in ((32, 10), (32, 2), (8, 3), (5, 1)):  # the last step's pool is the whole set
        assert batch_rows(n, n, steps - 1, steps, True, torch.Generator()).numel() == n


def _curriculum_runs(images, calibrated, **kwargs):
    qmodel = copy.deepcopy(calibrated)
    reconstruct(qmodel, images, ReconConfig(iterations=4, batch_size=4, **kwargs.pop("config", {})), progress=False,
                **kwargs)
    return qmodel.state_dict()


def test_reconstruct_uses_the_curriculum_for_an_easy_to_hard_set_only():
    """reconstruct turns the curriculum on for a dfqvit (easy -> hard) set or easy_to_hard=True; curriculum=True /
    False in the config overrides; any other set keeps uniform batches."""
    model, images = TINY_MODELS["vit"](depth=1), _images(8)
    calibrated = calibrate_blockwise(adapt(model, QuantConfig(4, 8)), images, progress=False)
    dfqvit_set = SyntheticSet(images=images, targets=None, method="dfqvit", seed=0)
    runs = {"uniform": _curriculum_runs(images, calibrated),
            "flag": _curriculum_runs(images, calibrated, easy_to_hard=True),
            "dfqvit_set": _curriculum_runs(dfqvit_set, calibrated),
            "spdfq_set": _curriculum_runs(SyntheticSet(images=images, targets=None, method="spdfq", seed=0),
                                          calibrated),
            "forced_on": _curriculum_runs(images, calibrated, config=dict(curriculum=True)),
            "forced_off": _curriculum_runs(dfqvit_set, calibrated, config=dict(curriculum=False))}

    def same(a, b):
        return all(torch.equal(runs[a][k], runs[b][k]) for k in runs[a])

    assert same("flag", "dfqvit_set") and same("flag", "forced_on")
    assert same("uniform", "spdfq_set") and same("uniform", "forced_off")
    assert not same("uniform", "flag")


def test_a_reordered_dfqvit_subset_is_not_easy_to_hard():
    """s[[3, 1]] or a reversed dfqvit set kept method="dfqvit", so reconstruct trained it hard-first; prefixes,
    increasing index lists and masks keep the order."""
    model, images = TINY_MODELS["vit"](depth=1), _images(8)
    calibrated = calibrate_blockwise(adapt(model, QuantConfig(4, 8)), images, progress=False)
    dfqvit_set = SyntheticSet(images=images, targets=None, method="dfqvit", seed=0)
    for kept in (dfqvit_set[:6], dfqvit_set[[0, 2, 5]], dfqvit_set[torch.arange(8) % 2 == 0], dfqvit_set[::2]):
        assert kept.ordered_easy_to_hard
    for reordered in (dfqvit_set[[3, 1]], dfqvit_set[[5, 5]], dfqvit_set[::-1], dfqvit_set[[-1, 0]]):
        assert not reordered.ordered_easy_to_hard and reordered.config["reordered"]
    assert torch.equal(dfqvit_set[::-1].images, images.flip(0))
    reversed_set = dfqvit_set[::-1]
    assert all(torch.equal(a, b) for a, b in zip(
        _curriculum_runs(reversed_set, calibrated).values(),
        _curriculum_runs(reversed_set.images, calibrated).values()))


def test_reconstruct_refuses_a_set_of_another_normalization():
    """compile refused a set synthesized for another mean / std; reconstruct given the set took it silently."""
    from dfqvit.synth import synthesize
    from dfqvit.config import SynthConfig

    model = TINY_MODELS["vit"](depth=1)
    made = synthesize("gaussian", adapt(model, normalization=((0.0,) * 3, (1.0,) * 3)), num_images=4,
                      config=SynthConfig(iterations=1), progress=False)
    qmodel = calibrate_blockwise(adapt(model, QuantConfig(4, 8)), made.images, progress=False)
    with pytest.raises(CalibrationError, match="normalized with mean"):
        reconstruct(qmodel, made, ReconConfig(iterations=1), progress=False)


def test_reconstruct_warns_on_a_set_made_for_other_quantization():
    """compile warned when a psaq_v2 / dfqvit set made against other bits calibrated a model; reconstruct given the
    set did not."""
    import warnings

    model, images = TINY_MODELS["vit"](depth=1), _images(4)
    made = SyntheticSet(images=images, targets=None, method="dfqvit", seed=0,
                        config={"quant": {"w_bits": 4, "a_bits": 4}})
    qmodel = calibrate_blockwise(adapt(model, QuantConfig(8, 8)), images, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reconstruct(qmodel, made, ReconConfig(iterations=1), progress=False)
    assert any("made against a model quantized with a_bits=4" in str(w.message) for w in caught)
