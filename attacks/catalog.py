"""What orbit can attack with, without importing torch: names, norms, defaults, parsing.

Budgets (eps) are L-inf in pixel units unless the attack is an L2 attack (`pgd-l2`, `cw`),
whose eps is an L2 radius. The attacks themselves are built by attacks/registry.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from orbit.errors import UserError

# The reference AutoAttack (Croce & Hein, 2020) runs its components for 100 iterations;
# torchattacks 3.5 builds them with 10. We restore the reference value (see build_attack).
AUTOATTACK_ITERATIONS = 100


@dataclass(frozen=True)
class AttackInfo:
    """What the evaluation needs to know about an attack besides how to build it."""

    name: str
    norm: str  # "Linf" or "L2": the unit of eps
    gradient: bool  # False: query-only (black-box)
    bounded: bool  # True: torchattacks keeps the perturbation within eps
    iterative: bool
    default_steps: int | None
    summary: str
    # A transfer version exists: for EVERY input a highest-loss point on the base model. Attacks
    # that return the clean input wherever they fail on their target (AutoAttack, CW) have none:
    # under transfer they would hand the clean image to every other model.
    transfer: bool = True


ATTACKS: dict[str, AttackInfo] = {
    a.name: a
    for a in (
        AttackInfo("fgsm", "Linf", True, True, False, None, "FGSM, one signed-gradient step"),
        AttackInfo(
            "pgd", "Linf", True, True, True, 10, "PGD, step eps*step_size, one random start"
        ),
        AttackInfo("pgd-l2", "L2", True, True, True, 10, "PGD in the L2 ball"),
        AttackInfo("apgd-ce", "Linf", True, True, True, 100, "APGD on cross-entropy"),
        AttackInfo("apgd-dlr", "Linf", True, True, True, 100, "APGD on the DLR margin loss"),
        AttackInfo(
            "autoattack",
            "Linf",
            True,
            True,
            True,
            AUTOATTACK_ITERATIONS,
            "AutoAttack standard: APGD-CE, APGD-T, FAB-T, Square",
            transfer=False,
        ),
        AttackInfo(
            "square", "Linf", False, True, True, None, "Square, query-only random search", False
        ),
        AttackInfo(
            "cw",
            "L2",
            True,
            False,
            True,
            50,
            "Carlini-Wagner L2 (unbounded; counted as a success only within eps)",
            transfer=False,
        ),
    )
}


@dataclass(frozen=True)
class AttackOptions:
    """Attack hyperparameters shared by the sweep. None means the attack's own default."""

    steps: int | None = None  # pgd/pgd-l2 10, apgd 100, autoattack 100, cw 50
    step_size: float = 0.25  # PGD step as a fraction of eps (0.25: eps/4)
    restarts: int = 1  # random starts (pgd, pgd-l2, apgd, square)
    queries: int = 5000  # square's query budget per restart
    cw_c: float = 1.0
    cw_kappa: float = 0.0
    cw_lr: float = 0.01

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps <= 0:
            raise UserError(f"--steps must be positive, got {self.steps}")
        if not 0 < self.step_size <= 2:
            raise UserError(f"--step-size is a fraction of eps in (0, 2], got {self.step_size}")
        if self.restarts <= 0:
            raise UserError(f"--restarts must be positive, got {self.restarts}")
        if self.queries <= 0:
            raise UserError(f"--queries must be positive, got {self.queries}")
        if not self.cw_c > 0 or not self.cw_lr > 0 or self.cw_kappa < 0:
            raise UserError("--cw-c and --cw-lr must be positive and --cw-kappa >= 0")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def steps_for(self, name: str) -> int | None:
        return self.steps if self.steps is not None else ATTACKS[name].default_steps


def parse_attacks(text: str) -> list[str]:
    """'fgsm,pgd' -> ['fgsm', 'pgd'] (order kept, duplicates dropped); unknown names: UserError."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError(f"--attacks is empty; choose from: {', '.join(ATTACKS)}")
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise UserError(f"unknown attack {unknown[0]!r}; choose from: {', '.join(ATTACKS)}")
    return list(dict.fromkeys(names))


def resolved_hyperparameters(name: str, options: AttackOptions) -> dict[str, Any]:
    """The hyperparameters `build_attack` uses for `name`, as recorded in the report."""
    steps = options.steps_for(name)
    if name == "fgsm":
        return {}
    if name in ("pgd", "pgd-l2"):
        return {
            "steps": steps,
            "step_size": f"{options.step_size} * eps",
            "random_start": True,
            "restarts": options.restarts,
        }
    if name in ("apgd-ce", "apgd-dlr"):
        return {"steps": steps, "restarts": options.restarts, "rho": 0.75}
    if name == "autoattack":
        return {"version": "standard", "iterations": steps, "square_queries": 5000}
    if name == "square":
        return {"queries": options.queries, "restarts": options.restarts, "p_init": 0.8}
    if name == "cw":
        return {"steps": steps, "c": options.cw_c, "kappa": options.cw_kappa, "lr": options.cw_lr}
    raise KeyError(name)
