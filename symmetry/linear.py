"""Linear (data-independent) symmetries of a two-layer slot and the dimension of their minima.

A slot computes logits = W2 sigma(W1 z + b1) + b2 (W1: h x d, b1: h, W2: C x h, torch's layout).
If sigma(g u) = g sigma(u) for every u, then W1 -> g W1, b1 -> g b1, W2 -> W2 g^-1 gives the same
logits on EVERY input, so the loss is unchanged for any data. The groups (paper, section 3):
GL(h) for a linear slot, positive diagonal scalings for (leaky) ReLU (positive homogeneity),
O(h) for radial activations sigma(u) = lambda(|u|) u. The orbit of a point is a flat subset of the
minimum it lies in; its dimension is the group's dimension minus that of the point's stabiliser.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from orbit.errors import UserError

# Lie algebra of each activation's linear symmetry group (names as in symmetry.groups).
SYMMETRY_ALGEBRA = {"linear": "gl", "relu": "diag", "leaky_relu": "diag", "radial": "so"}
GROUP_NAMES = {"gl": "GL(h)", "diag": "positive diagonal scalings", "so": "O(h)"}


def radial(u: torch.Tensor) -> torch.Tensor:
    """A radial activation u * tanh(|u|) / |u| over the last dimension (commutes with O(h))."""
    r = u.norm(dim=-1, keepdim=True)
    safe = r.clamp_min(1e-12)
    scale = torch.where(r > 1e-6, torch.tanh(safe) / safe, 1.0 - r.square() / 3.0)
    return u * scale


class RadialActivation(nn.Module):
    """`radial` as a module, for slots whose symmetry group is O(h) (none of the zoo's are)."""

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return radial(u)


def symmetry_algebra(activation: str) -> str:
    """'gl', 'diag' or 'so': the algebra of the activation's linear symmetry group."""
    if activation not in SYMMETRY_ALGEBRA:
        raise UserError(
            f"activation {activation!r} has no continuous linear symmetry; choose one of:"
            f" {', '.join(SYMMETRY_ALGEBRA)} (other activations only have the nonlinear,"
            " data-dependent one)"
        )
    return SYMMETRY_ALGEBRA[activation]


def check_slot_shapes(w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor) -> int:
    """The hidden width h, after checking W1 [h, d], b1 [h] (or None), W2 [C, h] agree."""
    if w1.dim() != 2 or w2.dim() != 2:
        raise UserError(
            f"a slot needs 2-D weights W1 [h, d] and W2 [C, h], got {tuple(w1.shape)} and"
            f" {tuple(w2.shape)}"
        )
    h = w1.shape[0]
    if w2.shape[1] != h:
        raise UserError(
            f"slot shapes disagree: W1 has {h} hidden rows but W2 has {w2.shape[1]} columns"
        )
    if b1 is not None and tuple(b1.shape) != (h,):
        raise UserError(f"slot bias b1 must have shape ({h},), got {tuple(b1.shape)}")
    return h


def augmented_first_layer(w1: torch.Tensor, b1: torch.Tensor | None) -> torch.Tensor:
    """[W1 | b1] (h x (d+1)): the bias moves with W1 under every linear symmetry."""
    return w1 if b1 is None else torch.cat([w1, b1.unsqueeze(1)], dim=1)


def act(
    w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(g W1, g b1, W2 g^-1), computed in g's dtype and returned in the weights' dtype."""
    h = check_slot_shapes(w1, b1, w2)
    if tuple(g.shape) != (h, h):
        raise UserError(f"group element must be {h} x {h} for this slot, got {tuple(g.shape)}")
    gd = g.to(torch.promote_types(g.dtype, w1.dtype))
    w1n = (gd @ w1.to(gd.dtype)).to(w1.dtype)
    b1n = None if b1 is None else (gd @ b1.to(gd.dtype)).to(b1.dtype)
    w2n = torch.linalg.solve(gd.T, w2.to(gd.dtype).T).T.to(w2.dtype)  # W2 g^-1
    return w1n, b1n, w2n


@torch.no_grad()
def act_on_slot(slot: nn.Module, g: torch.Tensor) -> None:
    """Apply g to a slot (fc1, fc2 nn.Linear) in place."""
    b1 = slot.fc1.bias
    w1n, b1n, w2n = act(slot.fc1.weight, b1, slot.fc2.weight, g)
    slot.fc1.weight.copy_(w1n)
    if b1 is not None:
        b1.copy_(b1n)
    slot.fc2.weight.copy_(w2n)


def sample_linear_symmetry(
    activation: str, h: int, eps: float, gen: torch.Generator
) -> torch.Tensor:
    """g = expm(eps T) (float64) in the activation's symmetry group: GL(h), positive diagonal
    or SO(h); T has the scale of symmetry.groups (gl: N(0, 1/h) entries, so: its antisymmetric
    part, diag: N(0, 1)), so one eps means the same distance from the identity."""
    algebra = symmetry_algebra(activation)
    if algebra == "diag":
        t = torch.diag(torch.randn(h, generator=gen, dtype=torch.float64))
    else:
        t = torch.randn(h, h, generator=gen, dtype=torch.float64) / math.sqrt(h)
        if algebra == "so":
            t = (t - t.T) / math.sqrt(2.0)
    return torch.linalg.matrix_exp(eps * t)


def flat_minimum_dimension(activation: str, h: int) -> int:
    """The group's dimension: h^2 (GL), h (scalings), h(h-1)/2 (O(h)); the paper's dimension of
    the symmetry-induced minimum at a point whose stabiliser is trivial."""
    algebra = symmetry_algebra(activation)
    return {"gl": h * h, "diag": h, "so": h * (h - 1) // 2}[algebra]


def orbit_dimension(
    w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, activation: str
) -> int:
    """Dimension of the orbit through (W1, b1, W2): the group's dimension minus the stabiliser's.

    The stabiliser's algebra is {T : T [W1|b1] = 0, W2 T = 0} (restricted to the group's algebra):
    GL: maps from range([W1|b1])^perp into null(W2), (h - r1)(h - r2) of them; scalings: neurons
    with no incoming and no outgoing weight; O(h): rotations of the complement of
    range([W1|b1, W2^T]). Ranks are numerical (torch.linalg.matrix_rank, float64).
    """
    h = check_slot_shapes(w1, b1, w2)
    algebra = symmetry_algebra(activation)
    w1a = augmented_first_layer(w1, b1).to(torch.float64)
    w2d = w2.to(torch.float64)
    if algebra == "gl":
        r1 = int(torch.linalg.matrix_rank(w1a))
        r2 = int(torch.linalg.matrix_rank(w2d))
        return h * h - (h - r1) * (h - r2)
    if algebra == "diag":
        alive = (w1a.abs().sum(1) > 0) | (w2d.abs().sum(0) > 0)
        return int(alive.sum())
    m = h - int(torch.linalg.matrix_rank(torch.cat([w1a, w2d.T], dim=1)))
    return h * (h - 1) // 2 - m * (m - 1) // 2


def tangent_rank(
    w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, activation: str
) -> int:
    """orbit_dimension by brute force: the rank of T -> (T [W1|b1], -W2 T) over a basis of the
    algebra. O(h^2 * params) memory: a cross-check for small slots, not for production sizes."""
    h = check_slot_shapes(w1, b1, w2)
    algebra = symmetry_algebra(activation)
    w1a = augmented_first_layer(w1, b1).to(torch.float64)
    w2d = w2.to(torch.float64)
    basis: list[torch.Tensor] = []
    for i in range(h):
        for j in range(h):
            if algebra == "diag" and i != j or algebra == "so" and j <= i:
                continue
            t = torch.zeros(h, h, dtype=torch.float64)
            t[i, j] = 1.0
            if algebra == "so":
                t[j, i] = -1.0
            basis.append(torch.cat([(t @ w1a).flatten(), (-w2d @ t).flatten()]))
    if not basis:
        return 0
    return int(torch.linalg.matrix_rank(torch.stack(basis)))
