"""Building blocks of the synthesis methods: GMM priors, MSR crops, soft labels, losses."""
import math

import pytest
import torch

from dfqvit.synth.labels import class_aware_eps, draw_classes, draw_labels, soft_target
from dfqvit.synth.losses import (
    apa_loss,
    attention_rows,
    patch_similarity_entropy,
    soft_cross_entropy,
    total_variation_l1,
    total_variation_l2,
    tv_loss,
    tv_target_scale,
)
from dfqvit.synth.msr import crop_and_resize, draw_crop_plan, grid_cells
from torch.distributions import MultivariateNormal

from dfqvit.synth.priors import (
    attention_priors,
    component_densities,
    draw_gmms,
    gmm_maps,
    grid_points,
    grid_shape,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- priors -------------------------------------------------------------------------------------------

def test_prior_shape_and_sum_is_one_minus_x():
    priors = attention_priors(200, (8, 8), 5, gen(), self_mass=True)
    assert priors.values.shape == (200, 64)
    assert (priors.values >= 0).all()
    assert torch.allclose(priors.values.double().sum(-1), 1 - priors.self_mass.double(), atol=1e-6)
    assert 0 < priors.self_mass.min() and priors.self_mass.max() < 1


def test_prior_without_class_token_sums_to_one():
    priors = attention_priors(50, (4, 4), 5, gen(), self_mass=False)
    assert (priors.self_mass == 0).all()
    assert torch.allclose(priors.values.sum(-1), torch.ones(50), atol=1e-5)


def test_prior_number_of_gaussians_uniform_in_1_to_k():
    _, ks = gmm_maps(2000, (8, 8), 5, gen())
    counts = torch.bincount(ks, minlength=6)
    assert counts[0] == 0 and ks.max() == 5
    assert (counts[1:] > 300).all()  # ~400 each for U{1..5}


def test_prior_map_is_the_max_of_its_k_gaussian_densities():
    """Eq. 8 against torch.distributions; every drawn Gaussian is a mode of the map (its own peak
    region), so the map has k modes."""
    k, means, cov = draw_gmms(50, 5, gen(1))
    points = grid_points((14, 14))
    maps = component_densities(points, k, means, cov)
    for i in range(50):
        expected = torch.stack([MultivariateNormal(means[i, j], cov[i, j]).log_prob(points).exp()
                                for j in range(int(k[i]))])
        assert torch.allclose(maps[i, :int(k[i])], expected, rtol=1e-9, atol=1e-300)
        assert (maps[i, int(k[i]):] == 0).all()
    # covariances: symmetric, eigenvalues in (0, 5] (supplementary code)
    evals = torch.linalg.eigvalsh(cov)
    assert (evals > 0).all() and (evals <= 5 + 1e-9).all()


def test_single_gaussian_priors_are_valid():
    single, k1 = gmm_maps(50, (8, 8), 1, gen(3))
    assert (k1 == 1).all() and torch.isfinite(single).all() and (single.sum(-1) > 0).all()


def test_priors_are_deterministic_under_a_seed():
    a = attention_priors(20, (8, 8), 5, gen(7))
    b = attention_priors(20, (8, 8), 5, gen(7))
    assert torch.equal(a.values, b.values) and torch.equal(a.num_gaussians, b.num_gaussians)


def test_grid_shape():
    assert grid_shape(196) == (14, 14)
    assert grid_shape(64) == (8, 8)
    assert grid_shape(32, aspect=0.5) == (4, 8)


# -- MSR ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k_msr,cells", [(4, 4), (2, 4), (1, 4), (5, 9), (9, 9)])
def test_msr_grid_cells_tile_the_image_without_overlap(k_msr, cells):
    boxes = grid_cells(30, 32, k_msr)
    assert len(boxes) == cells
    cover = torch.zeros(30, 32, dtype=torch.int64)
    for top, left, h, w in boxes:
        cover[top:top + h, left:left + w] += 1
    assert (cover == 1).all()


def test_msr_single_crop_is_a_quarter_not_the_whole_image():
    """METHODS §2.7: boxes are cells of a 2 x 2 grid (S/2 x S/2) for K_MSR <= 4, so K_MSR = 1 crops a quarter (a 1 x 1
    grid made the crop the whole image: a copy of the full image with the same class, MSR off in effect)."""
    plan = draw_crop_plan([1, 1], 32, 32, 1, gen())
    assert [box[2:] for box in plan.boxes.tolist()] == [[16, 16], [16, 16]]


def test_msr_crops_of_an_image_never_overlap():
    plan = draw_crop_plan([4, 3, 1, 2], 32, 32, 4, gen())
    assert len(plan) == 10
    for image in range(4):
        cover = torch.zeros(32, 32, dtype=torch.int64)
        for top, left, h, w in plan.boxes[plan.image_index == image].tolist():
            cover[top:top + h, left:left + w] += 1
        assert cover.max() == 1
        slots = plan.slot[plan.image_index == image].sort().values.tolist()
        assert slots == list(range(len(slots)))


def test_msr_gradient_reaches_only_its_patch():
    images = torch.randn(3, 3, 32, 32, requires_grad=True)
    plan = draw_crop_plan([4, 2, 1], 32, 32, 4, gen(3))
    crops = crop_and_resize(images, plan)
    assert crops.shape == (7, 3, 32, 32)
    for i in range(len(plan)):
        (grad,) = torch.autograd.grad(crops[i].square().sum(), images, retain_graph=True)
        top, left, h, w = plan.boxes[i].tolist()
        inside = torch.zeros_like(grad, dtype=torch.bool)
        inside[plan.image_index[i], :, top:top + h, left:left + w] = True
        assert (grad[~inside] == 0).all()
        assert (grad[inside] != 0).any()


def test_msr_crop_is_the_resized_box():
    images = torch.arange(16.0).view(1, 1, 4, 4).repeat(1, 3, 1, 1)
    plan = draw_crop_plan([1], 4, 4, 4, gen())
    top, left, h, w = plan.boxes[0].tolist()
    crop = crop_and_resize(images, plan)
    expected = torch.nn.functional.interpolate(images[:, :, top:top + h, left:left + w], size=(4, 4),
                                               mode="bilinear", align_corners=False)
    assert torch.equal(crop, expected)


# -- soft labels --------------------------------------------------------------------------------------

def test_soft_targets_sum_to_one_with_target_classes_largest():
    g = gen()
    classes = draw_classes([1, 2, 4, 3], 1000, g)
    for c in classes:
        assert len(set(c)) == len(c)
    for targets in classes:
        t = soft_target(targets, 1000, (5.0, 10.0), g)
        assert math.isclose(float(t.sum()), 1.0, rel_tol=1e-5)
        top = set(t.topk(len(targets)).indices.tolist())
        assert top == set(targets)


def test_label_plan_crops_carry_their_own_class():
    g = gen(5)
    classes = draw_classes([3, 1], 10, g)
    plan = draw_crop_plan([3, 1], 32, 32, 4, g)
    labels = draw_labels(classes, plan.image_index.tolist(), plan.slot.tolist(), 10, (5.0, 10.0), True, g)
    assert labels.image_targets.shape == (2, 10) and labels.crop_targets.shape == (4, 10)
    for i, (b, s) in enumerate(zip(plan.image_index.tolist(), plan.slot.tolist())):
        assert int(labels.crop_targets[i].argmax()) == classes[b][s]
    assert labels.main.tolist()[1] == classes[1][0]
    assert int(labels.main[0]) in classes[0]


def test_one_hot_labels_when_sl_is_off():
    g = gen()
    classes = draw_classes([2], 10, g)
    labels = draw_labels(classes, [0, 0], [0, 1], 10, (5.0, 10.0), False, g)
    assert labels.image_targets[0, classes[0][0]] == 1 and labels.image_targets.sum() == 1
    assert labels.crop_targets.argmax(-1).tolist() == classes[0]


def test_class_aware_eps_gives_the_1000_class_target_mass():
    g = gen()
    mass_1000 = torch.stack([soft_target([0], 1000, (5.0, 10.0), g)[0] for _ in range(400)]).mean()
    mass_10_paper = torch.stack([soft_target([0], 10, (5.0, 10.0), g)[0] for _ in range(400)]).mean()
    eps = class_aware_eps((5.0, 10.0), 10)
    mass_10_aware = torch.stack([soft_target([0], 10, eps, g)[0] for _ in range(400)]).mean()
    assert mass_10_paper > 0.95  # Pitfall 8: the paper's eps make SL one-hot at 10 classes
    assert abs(float(mass_10_aware - mass_1000)) < 0.05
    assert class_aware_eps((5.0, 10.0), 1000) == (5.0, 10.0)


# -- losses -------------------------------------------------------------------------------------------

def test_soft_cross_entropy_matches_cross_entropy_for_one_hot():
    logits = torch.randn(5, 10)
    labels = torch.tensor([1, 2, 3, 4, 5])
    one_hot = torch.nn.functional.one_hot(labels, 10).float()
    assert torch.allclose(soft_cross_entropy(logits, one_hot).mean(), torch.nn.functional.cross_entropy(logits, labels))


def test_total_variation_forms():
    flat = torch.ones(2, 3, 8, 8)
    assert float(total_variation_l2(flat)) == 0 and float(total_variation_l1(flat)) == 0
    ramp = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 1, 8, 8)
    assert math.isclose(float(total_variation_l1(ramp)), 1.0)
    # PSAQ form: |TV - v|
    x = torch.randn(2, 3, 8, 8)
    assert math.isclose(float(tv_loss(x, "psaq", 1.0)), abs(float(total_variation_l2(x)) - 1.0), rel_tol=1e-6)
    assert math.isclose(tv_target_scale(32, 224, 224), 1.0)
    assert math.isclose(tv_target_scale(32, 32, 32), 1 / 7)


