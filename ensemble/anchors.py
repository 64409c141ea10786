"""Anchor selection: each member its own batch of k training samples, stratified by class, seeded.

Stratification keeps every class represented on each member's anchors (the member is exact there),
and per-member generators make member n's anchors independent of the ensemble size.
"""

from __future__ import annotations

import torch

from orbit.errors import UserError
from symmetry.groups import member_generator

ANCHOR_STREAM = 1  # generator stream for anchors (stream 0 draws the group elements)


def default_anchors(hidden: int) -> int:
    """k = h // 2: exact (k <= h) with a well-conditioned solve on trained models."""
    return max(1, hidden // 2)


def check_anchor_count(k: int, n_train: int) -> None:
    if k <= 0:
        raise UserError(f"--anchors must be positive, got {k}")
    if k > n_train:
        raise UserError(
            f"--anchors {k} is more than the {n_train} training samples; use at most {n_train}"
        )


def class_pools(labels: torch.Tensor) -> list[torch.Tensor]:
    """Indices of each class's samples, classes in increasing order."""
    return [torch.nonzero(labels == c).flatten() for c in torch.unique(labels)]


def stratified_indices(pools: list[torch.Tensor], k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct indices, spread over the class pools as evenly as their sizes allow."""
    pools = [p[torch.randperm(len(p), generator=gen)] for p in pools]
    order = torch.randperm(len(pools), generator=gen).tolist()  # who gets the remainder
    quota = [0] * len(pools)
    remaining = k
    while remaining > 0:  # round-robin over classes that still have samples left
        progressed = False
        for c in order:
            if remaining == 0:
                break
            if quota[c] < len(pools[c]):
                quota[c] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            total = sum(len(p) for p in pools)
            raise UserError(f"cannot draw {k} anchors from {total} training samples")
    picked = torch.cat([pools[c][: quota[c]] for c in range(len(pools))])
    return picked.sort().values


def member_anchors(labels: torch.Tensor, k: int, members: int, seed: int) -> torch.Tensor:
    """Anchor indices [members, k] into the training split, member n from its own generator."""
    check_anchor_count(k, int(labels.shape[0]))
    pools = class_pools(labels)
    return torch.stack(
        [
            stratified_indices(pools, k, member_generator(seed, n, stream=ANCHOR_STREAM))
            for n in range(members)
        ]
    )
