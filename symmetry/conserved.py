"""Conserved quantities Q of gradient flow for a two-layer slot (paper, section 5).

Why they are conserved: if the loss is invariant under W1 -> (I + eps M) W1, b1 -> (I + eps M) b1,
W2 -> W2 (I - eps M) for every M in an algebra, then <G1 [W1|b1]^T - W2^T G2, M> = 0 (G: the
gradients). Under gradient flow (W' = -G) this makes the M-component of
W2^T W2 - [W1|b1][W1|b1]^T constant in time:
- linear slot (M in gl(h)): the whole matrix Q = W2^T W2 - W1 W1^T - b1 b1^T, for any data;
- relu / leaky_relu (M diagonal): its diagonal, the per-neuron imbalance
  Q_i = ||W2[:, i]||^2 - ||W1[i, :]||^2 - b1[i]^2, for any data;
- radial activations (M antisymmetric): the antisymmetric part of a symmetric matrix is zero, so
  no Q comes out (the derivation fails); what remains is the cancellation of the two layers'
  angular momenta, J1 + J2 = 0 (`angular_momentum`).
- tanh / sigmoid have no linear symmetry; the paper's closed form comes from the nonlinear action
  that scales neuron i's activations, sigma(Z_i) -> (1 + eps) sigma(Z_i). With inputs whose Gram
  matrix is the identity (whitened: X X^T = I, samples as rows) and a first-layer bias that is not
  trained, Q_i = ||W2[:, i]||^2 - sum_n f(Z_ni) with f' sigma' = 2 sigma, i.e.
  f(z) = sinh(z)^2 for tanh and f(z) = 2 (z + e^z - 1) for sigmoid (f(0) = 0; for the identity
  and (leaky) relu the same recipe gives f(z) = z^2, the data-free imbalance when X is square).
Under gradient descent with step eta, Q moves by eta^2 (G2^T G2 - G1 G1^T) per step: conserved to
O(eta^2), not exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from orbit.errors import UserError
from symmetry.linear import augmented_first_layer, check_slot_shapes

DATA_FREE = ("linear", "relu", "leaky_relu")  # Q needs no data
WHITENED = ("tanh", "sigmoid")  # the closed form needs whitened inputs and a frozen b1
WHITENED_TOL = 1e-6


def linear_q(w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor) -> torch.Tensor:
    """Q = W2^T W2 - W1 W1^T - b1 b1^T (h x h), conserved for a linear slot."""
    check_slot_shapes(w1, b1, w2)
    w1a = augmented_first_layer(w1, b1)
    return w2.T @ w2 - w1a @ w1a.T


def imbalance(w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor) -> torch.Tensor:
    """Q_i = ||W2[:, i]||^2 - ||(W1[i, :], b1[i])||^2 (h), conserved for relu / leaky_relu."""
    check_slot_shapes(w1, b1, w2)
    return w2.square().sum(0) - augmented_first_layer(w1, b1).square().sum(1)


def potential(z: torch.Tensor, activation: str) -> torch.Tensor:
    """f with f'(z) sigma'(z) = 2 sigma(z) and f(0) = 0, elementwise."""
    if activation == "tanh":
        return torch.sinh(z).square()
    if activation == "sigmoid":
        return 2.0 * (z + torch.expm1(z))
    if activation in DATA_FREE:
        return z.square()
    raise UserError(
        f"no closed-form conserved quantity for activation {activation!r}; supported:"
        f" {', '.join(DATA_FREE + WHITENED)}"
    )


def check_whitened(x: torch.Tensor, tol: float = WHITENED_TOL) -> None:
    """UserError unless the samples (rows of x) are orthonormal: X X^T = I within tol."""
    if x.dim() != 2:
        raise UserError(f"whitened inputs must be a 2-D [n, d] matrix, got {tuple(x.shape)}")
    gram = x @ x.T
    err = float((gram - torch.eye(x.shape[0], dtype=x.dtype)).abs().max())
    if err > tol:
        raise UserError(
            f"the closed form needs whitened inputs (X X^T = I), but max |X X^T - I| = {err:.2e};"
            " whiten them with symmetry.conserved.whiten (needs n <= d samples)"
        )


def whiten(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning the same sample space as x [n, d] (QR); needs n <= d."""
    n, d = x.shape
    if n > d:
        raise UserError(f"cannot whiten {n} samples of dimension {d}: need at most {d} samples")
    q, _ = torch.linalg.qr(x.T)
    return q.T.contiguous()


