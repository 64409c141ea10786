"""The interface every ensemble shares: member logits in, mean probabilities and uncertainty out.

Subclasses only implement `member_logits`; averaging, the attack-facing logits and the uncertainty
measures are defined once here so that every ensemble (symmetry, random, deep) is scored alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Prediction:
    """Per-input outputs of an ensemble (batch-first)."""

    probs: torch.Tensor  # [B, C] mean of member softmax probabilities
    label: torch.Tensor  # [B] int64, argmax of probs
    agreement: torch.Tensor  # [B] share of members whose vote equals `label`
    mutual_info: torch.Tensor  # [B] entropy of the mean minus mean member entropy (nats)


def summarize(member_logits: torch.Tensor) -> Prediction:
    """Average member probabilities and measure disagreement; member_logits is [N, B, C]."""
    log_p = torch.log_softmax(member_logits, dim=-1)  # [N, B, C]
    n = member_logits.shape[0]
    log_mean = torch.logsumexp(log_p, dim=0) - math.log(n)  # [B, C]
    probs = log_mean.exp()
    label = probs.argmax(dim=-1)
    votes = member_logits.argmax(dim=-1)  # [N, B]
    agreement = (votes == label.unsqueeze(0)).float().mean(dim=0)
    entropy_of_mean = -(probs * log_mean).sum(-1)
    mean_entropy = -(log_p.exp() * log_p).sum(-1).mean(0)
    mutual_info = (entropy_of_mean - mean_entropy).clamp_min(0.0)
    return Prediction(probs, label, agreement, mutual_info)


class FusedEnsemble(nn.Module):
    """An ensemble as one module. forward(x) returns log of the mean member probabilities, which
    torchattacks can use as logits (softmax of it is exactly the ensemble's mean probability)."""

    method: str = "ensemble"

    @property
    def num_members(self) -> int:
        raise NotImplementedError

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[N, B, C] logits of every member for pixels x [B, C, H, W]."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.member_logits(x)
        log_p = torch.log_softmax(logits, dim=-1)
        return torch.logsumexp(log_p, dim=0) - math.log(logits.shape[0])

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> Prediction:
        return summarize(self.member_logits(x))


class MeanLogits(nn.Module):
    """An ensemble seen through the mean of its members' logits: the second loss of the white-box
    attacker. The log of the mean probability saturates where members disagree (its gradient
    vanishes on inputs a few members still get right); the mean logit does not (Tramer et al.,
    "On Adaptive Attacks to Adversarial Example Defenses", 2020)."""

    def __init__(self, ensemble: FusedEnsemble) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ensemble.member_logits(x).mean(dim=0)
