"""A memory bound for attacks: measure what one input costs, and chunk batches to fit.

An attack keeps the model's activations for the backward pass plus a few copies of the input
(current, best, gradient...). We measure the activations autograd saves for one and for two
inputs (so constant costs such as saved weights cancel) and add the attack's input copies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from orbit.errors import UserError

# Input-sized tensors an attack holds per input besides the activations (counted generously).
INPUT_COPIES = {
    None: 2,  # clean evaluation: input and logits only
    "fgsm": 4,
    "pgd": 6,
    "pgd-l2": 6,
    "apgd-ce": 12,
    "apgd-dlr": 12,
    "autoattack": 16,
    "square": 8,
    "cw": 8,
}


@dataclass(frozen=True)
class MemoryEstimate:
    constant_bytes: int  # independent of the batch size (saved weights, ...)
    per_input_bytes: int  # activations kept for backward by one input

    def attack_bytes(self, attack: str | None, batch: int, input_bytes: int) -> int:
        """Bytes an attack of `batch` inputs needs: activations (forward and their gradients)
        plus the attack's input copies."""
        per = 2 * self.per_input_bytes + INPUT_COPIES.get(attack, 16) * input_bytes
        return self.constant_bytes + batch * per


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return total


def estimate(model: nn.Module, sample: torch.Tensor) -> MemoryEstimate:
    """Measure `model`'s autograd memory for 1 and 2 inputs like `sample` ([1, C, H, W])."""
    was_training = model.training
    model.eval()
    try:
        one = _saved_bytes(model, sample[:1])
        two = _saved_bytes(model, torch.cat([sample[:1], sample[:1]]))
    finally:
        model.train(was_training)
    per = max(two - one, 0)
    return MemoryEstimate(constant_bytes=max(one - per, 0), per_input_bytes=per)


def fit_batch(
    estimates: dict[str, MemoryEstimate],
    attack: str | None,
    requested: int,
    budget_mb: float,
    input_bytes: int,
) -> int:
    """The largest batch <= requested whose attack fits `budget_mb` on every model attacked;
    a user error naming the model when not even one input fits."""
    budget = budget_mb * 2**20
    batch = requested
    for name, est in estimates.items():
        one = est.attack_bytes(attack, 1, input_bytes)
        if one > budget:
            raise UserError(
                f"{attack or 'clean evaluation'} on {name} needs about {math.ceil(one / 2**20)} MB"
                f" for a single input, more than --max-memory-mb {budget_mb:g}; raise the bound"
            )
        per = est.attack_bytes(attack, 2, input_bytes) - one
        fits = 1 + int((budget - one) // per) if per > 0 else requested
        batch = min(batch, fits)
    return max(1, batch)
