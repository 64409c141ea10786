"""The model zoo: every model ends in the symmetry slot and maps pixels to logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from orbit.errors import UserError
from training.models import ACTIVATIONS, ModelSpec, SymmetrySlot, build_model, find_slot

SHAPES = {"digits": (1, 8, 8), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


@pytest.mark.parametrize("arch", ["mlp", "cnn", "resnet"])
@pytest.mark.parametrize("dataset", list(SHAPES))
def test_every_model_ends_in_the_slot(arch, dataset):
    shape = SHAPES[dataset]
    spec = ModelSpec(arch, shape, 10, hidden=32, mean=[0.5] * shape[0], std=[0.25] * shape[0])
    model = build_model(spec).eval()
    x = torch.rand(3, *shape)
    assert model(x).shape == (3, 10)
    slot = find_slot(model)
    assert isinstance(slot.fc1, nn.Linear) and slot.fc1.out_features == 32
    assert isinstance(slot.fc2, nn.Linear) and slot.fc2.in_features == 32
    # the slot really is the last computation: logits = fc2(act(fc1(features)))
    z = model.features(x)
    assert torch.allclose(model(x), slot.fc2(slot.act(slot.fc1(z))))
    assert torch.allclose(slot.pre_activation(z), slot.fc1(z))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_option(activation):
    model = build_model(ModelSpec("mlp", (1, 8, 8), 10, hidden=16, activation=activation))
    assert model.slot.activation == activation
    assert torch.isfinite(model(torch.rand(2, 1, 8, 8))).all()


def test_normalisation_is_the_first_layer():
    spec = ModelSpec("mlp", (1, 8, 8), 10, mean=[0.5], std=[0.25])
    model = build_model(spec)
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(model.normalize(x), (x - 0.5) / 0.25)
    # and the forward pass really goes through it: the model takes raw pixels
    assert torch.allclose(model(x), model.slot(model.trunk((x - 0.5) / 0.25)))
    assert not torch.allclose(model(x), model.slot(model.trunk(x)))


def test_spec_validation():
    with pytest.raises(UserError, match="unknown model"):
        ModelSpec("vit", (1, 8, 8), 10)
    with pytest.raises(UserError, match="unknown activation"):
        ModelSpec("cnn", (1, 8, 8), 10, activation="swish2")
    with pytest.raises(UserError, match="positive width"):
        ModelSpec("cnn", (1, 8, 8), 10, hidden=0)


def test_find_slot_rejects_a_foreign_model():
    with pytest.raises(UserError, match="no symmetry slot"):
        find_slot(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    assert isinstance(find_slot(build_model(ModelSpec("mlp", (1, 8, 8), 10))), SymmetrySlot)
