"""Linear symmetries: exact invariance of the loss on arbitrary inputs, and orbit dimensions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from orbit.errors import UserError
from symmetry.linear import (
    act,
    act_on_slot,
    check_slot_shapes,
    flat_minimum_dimension,
    orbit_dimension,
    radial,
    sample_linear_symmetry,
    symmetry_algebra,
    tangent_rank,
)
from training.models import SymmetrySlot


@torch.no_grad()
def _loss(slot: nn.Module, z: torch.Tensor, y: torch.Tensor) -> float:
    return float(nn.functional.cross_entropy(slot(z), y))


@pytest.mark.parametrize("activation", ["linear", "relu", "leaky_relu"])
def test_linear_symmetry_keeps_loss_on_arbitrary_inputs(activation: str) -> None:
    torch.manual_seed(0)
    slot = SymmetrySlot(32, 16, 10, activation)
    z = 3.0 * torch.randn(256, 32)  # arbitrary inputs, not training data
    y = torch.randint(0, 10, (256,))
    before, w1 = _loss(slot, z, y), slot.fc1.weight.detach().clone()
    g = sample_linear_symmetry(activation, 16, 1.0, torch.Generator().manual_seed(1))
    act_on_slot(slot, g)
    moved = float((slot.fc1.weight.detach() - w1).norm() / w1.norm())
    assert moved > 0.3  # the parameters really moved
    assert abs(_loss(slot, z, y) - before) / before <= 1e-5


def test_radial_activation_is_invariant_under_rotations() -> None:
    gen = torch.Generator().manual_seed(0)
    w1, b1 = torch.randn(12, 6, generator=gen), torch.randn(12, generator=gen)
    w2 = torch.randn(3, 12, generator=gen)
    z = torch.randn(100, 6, generator=gen)
    g = sample_linear_symmetry("radial", 12, 1.0, gen)
    assert torch.allclose(g.T @ g, torch.eye(12, dtype=g.dtype), atol=1e-12)

    def out(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return radial(z @ a.T + b) @ c.T

    w1n, b1n, w2n = act(w1, b1, w2, g)
    ref = out(w1, b1, w2)
    assert float((out(w1n, b1n, w2n) - ref).norm() / ref.norm()) <= 1e-5
    # an elementwise activation is not rotation-equivariant: the same move changes the output
    tanh_ref = torch.tanh(z @ w1.T + b1) @ w2.T
    tanh_moved = torch.tanh(z @ w1n.T + b1n) @ w2n.T
    assert float((tanh_moved - tanh_ref).norm() / tanh_ref.norm()) > 1e-2


def test_a_general_linear_map_changes_a_relu_slot() -> None:
    """Only positive scalings are symmetries of relu: a GL element changes the function."""
    torch.manual_seed(0)
    slot = SymmetrySlot(8, 8, 3, "relu")
    z = torch.randn(64, 8)
    ref = slot(z).detach()
    act_on_slot(slot, sample_linear_symmetry("linear", 8, 1.0, torch.Generator().manual_seed(2)))
    assert float((slot(z).detach() - ref).norm() / ref.norm()) > 1e-2


def test_activations_without_linear_symmetry_are_rejected() -> None:
    for name in ("tanh", "sigmoid", "gelu"):
        with pytest.raises(UserError, match="no continuous linear symmetry"):
            symmetry_algebra(name)


def test_slot_shape_errors() -> None:
    with pytest.raises(UserError, match="disagree"):
        check_slot_shapes(torch.zeros(4, 3), torch.zeros(4), torch.zeros(2, 5))
    with pytest.raises(UserError, match="bias"):
        check_slot_shapes(torch.zeros(4, 3), torch.zeros(5), torch.zeros(2, 4))
    with pytest.raises(UserError, match="group element"):
        act(torch.zeros(4, 3), None, torch.zeros(2, 4), torch.eye(3))


@pytest.mark.parametrize("activation", ["linear", "relu", "radial"])
def test_orbit_dimension_matches_brute_force_tangent_rank(activation: str) -> None:
    gen = torch.Generator().manual_seed(3)
    for h, d, c in [(6, 3, 2), (5, 8, 7), (4, 2, 1)]:
        w1 = torch.randn(h, d, generator=gen, dtype=torch.float64)
        b1 = torch.randn(h, generator=gen, dtype=torch.float64)
        w2 = torch.randn(c, h, generator=gen, dtype=torch.float64)
        w1[0], b1[0], w2[:, 0] = 0.0, 0.0, 0.0  # a dead unit shrinks the orbit
        assert orbit_dimension(w1, b1, w2, activation) == tangent_rank(w1, b1, w2, activation)


def test_generic_orbits_have_the_papers_dimension() -> None:
    gen = torch.Generator().manual_seed(4)
    h = 6
    w1 = torch.randn(h, 10, generator=gen, dtype=torch.float64)
    b1 = torch.randn(h, generator=gen, dtype=torch.float64)
    w2 = torch.randn(8, h, generator=gen, dtype=torch.float64)
    assert flat_minimum_dimension("linear", h) == 36 == orbit_dimension(w1, b1, w2, "linear")
    assert flat_minimum_dimension("relu", h) == 6 == orbit_dimension(w1, b1, w2, "leaky_relu")
    assert flat_minimum_dimension("radial", h) == 15 == orbit_dimension(w1, b1, w2, "radial")
    # with fewer classes than units and no bias (rank-deficient layers) the GL orbit is smaller
    assert orbit_dimension(w1[:, :3], None, w2[:2], "linear") == 36 - 3 * 4
