"""The random baseline: Gaussian perturbations of the same head parameters (W1, b1, W2).

Member n's perturbation is an isotropic Gaussian direction over the head's parameters, scaled to
a given distance from the base (the builder passes the symmetry members' distances, so both
ensembles move the same amount; only the direction differs: along the orbit or at random).
"""

from __future__ import annotations

import copy
import math

import torch

from ensemble.base import FusedEnsemble
from orbit.errors import UserError
from symmetry.groups import member_generator
from training.models import OrbitClassifier, find_slot

PERTURB_STREAM = 2  # generator stream of the random directions (0: group elements, 1: anchors)


class PerturbedEnsemble(FusedEnsemble):
    """Base trunk shared; member n's head is W2_n act(W1_n z + b1_n) + b2, all members batched."""

    method = "random"

    def __init__(
        self, base: OrbitClassifier, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor
    ) -> None:
        super().__init__()
        slot = find_slot(base)
        n, h, d = w1.shape
        self.spec = base.spec
        self.normalize = copy.deepcopy(base.normalize)
        self.trunk = copy.deepcopy(base.trunk)
        self.act = copy.deepcopy(slot.act)
        self.register_buffer("w1_flat", w1.detach().to(torch.float32).reshape(n * h, d).clone())
        self.register_buffer("b1_flat", b1.detach().to(torch.float32).reshape(n * h).clone())
        self.register_buffer("w2", w2.detach().to(torch.float32).contiguous())  # [N, C, h]
        self.register_buffer("b2", slot.fc2.bias.detach().to(torch.float32).clone())
        self.eval()

    @property
    def num_members(self) -> int:
        return int(self.w2.shape[0])

    @property
    def hidden(self) -> int:
        return int(self.w2.shape[2])

    def member_logits_ncb(self, x: torch.Tensor) -> torch.Tensor:
        """Members' logits as [N, C, B] (the fast layout, as in SymmetryEnsemble)."""
        return self._head_ncb(self.trunk(self.normalize(x)))

    def _head_ncb(self, z: torch.Tensor) -> torch.Tensor:
        # [N*h, B], already [N, h, B] in memory (as in SymmetryEnsemble._head_ncb)
        a = self.act(torch.addmm(self.b1_flat.unsqueeze(-1), self.w1_flat, z.T))
        a = a.reshape(self.num_members, self.hidden, -1)
        return torch.matmul(self.w2, a) + self.b2.unsqueeze(-1)

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.member_logits_ncb(x).transpose(1, 2)

    def member_logits_from_features(self, z: torch.Tensor) -> torch.Tensor:
        """[N, B, C] from the trunk's output z (shared with the base model it was built from)."""
        return self._head_ncb(z).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(self.member_logits_ncb(x), dim=1)
        return (torch.logsumexp(log_p, dim=0) - math.log(self.num_members)).transpose(0, 1)

    def member_heads(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W1 [N, h, d], b1 [N, h], W2 [N, C, h]) of every member."""
        n, h = self.num_members, self.hidden
        return (
            self.w1_flat.reshape(n, h, -1),
            self.b1_flat.reshape(n, h),
            self.w2,
        )


def random_heads(
    base: OrbitClassifier, distances: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Perturbed (W1, b1, W2) per member, member n exactly distances[n] from the base (float64)."""
    slot = find_slot(base)
    w1 = slot.fc1.weight.detach().to(torch.float64)
    b1 = slot.fc1.bias.detach().to(torch.float64)
    w2 = slot.fc2.weight.detach().to(torch.float64)
    if distances.ndim != 1 or not bool(torch.all(distances >= 0)):
        raise UserError("random-baseline distances must be a vector of non-negative numbers")
    sizes = (w1.numel(), b1.numel(), w2.numel())
    outs: list[list[torch.Tensor]] = [[], [], []]
    for n, dist in enumerate(distances.tolist()):
        gen = member_generator(seed, n, stream=PERTURB_STREAM)
        direction = torch.randn(sum(sizes), generator=gen, dtype=torch.float64)
        step = direction * (dist / direction.norm())
        parts = step.split(sizes)
        for out, p, ref in zip(outs, parts, (w1, b1, w2), strict=True):
            out.append(ref + p.view_as(ref))
    return torch.stack(outs[0]), torch.stack(outs[1]), torch.stack(outs[2])


def build_random(base: OrbitClassifier, distances: torch.Tensor, seed: int) -> PerturbedEnsemble:
    """The random baseline whose member n sits at distances[n] from the base's head."""
    w1, b1, w2 = random_heads(base, distances, seed)
    return PerturbedEnsemble(base, w1, b1, w2)


def perturbed_distance(ensemble: PerturbedEnsemble, base: OrbitClassifier) -> torch.Tensor:
    """Per member || (W1_n, b1_n, W2_n) - (W1, b1, W2) ||_F, as stored (float32 weights)."""
    slot = find_slot(base)
    w1, b1, w2 = (t.to(torch.float64) for t in ensemble.member_heads())
    sq = (w1 - slot.fc1.weight.detach().to(torch.float64)).square().sum(dim=(1, 2))
    sq = sq + (b1 - slot.fc1.bias.detach().to(torch.float64)).square().sum(dim=1)
    sq = sq + (w2 - slot.fc2.weight.detach().to(torch.float64)).square().sum(dim=(1, 2))
    return sq.sqrt()
