"""The CNN: shapes, size, separate non-in-place nonlinearities, input checks, determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mechscope.cnn.config import TrainConfig
from mechscope.cnn.models.cnn import CNN, CNNConfig
from mechscope.cnn.training import random_shift, train_cnn
from mechscope.core.errors import MechscopeError
from mechscope.core.torch_utils import n_parameters


def test_shapes_and_size():
    model = CNN()
    assert model(torch.rand(5, 1, 28, 28)).shape == (5, 10)
    assert n_parameters(model) < 30_000
    assert n_parameters(model) == 16 * 25 + 16 + 32 * 16 * 25 + 32 + 512 * 10 + 10


def test_every_nonlinearity_is_its_own_module():
    model = CNN()
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 2 and len({id(m) for m in relus}) == 2
    assert not any(m.inplace for m in relus)
    ids = [id(m) for _, m in model.named_modules(remove_duplicate=False)]
    assert len(ids) == len(set(ids)), "a module is used twice"


def test_model_takes_pixels_and_normalises_inside():
    model = CNN()
    zeros = torch.zeros(1, 1, 28, 28)
    normalised = model.normalize(zeros)
    torch.testing.assert_close(normalised, torch.full_like(zeros, -0.1307 / 0.3081))


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.rand(2, 28, 28), r"expected input shaped \[batch, 1, 28, 28\]"),
        (torch.rand(2, 1, 32, 32), r"got \[2, 1, 32, 32\]"),
        (torch.zeros(2, 1, 28, 28, dtype=torch.uint8), "floating-point"),
        (torch.full((1, 1, 28, 28), float("nan")), "NaN"),
    ],
)
def test_check_input(bad, message):
    with pytest.raises(MechscopeError, match=message):
        CNN().check_input(bad)


def test_config_too_small():
    with pytest.raises(MechscopeError, match="too small"):
        CNN(CNNConfig(image_size=12))


def test_random_shift_moves_whole_images():
    g = torch.Generator().manual_seed(0)
    img = torch.zeros(64, 1, 28, 28)
    img[:, :, 10:18, 10:18] = 1.0
    shifted = random_shift(img, 2, g)
    assert shifted.shape == img.shape
    assert torch.all(shifted.sum((1, 2, 3)) == 64)  # the square stays whole inside the frame
    assert not torch.equal(shifted, img)


def _state(seed, mnist):
    cfg = TrainConfig(epochs=1, train_limit=1024, batch_size=64, seed=seed, shift=1)
    return train_cnn(mnist, cfg, progress=False).model.state_dict()


def test_training_is_deterministic(mnist):
    a, b, c = _state(3, mnist), _state(3, mnist), _state(4, mnist)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_other_shapes_count_their_parameters_by_hand():
    cfg = CNNConfig(channels=(4, 8, 8), kernel_size=3, padding=1, batchnorm=True, hidden=12, image_size=16)
    # convs 1*4*9+4, 4*8*9+8, 8*8*9+8; BatchNorm 2*4, 2*8, 2*8; 16 -> 8 -> 4 -> 2: read-out 8*2*2 -> 12 -> 10
    by_hand = 40 + 296 + 584 + 8 + 16 + 16 + (32 * 12 + 12) + (12 * 10 + 10)
    model = CNN(cfg)
    assert n_parameters(model) == by_hand == 1486
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, 10)
    solu = CNN(CNNConfig(channels=(4, 8), activation="solu"))
    relu = CNN(CNNConfig(channels=(4, 8)))
    assert n_parameters(solu) - n_parameters(relu) == 2 * 4 + 2 * 8  # the LayerNorms' gains and biases


def test_default_keeps_its_state_dict_keys_and_config_round_trips():
    model = CNN()
    assert list(model.state_dict()) == ["conv1.conv.weight", "conv1.conv.bias", "conv2.conv.weight", "conv2.conv.bias",
                                        "fc.weight", "fc.bias"]  # fmt: skip
    cfg = CNNConfig(channels=(8,), activation="gelu", hidden=5, in_channels=3, mean=(0.1, 0.2, 0.3), std=(1, 1, 1))
    assert CNNConfig.from_dict(cfg.to_dict()) == cfg
    assert CNNConfig.from_dict({"conv1_channels": 16, "conv2_channels": 8}).channels == (16, 8)  # runs from before
    with pytest.raises(MechscopeError, match="unknown model fields depth"):
        CNNConfig.from_dict({"depth": 3})


def test_training_leaves_the_global_generator_alone(mnist):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_cnn(mnist, TrainConfig(train_limit=256, batch_size=64, max_steps=2, seed=7), progress=False)
    assert torch.equal(torch.rand(3), expected)
