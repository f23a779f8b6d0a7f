"""On the trained CIFAR-10 reference ViT (../shared/models, skipped when absent), SPDFQ images carry
their target class: the fp32 model predicts an image's main target far more often than it predicts
that class for Gaussian noise (which it maps to one or two classes whatever the target)."""
import torch

import dfqvit
from conftest import load_cifar_model
from dfqvit.config import SynthConfig
from dfqvit.synth import synthesize

NUM_IMAGES = 10
ITERATIONS = 50          # of the paper's 1000: enough for the label term on this small model
MIN_AGREEMENT = 0.75     # SPDFQ images predicted as their main target
MIN_MARGIN = 0.5         # ... at least this much more often than Gaussian noise matches those targets


@torch.no_grad()
def agreement(qmodel, images: torch.Tensor, targets: torch.Tensor) -> float:
    with qmodel.quant_state(False, False):
        predicted = qmodel.model(images).argmax(-1)
    return float((predicted == targets).float().mean())


def test_spdfq_images_are_classified_as_their_main_target():
    model, normalization = load_cifar_model()
    qmodel = dfqvit.adapt(model, normalization=normalization)
    config = SynthConfig(iterations=ITERATIONS)
    spdfq = synthesize("spdfq", qmodel, num_images=NUM_IMAGES, seed=0, config=config, progress=False)
    noise = synthesize("gaussian", qmodel, num_images=NUM_IMAGES, seed=0)
    spdfq_agreement = agreement(qmodel, spdfq.images, spdfq.targets)
    noise_agreement = agreement(qmodel, noise.images, spdfq.targets)
    print(f"main-target agreement: spdfq {spdfq_agreement:.3f}, gaussian {noise_agreement:.3f}")
    assert spdfq_agreement >= MIN_AGREEMENT
    assert spdfq_agreement >= noise_agreement + MIN_MARGIN
