"""DFQ-ViT activation correction (METHODS §4.2): it lowers the gap between quantized and fp32 block
outputs; the diag form folds into the weights at zero inference cost, the full form is an explicit op."""
import copy

import pytest
import torch

from conftest import CALLER_STATES, TINY_MODELS, sqnr_db
from dfqvit.calib import calibrate_blockwise, correct_activations
from dfqvit.calib.correction import BranchCorrection, fit_diag, fit_diag_adam, fit_full
from dfqvit.config import CorrectionConfig, QuantConfig
from dfqvit.errors import CalibrationError
from dfqvit.models import adapt


def _images(n=32, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _calibrated(name, images):
    return calibrate_blockwise(adapt(TINY_MODELS[name](), QuantConfig(4, 4)), images, progress=False)


FORMS = {"diag": CorrectionConfig(form="diag"), "full": CorrectionConfig(form="full"),
         "diag_adam": CorrectionConfig(solver="adam")}


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("name", ["vit", "swin", "deit_distilled"])
def test_correction_lowers_the_gap_in_every_block(name, form):
    images = _images()
    qmodel = _calibrated(name, images)
    model = TINY_MODELS[name]()
    with torch.no_grad():
        before = sqnr_db(model(images), qmodel(images))
    gaps = correct_activations(qmodel, images, FORMS[form], progress=False)
    with torch.no_grad():
        after = sqnr_db(model(images), qmodel(images))
    print(name, form, [f"{g.before:.3g}->{g.after:.3g}" for g in gaps], f"logits {before:.2f}->{after:.2f} dB")
    assert len(gaps) == len(qmodel.blocks)
    assert all(g.after < g.before for g in gaps)
    assert after > before


@pytest.mark.parametrize("solver", ["closed_form", "adam"])
def test_diag_folds_at_zero_cost(solver):
    images = _images()
    qmodel = _calibrated("vit", images)
    keys = set(qmodel.state_dict())
    layers = [b.attn.proj for b in qmodel.blocks] + [b.mlp.fc2 for b in qmodel.blocks]
    codes = [layer.weight_quantizer.quantize(layer.weight) for layer in layers]
    correct_activations(qmodel, images, CorrectionConfig(form="diag", solver=solver), progress=False)
    assert set(qmodel.state_dict()) == keys, "no new parameters or ops"
    assert not any(isinstance(m, BranchCorrection) for m in qmodel.modules())
    for layer, before in zip(layers, codes):
        assert torch.equal(layer.weight_quantizer.quantize(layer.weight), before), "same integer codes"


def test_full_form_is_an_explicit_op():
    images = _images()
    qmodel = _calibrated("vit", images)
    correct_activations(qmodel, images, CorrectionConfig(form="full"), progress=False)
    assert sum(isinstance(m, BranchCorrection) for m in qmodel.modules()) == 2 * len(qmodel.blocks)


def test_closed_forms_recover_a_known_affine_map():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5000, 6, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2, 6, dtype=torch.float64)
    s_true = torch.tensor([0.7, 0.9, 1.0, 1.2, 1.5, 1.9], dtype=torch.float64)
    t_true = torch.linspace(-1, 1, 6, dtype=torch.float64)
    s, t = fit_diag(a, a * s_true + t_true, CorrectionConfig(shrinkage=0.0))
    assert torch.allclose(s, s_true) and torch.allclose(t, t_true)
    m_true = torch.eye(6, dtype=torch.float64) + 0.1 * torch.randn(6, 6, generator=g, dtype=torch.float64)
    m, t = fit_full(a, a @ m_true + t_true, CorrectionConfig(form="full", shrinkage=0.0))
    assert torch.allclose(m, m_true) and torch.allclose(t, t_true)
    s, _ = fit_diag(a, a * 5.0, CorrectionConfig())
    assert torch.all(s == 2.0), "scales are clamped to the configured range"


