"""Seeded group elements g = expm(eps T) for the slot's hidden space, batched over members.

Each member draws from its own generator, derived from (seed, member, attempt), so member n is
the same whatever the ensemble size and a redrawn member does not disturb the others.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from orbit.errors import UserError

ALGEBRAS = ("gl", "so", "diag")


def member_generator(seed: int, member: int, attempt: int = 0, stream: int = 0) -> torch.Generator:
    """An independent torch generator for one member's draw (stream separates T from anchors)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, stream, member, attempt])
    return torch.Generator().manual_seed(int(state.generate_state(1, dtype=np.uint64)[0] >> 1))


def check_algebra(algebra: str) -> None:
    if algebra not in ALGEBRAS:
        raise UserError(f"unknown --algebra {algebra!r}; choose one of: {', '.join(ALGEBRAS)}")


def sample_generator(algebra: str, h: int, gen: torch.Generator) -> torch.Tensor:
    """One Lie-algebra element T [h, h] (float64), scaled so that E||T||_F^2 is about h.

    gl: i.i.d. N(0, 1/h) entries. so: (A - A^T)/sqrt(2) with A from gl, so its off-diagonal
    entries also have variance 1/h (rotations). diag: N(0, 1) on the diagonal, which matches gl's
    expected Frobenius norm, so one eps means the same distance from the identity in every algebra.
    """
    check_algebra(algebra)
    if algebra == "diag":
        return torch.diag(torch.randn(h, generator=gen, dtype=torch.float64))
    a = torch.randn(h, h, generator=gen, dtype=torch.float64) / math.sqrt(h)
    if algebra == "so":
        return (a - a.T) / math.sqrt(2.0)
    return a


def sample_generators(
    algebra: str, h: int, members: list[int], seed: int, attempts: list[int] | None = None
) -> torch.Tensor:
    """T [len(members), h, h] float64, member i drawn from (seed, members[i], attempts[i])."""
    attempts = attempts if attempts is not None else [0] * len(members)
    return torch.stack(
        [
            sample_generator(algebra, h, member_generator(seed, m, a))
            for m, a in zip(members, attempts, strict=True)
        ]
    )


def group_elements(t: torch.Tensor, eps: float) -> torch.Tensor:
    """g = expm(eps T), batched over the leading dimension (float64 for the solve)."""
    if not eps > 0:
        raise UserError(f"--eps must be positive, got {eps}")
    g = torch.linalg.matrix_exp(eps * t.to(torch.float64))
    if not bool(torch.isfinite(g).all()):
        raise UserError(f"expm(eps T) overflows float64 at --eps {eps:g}; use a much smaller --eps")
    return g