def test_attention_rows_class_token_prefix_and_mean():
    probs = torch.rand(2, 3, 6, 6).softmax(-1)
    assert torch.equal(attention_rows(probs, 1), probs[:, :, 0, 1:])
    assert attention_rows(probs, 2).shape == (2, 3, 4)  # distilled DeiT skips both prefix keys
    assert torch.allclose(attention_rows(probs, 0), probs.mean(dim=2))  # Swin / no class token


def test_apa_loss_is_depth_weighted_mse():
    rows = [torch.rand(4, 3, 16), torch.rand(4, 3, 16)]
    priors = [torch.rand(4, 3, 16), torch.rand(4, 3, 16)]
    expected = sum(w * ((r - p) ** 2).mean(-1).mean(0).sum() for r, p, w in zip(rows, priors, (0.5, 1.0)))
    assert torch.allclose(apa_loss(rows, priors, (0.5, 1.0)), expected)
    assert float(apa_loss(priors, priors, (0.5, 1.0))) == 0


def test_patch_similarity_entropy_is_higher_for_diverse_patches():
    torch.manual_seed(0)
    same = torch.randn(2, 3, 1, 8).expand(2, 3, 17, 8).clone()     # all patches alike
    diverse = torch.randn(2, 3, 17, 8)
    h_same = patch_similarity_entropy(same, 2, 1)
    h_diverse = patch_similarity_entropy(diverse, 2, 1)
    assert torch.isfinite(h_same) and torch.isfinite(h_diverse)
    assert h_diverse > h_same
    # Swin: windows of an image are pooled into one density per image
    windows = torch.randn(2 * 4, 3, 16, 8)
    assert torch.isfinite(patch_similarity_entropy(windows, 2, 0))
