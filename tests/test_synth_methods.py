"""The synthesis methods end to end on tiny timm models: shapes, targets, determinism, each loss
term going down, the Swin / no-class-token / distilled paths, the easy-to-hard method and errors."""
import dataclasses

import pytest
import torch

import dfqvit
from conftest import TINY_MODELS, tiny_vit
from dfqvit.config import ALPHA_APA_BY_MODEL, DEFAULT_ALPHA_APA, SynthConfig, config_from_dict
from dfqvit.errors import CalibrationError, DFQViTError
from dfqvit.synth import SyntheticSet, available_methods, curriculum_prefix, synthesize
from dfqvit.synth.common import gaussian_init
from dfqvit.synth.layout import probe_layout
from dfqvit.synth.loop import LossTerm, cosine_lr, optimize_images, round_lengths
from dfqvit.synth.progressive import group_level, group_sizes
from dfqvit.synth.spdfq import SPDFQObjective, apa_blocks, draw_plan, spdfq_hardness

NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
FAST = SynthConfig(iterations=4)


def qmodel_of(name="vit"):
    return dfqvit.adapt(TINY_MODELS[name](), normalization=NORM)


def sharp_timm_vit():
    """Tiny timm ViT whose attention depends strongly on the input (random init is nearly uniform)."""
    model = tiny_vit(depth=4)
    for block in model.blocks:
        block.attn.qkv.weight.data *= 4
    return model


def sharp_vit(config=None):
    return dfqvit.adapt(sharp_timm_vit(), config, normalization=NORM)


def test_all_methods_are_registered():
    assert {"gaussian", "psaq", "psaq_v2", "spdfq", "dfqvit"} <= set(available_methods())


# dfqvit runs the spdfq objective per group; its own cost is the adversary's calibration, so it is
# run on one family with and one without a class token.
METHOD_FAMILY = [(m, f) for m in ("psaq", "spdfq") for f in sorted(TINY_MODELS)] + [("dfqvit", "vit"),
                                                                                  ("dfqvit", "swin")]


