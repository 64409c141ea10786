"""The nonlinear data-dependent group action on a two-layer slot, batched over members.

Rows are samples. For anchors with pre-activations H0 (k x h) and a group element g:
  W1' = g W1, b1' = g b1 (so H' = H g^T),  A = act(H0 g^T),  A0 = act(H0),
  second layer: logits' = act(H g^T) Pi W2^T + b2 with A Pi = A0 on the anchors.

Choice of Pi. With k < h the system A Pi = A0 has infinitely many exact solutions. We take the one
NEAREST THE IDENTITY, Pi = I + A^+ (A0 - A) (the minimum-norm correction), so that g = I gives back
the base model exactly and members move continuously with eps. The paper's plain pseudo-inverse
A^+ A0 is also exact on the anchors but projects onto a rank-k subspace and does not reduce to the
base model at g = I, so it is not used. With k > h the same formula is the ordinary least-squares
(approximate) symmetry; callers must then report its fidelity.

Everything here runs in float64; one batched SVD gives both Pi and the condition number of A.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Activation = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ActionSolve:
    """Per-member results of the batched solve (leading dimension N)."""

    pi: torch.Tensor  # [N, h, h] float64
    condition: torch.Tensor  # [N] float64: s_max / s_min of A (inf when rank-deficient)
    kept_condition: torch.Tensor  # [N] float64: s_max / smallest singular value the solve used
    rank: torch.Tensor  # [N] int64: numerical rank of A
    residual: torch.Tensor  # [N] float64: max |A Pi - A0| (0 up to rounding when exact)
    dead_units: torch.Tensor  # [N] int64: hidden units that are zero on every anchor in A
    anchors: int  # k

    @property
    def full_rank(self) -> torch.Tensor:
        """[N] bool: A has the largest rank it can have, min(k, h), so the solve is determined."""
        return self.rank == min(self.pi.shape[-1], self.anchors)


def transformed_activations(h0: torch.Tensor, g: torch.Tensor, act: Activation) -> torch.Tensor:
    """A = act(H0 g^T): h0 [N, k, h] (or [k, h], shared), g [N, h, h] -> [N, k, h]."""
    return act(torch.matmul(h0, g.transpose(-1, -2)))


def solve_pi(a: torch.Tensor, a0: torch.Tensor) -> ActionSolve:
    """Pi = I + A^+ (A0 - A) for every member at once; a, a0 [N, k, h] (a0 may be [k, h])."""
    a = a.to(torch.float64)
    a0 = a0.to(torch.float64).expand_as(a)
    n, k, h = a.shape
    u, s, vh = torch.linalg.svd(a, full_matrices=False)  # u [N,k,r], s [N,r], vh [N,r,h]
    s_max = s[:, :1]
    cutoff = s_max * max(k, h) * torch.finfo(torch.float64).eps
    keep = s > cutoff
    rank = keep.sum(dim=1)
    s_inv = torch.where(keep, 1.0 / s.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    delta = a0 - a
    correction = vh.transpose(-1, -2) @ (s_inv.unsqueeze(-1) * (u.transpose(-1, -2) @ delta))
    pi = torch.eye(h, dtype=torch.float64).expand(n, h, h) + correction
    s_min = s[:, -1]
    condition = torch.where(
        (s_min > 0) & (rank == s.shape[1]), s_max[:, 0] / s_min, torch.full_like(s_min, torch.inf)
    )
    s_kept = torch.where(keep, s, torch.inf).amin(dim=1)
    kept_condition = s_max[:, 0] / s_kept
    residual = (a @ pi - a0).abs().amax(dim=(1, 2))
    dead = (a.abs().amax(dim=1) == 0).sum(dim=1)
    return ActionSolve(pi, condition, kept_condition, rank, residual, dead, anchors=k)


def nonlinear_action(h0: torch.Tensor, g: torch.Tensor, act: Activation) -> ActionSolve:
    """Solve the second-layer correction for group elements g [N, h, h] on anchors h0 [N, k, h]."""
    h0 = h0.to(torch.float64)
    g = g.to(torch.float64)
    return solve_pi(transformed_activations(h0, g, act), act(h0))


def fold_second_layer(pi: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """U = Pi W2^T [N, h, C]: the member's second layer acting on act(H g^T) (rows = samples)."""
    return pi @ w2.to(pi.dtype).T


def transform_first_layer(
    g: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """W1' = g W1 [N, h, d] and b1' = g b1 [N, h]: the members' first layers, materialised."""
    g = g.to(torch.float64)
    return g @ w1.to(torch.float64), (g @ b1.to(torch.float64).unsqueeze(-1)).squeeze(-1)
