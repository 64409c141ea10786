"""The attacks orbit evaluates with: torchattacks instances built from attacks/catalog.py.

Every attack takes pixels in [0, 1] and a model from pixels to logits (orbit's convention), so no
normalisation shim is needed. eps = 0 never reaches torchattacks: the evaluation treats it as the
clean input.
"""

from __future__ import annotations

import torch
import torchattacks
from torch import nn
from torchattacks.attack import Attack

from attacks.catalog import ATTACKS, AttackOptions
from orbit.errors import UserError


class ReferenceCW(torchattacks.CW):
    """torchattacks' CW with the two details of the reference implementation
    (carlini/nn_robust_attacks, l2_attack.py) that torchattacks 3.5.1 departs from:

    - the best other class is the max over the other logits; torchattacks multiplies the true
      class's logit by 0 instead, which picks that 0 whenever every logit is negative (always,
      for an ensemble's log-mean-probabilities), so the attack never tries to fool it
      (Harry24k/adversarial-attacks-pytorch issue 184);
    - pixels are mapped to tanh space as atanh((2x - 1) * 0.999999); torchattacks maps 0 and 1
      to -inf and inf, where the gradient vanishes, so saturated pixels can never move.
    """

    def inverse_tanh_space(self, x: torch.Tensor) -> torch.Tensor:
        return torch.atanh((x * 2 - 1).clamp(-1, 1) * 0.999999)

    def f(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        onehot = nn.functional.one_hot(labels, outputs.shape[1]).bool()
        other = outputs.masked_fill(onehot, float("-inf")).amax(dim=1)
        real = outputs.gather(1, labels.unsqueeze(1)).squeeze(1)
        gap = other - real if self.targeted else real - other
        return torch.clamp(gap, min=-self.kappa)


class BestLossAPGD(torchattacks.APGD):
    """APGD returning, for every input, its highest-loss point over the restarts (torchattacks'
    own `best_loss` mode of APGD.perturb): the transfer source. The default mode returns the
    clean input wherever the source model resisted, which would hand the clean image to every
    model evaluated under transfer."""

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        _, adv = self.perturb(images, labels, best_loss=True)
        return adv


class BestLossRestarts(Attack):
    """Restarts of one torchattacks attack keeping, per input, the run with the highest
    cross-entropy on the source model: the transfer counterpart of MultiAttack (which keeps the
    first run that fooled the source and the clean input where none did)."""

    def __init__(self, model: nn.Module, runs: list[torchattacks.Attack]) -> None:
        super().__init__("BestLossRestarts", model)
        self.runs = runs

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        best = images.clone().detach()
        best_loss = torch.full((len(images),), -torch.inf, device=images.device)
        for run in self.runs:
            adv = run(images, labels)
            with torch.no_grad():
                loss = nn.functional.cross_entropy(self.get_logits(adv), labels, reduction="none")
            better = loss > best_loss
            best[better] = adv[better]
            best_loss = torch.where(better, loss, best_loss)
        return best


def transfer_differs(name: str, options: AttackOptions) -> bool:
    """Whether the transfer version of `name` crafts other inputs than its white-box version
    (then the base model is attacked twice: once to be evaluated, once as the source)."""
    restarts = options.restarts > 1 and name in ("pgd", "pgd-l2")
    return restarts or name in ("apgd-ce", "apgd-dlr")


def build_attack(
    name: str,
    model: nn.Module,
    eps: float,
    options: AttackOptions,
    seed: int,
    num_classes: int,
    transfer: bool = False,
) -> torchattacks.Attack:
    """The torchattacks attack `name` against `model` at budget `eps` (> 0).

    `transfer`: the version whose examples are handed to other models (a highest-loss point for
    every input; see threats.NO_TRANSFER for the attacks that have none).
    Attacks that draw random numbers through torch's global generator (PGD) are made
    reproducible by the caller seeding it; those with their own seed (APGD, Square, AutoAttack)
    get `seed`.
    """
    if name not in ATTACKS:
        raise UserError(f"unknown attack {name!r}; choose from: {', '.join(ATTACKS)}")
    if not eps > 0:
        raise ValueError(f"build_attack needs eps > 0 (eps = 0 is the clean input), got {eps}")
    if transfer and not ATTACKS[name].transfer:
        raise ValueError(f"{name} has no transfer version")
    steps = options.steps_for(name)
    if name == "fgsm":
        return torchattacks.FGSM(model, eps=eps)
    if name in ("pgd", "pgd-l2"):
        cls = torchattacks.PGD if name == "pgd" else torchattacks.PGDL2
        runs = [
            cls(model, eps=eps, alpha=options.step_size * eps, steps=steps, random_start=True)
            for _ in range(options.restarts)
        ]
        if len(runs) == 1:
            return runs[0]
        # White-box: MultiAttack keeps, per input, the first run that fooled the model.
        return BestLossRestarts(model, runs) if transfer else torchattacks.MultiAttack(runs)
    if name in ("apgd-ce", "apgd-dlr"):
        return (BestLossAPGD if transfer else torchattacks.APGD)(
            model,
            norm="Linf",
            eps=eps,
            steps=steps,
            n_restarts=options.restarts,
            seed=seed,
            loss=name.removeprefix("apgd-"),
        )
    if name == "autoattack":
        attack = torchattacks.AutoAttack(
            model, norm="Linf", eps=eps, version="standard", n_classes=num_classes, seed=seed
        )
        for component in attack._autoattack.attacks:
            if hasattr(component, "steps"):
                component.steps = steps
        return attack
    if name == "square":
        return torchattacks.Square(
            model,
            norm="Linf",
            eps=eps,
            n_queries=options.queries,
            n_restarts=options.restarts,
            seed=seed,
        )
    if name == "cw":
        return ReferenceCW(
            model, c=options.cw_c, kappa=options.cw_kappa, steps=steps, lr=options.cw_lr
        )
    raise KeyError(name)


def perturbation_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample L-inf or L2 norm of a perturbation [B, ...] -> [B]."""
    flat = delta.flatten(1)
    return flat.abs().amax(dim=1) if norm == "Linf" else flat.norm(p=2, dim=1)