def test_adam_solver_converges_to_the_closed_form():
    """METHODS §4.2's Adam option minimises the diag form's loss: run long enough it lands on the closed form
    (shrinkage included), and its scales are clamped to the same range."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 6, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2, 6, dtype=torch.float64)
    r = a * torch.tensor([0.7, 0.9, 1.0, 1.2, 1.5, 1.9], dtype=torch.float64) + torch.linspace(-1, 1, 6,
                                                                                                dtype=torch.float64)
    r = r + 0.3 * torch.randn(2000, 6, generator=g, dtype=torch.float64)
    config = CorrectionConfig(solver="adam", adam_steps=3000, adam_lr=1e-2, shrinkage=0.05)
    s, t = fit_diag_adam(a, r, config, images=4)
    s_closed, t_closed = fit_diag(a, r, config)
    assert torch.allclose(s, s_closed, atol=1e-4) and torch.allclose(t, t_closed, atol=1e-4)
    s, _ = fit_diag_adam(a, a * 5.0, config, images=4)
    assert torch.all(s == 2.0)
    # the paper setting (200 steps of lr 1e-3) moves (s, t) from (1, 0) by about 0.2 at most
    s, t = fit_diag_adam(a, r, CorrectionConfig(solver="adam"), images=4)
    assert (s - 1).abs().max() <= 0.21 and t.abs().max() <= 0.21 and (s - 1).abs().max() > 0.1


def test_adam_solver_follows_the_curriculum():
    """On an easy -> hard set step k = 1..K uses the first ceil(n·(0.5 + 0.5·k/K)) images only: two steps on 8 images
    of 5 rows see images 0-5, then all 8 (checked against the same Adam steps written out)."""
    g = torch.Generator().manual_seed(1)
    a, r = (torch.randn(8 * 5, 3, generator=g, dtype=torch.float64) for _ in range(2))
    config = CorrectionConfig(solver="adam", adam_steps=2, shrinkage=0.0)
    s, t = (torch.tensor([1.0] * 3, dtype=torch.float64, requires_grad=True),
            torch.zeros(3, dtype=torch.float64, requires_grad=True))
    optimizer = torch.optim.Adam([s, t], lr=config.adam_lr)
    for rows in (30, 40):
        loss = (a[:rows] * s + t - r[:rows]).pow(2).mean(0).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    curriculum = fit_diag_adam(a, r, config, 8, curriculum=True)
    assert torch.equal(curriculum[0], s.detach()) and torch.equal(curriculum[1], t.detach())
    assert not torch.equal(fit_diag_adam(a, r, config, 8)[1], curriculum[1])


@pytest.mark.parametrize("bad", [dict(form="matrix"), dict(shrinkage=-1), dict(scale_range=(0, 2)),
                                 dict(scale_range=(1.2, 2)), dict(shrinkage=float("inf")),
                                 dict(scale_range=[0.5, float("inf")]), dict(solver="sgd"),
                                 dict(solver="adam", form="full"), dict(adam_steps=0), dict(adam_lr=0.0),
                                 dict(adam_steps=1.5)])
def test_correction_config_validation(bad):
    with pytest.raises(CalibrationError, match="invalid CorrectionConfig"):
        CorrectionConfig(**bad)


def test_a_constant_channel_gets_scale_one_without_shrinkage():
    """shrinkage=0 with a channel of zero variance gave s = 0 / 0: NaN weights after folding."""
    a = torch.randn(50, 4, dtype=torch.float64)
    a[:, 2] = 3.0
    r = a * 1.1 + 0.5
    s, t = fit_diag(a, r, CorrectionConfig(shrinkage=0.0))
    assert torch.isfinite(s).all() and float(s[2]) == 1.0 and torch.allclose(a * s + t, r)


def test_full_correction_from_one_distinct_image_warns():
    """One image (or copies of it): the C x C fit overfits (held-out cosine to fp32 0.08)."""
    qmodel = calibrate_blockwise(adapt(TINY_MODELS["vit"](depth=1), QuantConfig(8, 8)), _one_image_copies(),
                                 progress=False)
    with pytest.warns(UserWarning, match="fewer than 2 distinct calibration images"):
        correct_activations(qmodel, _one_image_copies(), CorrectionConfig(form="full"), progress=False)


def _one_image_copies():
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)).repeat(4, 1, 1, 1)


@pytest.mark.parametrize("solver", ["closed_form", "adam"])
@pytest.mark.parametrize("state", ["inference_mode", "autocast_bf16", "float64_default"])
def test_correction_called_directly_ignores_the_callers_torch_state(state, solver):
    """correct_activations is public: under a caller's bf16 autocast it fitted on bf16 branch outputs, under
    set_default_dtype(float64) it gave another model than the same call outside it, and the Adam solver failed
    under inference_mode ("element 0 of tensors does not require grad")."""
    model = TINY_MODELS["vit"](depth=1)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    calibrated = calibrate_blockwise(adapt(model, QuantConfig(4, 4)), images, progress=False)
    expected = copy.deepcopy(calibrated)
    config = CorrectionConfig(solver=solver, adam_steps=5)
    correct_activations(expected, images, config, progress=False)
    with CALLER_STATES[state]():
        correct_activations(calibrated, images, config, progress=False)
    for (name, a), b in zip(expected.state_dict().items(), calibrated.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
