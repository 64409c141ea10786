"""The nonlinear group action on random tensors: group elements, the batched solve, exactness."""

from __future__ import annotations

import pytest
import torch

from orbit.errors import UserError
from symmetry.groups import ALGEBRAS, group_elements, sample_generators
from symmetry.nonlinear import (
    fold_second_layer,
    nonlinear_action,
    solve_pi,
    transform_first_layer,
    transformed_activations,
)
from training.models import ACTIVATIONS, make_activation

N, H = 6, 16


def _h0(n: int, k: int, h: int = H, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, h, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _g(eps: float = 0.3, algebra: str = "gl", n: int = N, h: int = H) -> torch.Tensor:
    return group_elements(sample_generators(algebra, h, list(range(n)), seed=3), eps)


@pytest.mark.parametrize("algebra", ALGEBRAS)
def test_group_elements_belong_to_their_group(algebra: str) -> None:
    g = _g(0.7, algebra)
    eye = torch.eye(H, dtype=torch.float64)
    assert torch.linalg.det(g).gt(0).all()  # expm of anything is in the identity component
    assert (g - eye).abs().amax() > 0.05  # and not the identity
    if algebra == "so":
        assert torch.allclose(g.transpose(1, 2) @ g, eye.expand_as(g), atol=1e-12)
    if algebra == "diag":
        off = g - torch.diag_embed(torch.diagonal(g, dim1=1, dim2=2))
        assert off.abs().amax() == 0
        assert torch.diagonal(g, dim1=1, dim2=2).gt(0).all()


def test_generators_are_seeded_per_member() -> None:
    a = sample_generators("gl", H, [0, 1, 2, 3], seed=5)
    b = sample_generators("gl", H, [0, 1, 2, 3], seed=5)
    assert torch.equal(a, b)
    prefix = sample_generators("gl", H, [0, 1], seed=5)
    assert torch.equal(prefix, a[:2])  # member n does not depend on the ensemble size
    other = sample_generators("gl", H, [0, 1, 2, 3], seed=6)
    assert not torch.equal(a, other)
    redrawn = sample_generators("gl", H, [2], seed=5, attempts=[1])
    assert not torch.equal(redrawn[0], a[2])
    assert not torch.equal(a[0], a[1])


def test_generator_scale_is_the_same_across_algebras() -> None:
    """E||T||_F^2 is about h for every algebra, so one eps means the same distance."""
    for algebra in ALGEBRAS:
        t = sample_generators(algebra, 32, list(range(200)), seed=0)
        mean_sq = t.square().sum(dim=(1, 2)).mean().item()
        assert 0.85 * 32 < mean_sq < 1.15 * 32, (algebra, mean_sq)


def test_non_positive_eps_is_a_user_error() -> None:
    t = sample_generators("gl", H, [0], seed=0)
    for eps in (0.0, -0.1):
        with pytest.raises(UserError, match="--eps"):
            group_elements(t, eps)
    with pytest.raises(UserError, match="--algebra"):
        sample_generators("sl", H, [0], seed=0)


@pytest.mark.parametrize("k", [4, H, 3 * H])
def test_batched_solve_equals_per_member_reference(k: int) -> None:
    act = make_activation("tanh")
    h0, g = _h0(N, k), _g()
    solve = nonlinear_action(h0, g, act)
    eye = torch.eye(H, dtype=torch.float64)
    for n in range(N):
        a = act(h0[n] @ g[n].T)
        a0 = act(h0[n])
        ref = eye + torch.linalg.lstsq(a, a0 - a, driver="gelsd").solution
        assert torch.allclose(solve.pi[n], ref, atol=1e-10), n
        svals = torch.linalg.svdvals(a)
        assert solve.condition[n].item() == pytest.approx((svals[0] / svals[-1]).item(), rel=1e-9)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_exact_on_anchors_for_every_activation(activation: str) -> None:
    """With k < h, act(H0 g^T) Pi reproduces act(H0) exactly (float64), and only there."""
    act = make_activation(activation)
    k = H // 2
    h0, g = _h0(N, k), _g(0.5)
    solve = nonlinear_action(h0, g, act)
    assert bool(solve.full_rank.all())
    a = transformed_activations(h0, g, act)
    assert (a @ solve.pi - act(h0)).abs().amax() < 1e-10
    assert solve.residual.amax() < 1e-10
    # elsewhere the members differ from the base (for a linear slot too: the Pi nearest the
    # identity is not g^-T, the data-independent symmetry, so it is exact on the anchors only)
    other = _h0(1, 32, seed=9).expand(N, -1, -1)
    gap = (transformed_activations(other, g, act) @ solve.pi - act(other)).abs().amax()
    assert gap > 1e-3


def test_identity_gives_back_the_base_and_members_move_continuously() -> None:
    act = make_activation("gelu")
    h0 = _h0(N, 8)
    eye = torch.eye(H, dtype=torch.float64).expand(N, H, H)
    solve = nonlinear_action(h0, eye, act)
    assert solve.pi.sub(eye).abs().amax() < 1e-12
    t = sample_generators("gl", H, list(range(N)), seed=1)
    moves = [
        nonlinear_action(h0, group_elements(t, eps), act).pi.sub(eye).norm(dim=(1, 2)).mean()
        for eps in (1e-4, 1e-3, 1e-2, 1e-1)
    ]
    assert all(a < b for a, b in zip(moves, moves[1:], strict=False))
    assert moves[0] < 1e-2


def test_nearest_identity_beats_the_plain_pseudo_inverse() -> None:
    """Both solve A Pi = A0 exactly; ours is the one closest to I (the documented choice)."""
    act = make_activation("tanh")
    h0, g = _h0(N, 8), _g(0.2)
    a = transformed_activations(h0, g, act)
    ours = solve_pi(a, act(h0)).pi
    plain = torch.linalg.pinv(a) @ act(h0)
    eye = torch.eye(H, dtype=torch.float64)
    assert (a @ plain - act(h0)).abs().amax() < 1e-10
    assert bool(((ours - eye).norm(dim=(1, 2)) < (plain - eye).norm(dim=(1, 2))).all())


def test_rank_deficiency_is_detected() -> None:
    """relu with most units dead on the anchors: fewer live columns than anchors, no exact solve."""
    act = make_activation("relu")
    k = 8
    h0 = _h0(N, k).abs() + 0.5
    h0[:, :, 4:] = -10.0  # only 4 units fire on these anchors, and a small g keeps it so
    solve = nonlinear_action(h0, _g(0.05), act)
    assert bool((solve.rank == 4).all())
    assert not bool(solve.full_rank.any())
    assert bool(torch.isinf(solve.condition).all())
    assert bool((solve.dead_units == H - 4).all())
    assert solve.residual.amax() > 1e-3  # A Pi = A0 has no solution: the members cannot be exact


def test_least_squares_regime_is_the_best_fit() -> None:
    """k > h: no exact solution; Pi minimises ||A Pi - A0|| (normal equations hold)."""
    act = make_activation("silu")
    h0, g = _h0(N, 3 * H), _g(0.3)
    solve = nonlinear_action(h0, g, act)
    a = transformed_activations(h0, g, act)
    r = a @ solve.pi - act(h0)
    assert solve.residual.amax() > 1e-6
    assert (a.transpose(1, 2) @ r).abs().amax() < 1e-9


def test_materialised_layers_match_the_folded_head() -> None:
    """act(z (gW1)^T + g b1) Pi W2^T == act((z W1^T + b1) g^T) U."""
    gen = torch.Generator().manual_seed(0)
    d, c = 10, 3
    w1 = torch.randn(H, d, generator=gen, dtype=torch.float64)
    b1 = torch.randn(H, generator=gen, dtype=torch.float64)
    w2 = torch.randn(c, H, generator=gen, dtype=torch.float64)
    z = torch.randn(5, d, generator=gen, dtype=torch.float64)
    g = _g(0.4)
    act = make_activation("elu")
    pi = nonlinear_action(_h0(N, 8), g, act).pi
    u = fold_second_layer(pi, w2)
    w1n, b1n = transform_first_layer(g, w1, b1)
    direct = act(z @ w1n.transpose(1, 2) + b1n.unsqueeze(1)) @ pi @ w2.T
    folded = act((z @ w1.T + b1) @ g.transpose(1, 2)) @ u
    assert torch.allclose(direct, folded, atol=1e-10)
