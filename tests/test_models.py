import pytest
import torch

from datafree.base.errors import UserError
from datafree.models.zoo import MODELS, Classifier, count_parameters, create_model

SHAPES = {"lenet5": (1, 28), "lenet5_half": (1, 28), "lenet5_nobn": (1, 28), "lenet5_half_nobn": (1, 28),
          "convnet": (1, 28), "resnet8": (3, 32), "resnet20": (3, 32), "resnet18": (3, 32), "resnet34": (1, 28)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_zoo_model_forward_and_features(name):
    c, size = SHAPES[name]
    model = create_model(name, num_classes=7, in_channels=c, image_size=size).eval()
    x = torch.randn(3, c, size, size)
    logits = model(x)
    assert isinstance(model, Classifier) and logits.shape == (3, 7)
    feats = model.forward_features(x)
    assert feats.dim() == 2 and torch.allclose(model.head(feats), logits)


def test_every_zoo_model_is_registered():
    assert set(SHAPES) == set(MODELS)


def test_lenet5_sizes_match_the_published_ones():
    # LeNet-5 as in DAFL has about 62k parameters; the half student about a quarter of that
    assert 60_000 < count_parameters(create_model("lenet5")) < 64_000
    assert count_parameters(create_model("lenet5_half")) < count_parameters(create_model("lenet5")) / 3
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in create_model("lenet5_nobn").modules())


@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
def test_convnet_norms_and_depth(norm):
    model = create_model("convnet", 10, 1, 28, width=16, depth=2, norm=norm)
    assert model.head.in_features == 16 * 7 * 7
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_torchvision_model_adapted_to_grey_inputs_and_classes():
    model = create_model("tv:resnet18", num_classes=5, in_channels=1).eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    assert model.forward_features(torch.randn(2, 1, 32, 32)).shape == (2, 512)


def test_unknown_names_are_user_errors():
    with pytest.raises(UserError, match="unknown architecture 'lenet7'"):
        create_model("lenet7")
    with pytest.raises(UserError, match="torchvision"):
        create_model("tv:not_a_model")
    with pytest.raises(UserError, match="does not take"):
        create_model("lenet5", width=3)
