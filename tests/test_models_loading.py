"""Building a model from a timm name and a checkpoint: a fine-tuned head is followed, other misfits are named."""
import pytest
import timm
import torch
from safetensors.torch import save_file

from dfqvit.errors import DFQViTError
from dfqvit.models.loading import load_model

NAME = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def ten_class_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False, num_classes=10)
    path = tmp_path_factory.mktemp("ckpt") / "tiny10.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path


def test_a_fine_tuned_head_sets_the_class_count(ten_class_checkpoint):
    """A 10-class checkpoint of a timm name (built with 1000 classes) failed in load_state_dict."""
    trained, path = ten_class_checkpoint
    model, _ = load_model(NAME, str(path))
    assert model.num_classes == 10
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))


def test_a_checkpoint_of_another_model_names_what_does_not_fit(ten_class_checkpoint, tmp_path):
    _, path = ten_class_checkpoint
    with pytest.raises(DFQViTError, match=r"does not fit the model 'deit_small_patch16_224': \d+ tensors of other "
                                          r"shapes \(cls_token: checkpoint \(1, 1, 192\), model \(1, 1, 384\)"):
        load_model("deit_small_patch16_224", str(path))
    state = timm.create_model(NAME, pretrained=False, num_classes=10).state_dict()
    state["extra.weight"] = state.pop("norm.weight")
    save_file(state, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(DFQViTError, match=r"1 tensors missing \(norm.weight\); 1 unexpected tensors \(extra.weight\)"):
        load_model(NAME, str(tmp_path / "renamed.safetensors"))