def whitened_q(
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    x: torch.Tensor,
    activation: str,
    check: bool = True,
) -> torch.Tensor:
    """Q_i = ||W2[:, i]||^2 - sum_n f(Z_ni), Z = x W1^T + b1 (h values).

    Conserved by gradient flow on any loss of the slot's output when x is whitened and b1 is not
    trained (with b1 trained the pre-activations move by (X X^T + 1 1^T), which is never I).
    """
    check_slot_shapes(w1, b1, w2)
    if x.dim() != 2 or x.shape[1] != w1.shape[1]:
        raise UserError(f"inputs must be [n, {w1.shape[1]}] for this slot, got {tuple(x.shape)}")
    if check:
        check_whitened(x)
    z = x @ w1.T if b1 is None else x @ w1.T + b1
    return w2.square().sum(0) - potential(z, activation).sum(0)


def slot_q(slot: nn.Module) -> torch.Tensor | None:
    """The data-free Q of a slot (fc1, fc2, .activation), detached, or None when its activation
    has none (tanh, sigmoid: only the whitened-data closed form; gelu, silu, elu: none)."""
    activation = getattr(slot, "activation", None)
    if activation not in DATA_FREE:
        return None
    w1, b1, w2 = slot.fc1.weight.detach(), slot.fc1.bias, slot.fc2.weight.detach()
    b1 = None if b1 is None else b1.detach()
    return linear_q(w1, b1, w2) if activation == "linear" else imbalance(w1, b1, w2)


def slot_q_scale(slot: nn.Module) -> float | None:
    """The size of the two terms whose difference is Q (||W2^T W2|| + ||W~1 W~1^T||, or
    ||a + b|| per neuron): the yardstick for Q when Q itself is near zero (balanced layers)."""
    activation = getattr(slot, "activation", None)
    if activation not in DATA_FREE:
        return None
    w1a = augmented_first_layer(
        slot.fc1.weight.detach(), None if slot.fc1.bias is None else slot.fc1.bias.detach()
    ).to(torch.float64)
    w2 = slot.fc2.weight.detach().to(torch.float64)
    if activation == "linear":
        return float((w2.T @ w2).norm() + (w1a @ w1a.T).norm())
    return float((w2.square().sum(0) + w1a.square().sum(1)).norm())


def q_mean(q: torch.Tensor) -> float:
    """One number for Q: the mean Q_i (relu), or trace/h = mean eigenvalue (linear)."""
    return float(q.diagonal().mean() if q.dim() == 2 else q.mean())


def relative_drift(q: torch.Tensor, q0: torch.Tensor) -> float:
    """||Q - Q0|| / ||Q0|| (Frobenius / Euclidean); inf when Q0 = 0 and Q moved."""
    num = float((q - q0).norm())
    den = float(q0.norm())
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def angular_momentum(
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    v1: torch.Tensor,
    vb1: torch.Tensor | None,
    v2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Angular momenta (h x h, antisymmetric) of the two layers for velocities V = dW/dt:
    J1 = W~1 V~1^T - V~1 W~1^T (hidden units as rows of [W1|b1]), J2 = W2^T V2 - V2^T W2.
    Under gradient flow with an O(h)-invariant loss, J1 + J2 = 0 at every instant."""
    check_slot_shapes(w1, b1, w2)
    check_slot_shapes(v1, vb1, v2)
    w1a, v1a = augmented_first_layer(w1, b1), augmented_first_layer(v1, vb1)
    return w1a @ v1a.T - v1a @ w1a.T, w2.T @ v2 - v2.T @ w2


def angular_cancellation(
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    g1: torch.Tensor,
    gb1: torch.Tensor | None,
    g2: torch.Tensor,
) -> float:
    """||J1 + J2|| / (||J1|| + ||J2||) for the gradient-flow velocity -grad (G: gradients):
    about 1e-16 when the loss is O(h)-invariant, of order 1 when it is not."""
    j1, j2 = angular_momentum(w1, b1, w2, -g1, None if gb1 is None else -gb1, -g2)
    den = float(j1.norm() + j2.norm())
    return 0.0 if den == 0.0 else float((j1 + j2).norm()) / den