@pytest.mark.parametrize("method,family", METHOD_FAMILY)
def test_method_runs_on_every_family(method, family):
    qmodel = qmodel_of(family)
    result = synthesize(method, qmodel, num_images=3, seed=0, config=FAST, progress=False)
    spec = qmodel.input_spec
    assert result.images.shape == (3, spec.channels, spec.height, spec.width)
    assert result.targets.shape == (3,) and result.targets.dtype == torch.int64
    assert ((0 <= result.targets) & (result.targets < 10)).all()
    assert torch.isfinite(result.images).all()
    low = (0 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    high = (1 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    assert (result.images >= low.view(1, -1, 1, 1) - 1e-6).all()
    assert (result.images <= high.view(1, -1, 1, 1) + 1e-6).all()
    assert config_from_dict(result.config) == FAST
    assert result.method == method and result.seed == 0


@pytest.mark.parametrize("method", ["psaq", "psaq_v2", "spdfq", "dfqvit"])
def test_same_seed_gives_identical_images(method):
    qmodel = qmodel_of("vit")
    a = synthesize(method, qmodel, num_images=3, seed=11, config=FAST, progress=False)
    b = synthesize(method, qmodel, num_images=3, seed=11, config=FAST, progress=False)
    c = synthesize(method, qmodel, num_images=3, seed=12, config=FAST, progress=False)
    assert torch.equal(a.images, b.images) and (a.targets is None or torch.equal(a.targets, b.targets))
    assert not torch.equal(a.images, c.images)


def test_callers_global_state_does_not_change_the_images():
    """synthesize under inference_mode raised "Inference tensors cannot be saved for backward", under a float64
    default dtype "Input type (double) and bias type (float)", and under autocast it made other images."""
    qmodel = qmodel_of("vit")

    def images():
        return synthesize("psaq", qmodel, num_images=2, seed=3, config=FAST, progress=False).images

    expected = images()
    with torch.inference_mode():
        assert torch.equal(images(), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(images(), expected)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert torch.equal(images(), expected)
        assert torch.get_default_dtype() == torch.float64  # the caller's default is given back
    finally:
        torch.set_default_dtype(previous)
    for seed in (2 ** 64, -(2 ** 70)):  # was numpy's "Overflow when unpacking long long"
        with pytest.raises(CalibrationError, match="from -2\\*\\*63 to 2\\*\\*64 - 1"):
            synthesize("gaussian", qmodel, num_images=2, seed=seed)


def test_a_set_made_for_another_normalization_is_refused(tmp_path):
    """Images live in the model's normalized input space: a set made under another mean / std was used silently."""
    images = synthesize("gaussian", qmodel_of("vit"), num_images=4, seed=0)
    assert images.config["normalization"] == {"mean": list(NORM[0]), "std": list(NORM[1])}
    path = str(tmp_path / "set.safetensors")
    images.save(path)
    kwargs = dict(bits=8, recon=None, correction=None, progress=False, backend="fake")
    dfqvit.compile(TINY_MODELS["vit"](), calib=SyntheticSet.load(path), normalization=NORM, **kwargs)
    with pytest.raises(CalibrationError, match="made for inputs normalized with mean \\(0.5, 0.5, 0.5\\)"):
        dfqvit.compile(TINY_MODELS["vit"](), calib=SyntheticSet.load(path), **kwargs)  # ImageNet's mean / std


def test_synthetic_set_round_trips_through_safetensors(tmp_path):
    result = synthesize("spdfq", qmodel_of("vit"), num_images=2, seed=3, config=FAST, progress=False)
    path = str(tmp_path / "set.safetensors")
    result.save(path)
    loaded = SyntheticSet.load(path)
    assert torch.equal(loaded.images, result.images) and torch.equal(loaded.targets, result.targets)
    assert loaded.method == "spdfq" and loaded.seed == 3
    assert config_from_dict(loaded.config) == FAST
    assert loaded.config["resolved"]["alpha_apa"] == DEFAULT_ALPHA_APA
    nested = tmp_path / "new" / "folder" / "set.safetensors"  # was safetensors' raw "No such file or directory"
    result.save(str(nested))
    assert torch.equal(SyntheticSet.load(str(nested)).images, result.images)
    with pytest.raises(DFQViTError, match="cannot write .*a part of its folder is a file"):
        result.save(path + "/inside.safetensors")


def test_synthetic_set_indexes_like_a_dataset_and_slices_to_a_set():
    """It had no indexing: a DataLoader could not read it and calibrating on fewer images meant rebuilding it."""
    made = synthesize("spdfq", qmodel_of("vit"), num_images=4, seed=3, config=FAST, progress=False)
    image, target = made[2]
    assert torch.equal(image, made.images[2]) and torch.equal(target, made.targets[2])
    batches = list(torch.utils.data.DataLoader(made, batch_size=3))
    assert torch.equal(torch.cat([b[0] for b in batches]), made.images) and len(batches[0]) == 2
    for index, rows in ((slice(1, 3), [1, 2]), ([3, 0], [3, 0]), (torch.tensor([True, False, True, False]), [0, 2]),
                        (slice(None, None, -2), [3, 1])):
        part = made[index]
        config = made.config if rows == sorted(rows) else {**made.config, "reordered": True}  # order kept or not
        assert isinstance(part, SyntheticSet) and (part.method, part.seed, part.config) == ("spdfq", 3, config)
        assert torch.equal(part.images, made.images[rows]) and torch.equal(part.targets, made.targets[rows])
    no_targets = synthesize("gaussian", qmodel_of("vit"), num_images=2, seed=0)
    assert no_targets.targets is None and len(no_targets[0]) == 1 and no_targets[:1].targets is None
    for bad in (True, "0", 1.0, torch.tensor(True)):  # a 0-d bool tensor was read as image 1
        with pytest.raises(TypeError, match="SyntheticSet indices"):
            made[bad]
    # numpy ints and arrays (np.random.choice), 0-d tensors, [] (a float tensor to torch); 2-D indices refused
    import numpy as np
    assert torch.equal(made[np.int64(2)][0], made.images[2]) and torch.equal(made[torch.tensor(2)][0], made.images[2])
    assert torch.equal(made[np.array([3, 1])].images, made.images[[3, 1]]) and len(made[range(2)]) == 2
    assert len(made[[]]) == 0 and made[[]].targets.shape[0] == 0
    for bad in ([[0, 1]], torch.tensor([[0], [1]]), torch.tensor([0.0, 1.0])):
        with pytest.raises(TypeError, match="1-D list of ints or a bool mask"):
            made[bad]
    with pytest.raises(TypeError, match="takes a device"):
        made.to(torch.float16)  # cast the int64 targets too
    if not torch.cuda.is_available():
        with pytest.raises(dfqvit.errors.MissingGPUError):  # was torch's "Found no NVIDIA driver"
            made.to("cuda")
    moved = made.to("cpu")
    assert torch.equal(moved.images, made.images) and moved.method == made.method
    kwargs = dict(bits=8, recon=None, correction=None, progress=False, backend="fake", normalization=NORM)
    assert dfqvit.compile(TINY_MODELS["vit"](), calib=made[:2], **kwargs).calib_images_used == 2


def test_batches_cover_all_images():
    config = dataclasses.replace(FAST, batch_size=2)
    result = synthesize("spdfq", qmodel_of("vit"), num_images=5, seed=0, config=config, progress=False)
    assert result.images.shape[0] == 5 and len(result.config["resolved"]["losses"]) == 3


# -- each loss term decreases over a few steps (one term optimised at a time) --------------------------

STEADY = SynthConfig(iterations=8, rounds=1, warmup_fraction=0.0, jitter=(0,), flip=False)


@pytest.mark.parametrize("term", ["apa", "sl", "tv"])
def test_each_spdfq_loss_decreases(term):
    qmodel = sharp_vit()
    layout = probe_layout(qmodel)
    generator = torch.Generator().manual_seed(0)
    plan = draw_plan(layout, 4, STEADY, spdfq_hardness(STEADY, layout.num_classes), generator, "cpu")
    init = gaussian_init(4, qmodel.input_spec, generator, "cpu")
    with qmodel.quant_state(False, False), qmodel.record_attention() as taps:
        objective = SPDFQObjective(qmodel, layout, plan, STEADY, alpha=1.0, taps=taps)

        def only(x, augment):
            return {term: LossTerm(1.0, objective(x, augment)[term].value)}

        _, history = optimize_images(init, only, config=STEADY, spec=qmodel.input_spec, lr=0.1,
                                     generator=generator, progress=False)
    values = history[term]
    assert values[-1] < 0.8 * values[0], values


def test_psaq_entropy_term_increases_entropy():
    config = dataclasses.replace(STEADY, iterations=10, tv_weight=0.0, onehot_weight=0.0)
    result = synthesize("psaq", sharp_vit(), num_images=4, seed=0, config=config, progress=False)
    first, last = result.config["resolved"]["losses"][0]["pse"]
    assert last > first  # "pse" records the entropy; the loss is its negative


def test_full_spdfq_objective_decreases():
    config = dataclasses.replace(STEADY, iterations=10, alpha_apa=100.0)
    result = synthesize("spdfq", sharp_vit(), num_images=4, seed=0, config=config, progress=False)
    first, last = result.config["resolved"]["losses"][0]["total"]
    assert last < first


# -- model-specific paths -----------------------------------------------------------------------------

def test_apa_blocks_are_the_deeper_half_weighted_by_depth():
    blocks, weights = apa_blocks(12, SynthConfig())
    assert blocks == list(range(5, 12))                      # l = 6..12 (1-based)
    assert weights == pytest.approx([l / 12 for l in range(6, 13)])
    blocks, weights = apa_blocks(12, SynthConfig(apa_start=0.0, apa_depth_weight=False))
    assert blocks == list(range(12)) and weights == [1.0] * 12


@pytest.mark.parametrize("family,prefix,class_token", [("vit", 1, True), ("deit_distilled", 2, True),
                                                       ("vit_avgpool", 0, False), ("swin", 0, False)])
def test_apa_targets_follow_prefix_tokens(family, prefix, class_token):
    qmodel = qmodel_of(family)
    layout = probe_layout(qmodel)
    assert layout.num_prefix_tokens == prefix and layout.uses_class_token == class_token
    plan = draw_plan(layout, 3, SynthConfig(), spdfq_hardness(SynthConfig(), 10), torch.Generator().manual_seed(0),
                     "cpu")
    for block, priors in zip(plan.apa_blocks, plan.apa_priors):
        shape = layout.attention[block]
        assert priors.shape == (3 * shape.windows, shape.heads, shape.tokens - prefix)
        sums = priors.sum(-1)
        if class_token:
            assert (sums < 1).all()                           # 1 - x with x ~ U(0, 1)
        else:
            assert torch.allclose(sums, torch.ones_like(sums))  # x = 0


def test_swin_uses_mean_attention_over_queries(monkeypatch):
    """The Swin APA map is the query mean of each window's attention, pooled per image."""
    import dfqvit.synth.spdfq as spdfq_module

    seen = []
    original = spdfq_module.attention_rows

    def spy(probs, num_prefix_tokens):
        rows = original(probs, num_prefix_tokens)
        seen.append((probs.detach(), num_prefix_tokens, rows.detach()))
        return rows

    monkeypatch.setattr(spdfq_module, "attention_rows", spy)
    qmodel = qmodel_of("swin")
    layout = probe_layout(qmodel)
    synthesize("spdfq", qmodel, num_images=2, seed=0, config=dataclasses.replace(FAST, iterations=1),
               progress=False)
    assert seen
    for probs, prefix, rows in seen:
        assert prefix == 0
        assert torch.allclose(rows, probs.mean(dim=2))
    windows = {layout.attention[b].windows for b in apa_blocks(layout.depth, FAST)[0]}
    assert {p.shape[0] for p, _, _ in seen} == {2 * w for w in windows}  # only the 2 full images


def test_ablation_switches():
    qmodel = qmodel_of("vit")
    baseline = SynthConfig(iterations=2, apa=False, msr=False, soft_labels=False)
    result = synthesize("spdfq", qmodel, num_images=2, seed=0, config=baseline, progress=False)
    assert set(result.config["resolved"]["losses"][0]) == {"oh", "tv", "total"}
    full = synthesize("spdfq", qmodel, num_images=2, seed=0, config=SynthConfig(iterations=2), progress=False)
    assert set(full.config["resolved"]["losses"][0]) == {"sl", "apa", "tv", "total"}


def test_alpha_apa_resolution():
    assert SynthConfig().resolve_alpha_apa("deit_small_patch16_224") == 1e5
    assert SynthConfig().resolve_alpha_apa("deit_base_distilled_patch16_224") == 1e4
    assert SynthConfig().resolve_alpha_apa("swin_small_patch4_window7_224") == 10
    assert SynthConfig().resolve_alpha_apa(None) == DEFAULT_ALPHA_APA
    assert SynthConfig(alpha_apa="ViT-S").resolve_alpha_apa("deit_tiny") == 1.0
    assert SynthConfig(alpha_apa=3.0).resolve_alpha_apa("deit_tiny") == 3.0
    assert set(ALPHA_APA_BY_MODEL.values()) == {1e5, 1e4, 100.0, 10.0, 1.0}


# -- the dfqvit (easy-to-hard) method -----------------------------------------------------------------

def test_group_split_and_levels():
    assert group_sizes(32, 3) == [11, 11, 10]
    assert group_sizes(2, 3) == [1, 1]
    assert [group_level(g, 3) for g in range(3)] == [0, 1, 2]
    assert curriculum_prefix(32, 0, 100) == 16 and curriculum_prefix(32, 100, 100) == 32


def test_hard_group_images_carry_exactly_two_classes():
    """METHODS §4.1: the hard group has "two classes per image with Z ~ U(5, 10) each (≈0.36 mass each)"; it drew
    2..K_MSR classes (at K_MSR = 4 a third of the images carried four)."""
    from dfqvit.synth.progressive import HARD, MEDIUM, level_hardness

    layout = probe_layout(qmodel_of("vit"))
    config = SynthConfig()
    for level, allowed in ((HARD, {2}), (MEDIUM, {1, 2, 3, 4})):
        plan = draw_plan(layout, 64, config, level_hardness(level, config, 10), torch.Generator().manual_seed(0),
                         "cpu")
        crops_per_image = torch.bincount(plan.crops.image_index, minlength=64)
        assert set(crops_per_image.tolist()) == allowed, level


def test_progressive_orders_easy_to_hard_with_adversary():
    config = SynthConfig(iterations=3, mining_ratio=2)
    result = synthesize("dfqvit", qmodel_of("vit"), num_images=6, seed=0, config=config, progress=False)
    resolved = result.config["resolved"]
    assert resolved["group_sizes"] == [2, 2, 2]
    assert resolved["levels"] == ["easy", "medium", "hard"]
    assert resolved["adv_weights"] == [0.0, 0.5, 1.0]
    difficulty = resolved["difficulty"]
    for start in (0, 2, 4):
        assert difficulty[start] <= difficulty[start + 1]
    losses = resolved["losses"]
    assert "kl" not in losses[0] and "kl" in losses[1] and "kl" in losses[2]


def test_progressive_takes_the_batch_size():
    """SynthConfig.batch_size was ignored by the dfqvit method (every group's candidates in one batch)."""
    one_batch = SynthConfig(iterations=2, groups=2, mining_ratio=2)
    batched = dataclasses.replace(one_batch, batch_size=3)
    a = synthesize("dfqvit", qmodel_of("vit"), num_images=4, seed=0, config=one_batch, progress=False)
    b = synthesize("dfqvit", qmodel_of("vit"), num_images=4, seed=0, config=batched, progress=False)
    assert a.images.shape == b.images.shape == (4, 3, 32, 32) and not torch.equal(a.images, b.images)
    assert len(a.config["resolved"]["losses"]) == 2 and len(b.config["resolved"]["losses"]) == 4  # 4 candidates: 3 + 1



# -- PSAQ-ViT V2 (METHODS §2.4, [PROPOSED] re-implementation) -----------------------------------------

@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_psaq_v2_runs_on_every_family_without_labels(family):
    qmodel = qmodel_of(family)
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    result = synthesize("psaq_v2", qmodel, num_images=3, seed=0, config=FAST, progress=False)
    spec = qmodel.input_spec
    assert result.images.shape == (3, spec.channels, spec.height, spec.width) and torch.isfinite(result.images).all()
    assert result.targets is None and result.method == "psaq_v2" and config_from_dict(result.config) == FAST
    (losses,) = result.config["resolved"]["losses"]
    assert set(losses) == {"pse", "kl", "tv", "total", "student_kl"}
    # the student is a copy: the model the images were made for is not trained or re-calibrated
    assert all(torch.equal(before[k], v) for k, v in qmodel.state_dict().items())


def test_psaq_v2_student_learns_and_its_disagreement_reaches_the_images():
    """The student's steps lower KL(p_T || p_S) on the images (lr 0 keeps it fixed); the image step's
    -lambda·KL term (through the student's STE) changes the images (lambda 0 gives other images)."""
    from dfqvit.synth.psaq_v2 import StudentStep, make_student

    qmodel = sharp_vit(dfqvit.QuantConfig(4, 4))
    images = gaussian_init(6, qmodel.input_spec, torch.Generator().manual_seed(0), "cpu")
    student, params = make_student(qmodel, images)
    assert params and not any(p.requires_grad for p in student.parameters())
    with student.quant_state(True, True):
        step = StudentStep(qmodel, student, params, lr=1e-3)
        kl = [float(step(images)["student_kl"]) for _ in range(15)]
        frozen = StudentStep(qmodel, student, params, lr=0.0)
        assert float(frozen(images)["student_kl"]) == float(frozen(images)["student_kl"])
    assert kl[-1] < 0.7 * kl[0], kl
    assert not any(p.requires_grad or p.grad is not None for p in params)

    config = dataclasses.replace(FAST, iterations=3)
    with_kl = synthesize("psaq_v2", qmodel, num_images=3, seed=0, config=config, progress=False)
    without = synthesize("psaq_v2", qmodel, num_images=3, seed=0, config=dataclasses.replace(config, v2_kl_weight=0.0),
                         progress=False)
    assert not torch.equal(with_kl.images, without.images)


def test_psaq_v2_images_depend_on_the_bit_width():
    """Its student is the quantized model, so stage files and the accuracy grid key its images on the bits."""
    from dfqvit.synth.base import reads_quantized_model

    assert reads_quantized_model("psaq_v2") and not reads_quantized_model("psaq")
    a, b = (synthesize("psaq_v2", sharp_vit(dfqvit.QuantConfig(*bits)), num_images=2, seed=0, config=FAST,
                       progress=False) for bits in ((4, 4), (8, 8)))
    assert not torch.equal(a.images, b.images)

# -- errors -------------------------------------------------------------------------------------------

def test_unknown_method_names_the_allowed_ones():
    with pytest.raises(CalibrationError, match="spdfq"):
        synthesize("spdfqq", qmodel_of("vit"))


@pytest.mark.parametrize("field,value", [("iterations", 0), ("tv_form", "l3"), ("sl_eps", (10.0, 5.0)),
                                         ("alpha_apa", "resnet50"), ("k_msr", 0), ("betas", (0.5, 1.5)),
                                         ("groups", 0), ("mining_ratio", 0),
                                         # inf / NaN passed the range checks: NaN images (alpha_apa) or
                                         # losses (lr) after minutes of synthesis; adam_eps=0 divides by 0
                                         ("alpha_apa", float("inf")), ("lr", float("inf")), ("adam_eps", 0.0),
                                         ("tv_weight", float("nan")), ("betas", (0.5, float("nan"))),
                                         ("flip", 1), ("jitter", (True,)), ("v2_kl_weight", -1.0),
                                         ("v2_student_lr", float("inf"))])
def test_bad_config_values_are_typed_errors(field, value):
    with pytest.raises(CalibrationError, match=field) as info:
        SynthConfig(**{field: value})
    assert isinstance(info.value, DFQViTError)


def test_bad_arguments():
    qmodel = qmodel_of("vit")
    with pytest.raises(CalibrationError, match="num_images"):
        synthesize("spdfq", qmodel, num_images=0, config=FAST)
    with pytest.raises(CalibrationError, match="num_images"):  # gaussian returned an empty set
        synthesize("gaussian", qmodel, num_images=0)
    with pytest.raises(CalibrationError, match="seed"):
        synthesize("gaussian", qmodel, num_images=2, seed=1.5)
    with pytest.raises(CalibrationError, match="QuantizedModel, got VisionTransformer"):  # was an AttributeError
        synthesize("gaussian", qmodel.model, num_images=2)
    with pytest.raises(CalibrationError, match="SynthConfig"):
        synthesize("psaq", qmodel, num_images=2, config={"iterations": 3})


@pytest.mark.parametrize("method", ["psaq", "psaq_v2", "spdfq", "dfqvit"])
def test_compile_selects_methods_by_name(method):
    """dfqvit.compile(calib=name) synthesizes with the method (reconstruction off to stay fast)."""
    qmodel = dfqvit.compile(TINY_MODELS["vit"](), bits=8, calib=method, synth=SynthConfig(iterations=2),
                            normalization=NORM, recon=None, correction=None, progress=False)
    with torch.no_grad():
        assert torch.isfinite(qmodel(torch.randn(2, 3, 32, 32))).all()


def test_compile_accepts_a_synthetic_set():
    model = TINY_MODELS["vit"]()
    images = synthesize("spdfq", dfqvit.adapt(model, normalization=NORM), num_images=4, config=FAST, progress=False)
    qmodel = dfqvit.compile(model, bits=8, calib=images, normalization=NORM, recon=None, correction=None,
                            progress=False)
    with torch.no_grad():
        assert torch.isfinite(qmodel(images.images)).all()


def test_round_schedule():
    assert round_lengths(1000, 2) == [500, 500] and round_lengths(3, 2) == [2, 1] and round_lengths(1, 2) == [1]
    assert cosine_lr(0.2, 0, 500, 100) == pytest.approx(0.002)
    assert cosine_lr(0.2, 99, 500, 100) == pytest.approx(0.2)
    assert cosine_lr(0.2, 499, 500, 100) < 1e-4
