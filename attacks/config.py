"""The configuration of an evaluation sweep (torch-free, so the CLI validates flags fast)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from attacks.catalog import ATTACKS, AttackOptions
from orbit.errors import UserError

SPAWNING_STRATEGIES = ("spawn", "fork", "notebook")


@dataclass(frozen=True)
class EvalConfig:
    attacks: tuple[str, ...] = ("fgsm", "pgd")
    threats: tuple[str, ...] = ("transfer", "white-box")
    eps: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2)  # L-inf budgets (pixel units)
    eps_l2: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)  # L2 radii, for pgd-l2 and cw
    seed: int = 0
    batch_size: int = 256
    max_memory_mb: float = 4096.0
    options: AttackOptions = field(default_factory=AttackOptions)
    sanity_attack: bool = True  # the large-eps white-box PGD of the sanity checks
    accelerator: str = "cpu"
    devices: int = 1
    strategy: str = "auto"
    num_nodes: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise UserError(f"--batch-size must be positive, got {self.batch_size}")
        if not self.max_memory_mb > 0:
            raise UserError(f"--max-memory-mb must be positive, got {self.max_memory_mb}")
        if self.devices <= 0 or self.num_nodes <= 0:
            raise UserError("--devices and --num-nodes must be positive")
        if any(s in self.strategy for s in SPAWNING_STRATEGIES):
            raise UserError(
                f"--strategy {self.strategy} runs the sweep in processes whose results cannot be"
                " collected; use --strategy ddp (or auto)"
            )
        if any(e < 0 for e in (*self.eps, *self.eps_l2)):
            raise UserError("budgets (--eps, --eps-l2) must be >= 0")

    def eps_for(self, attack: str) -> tuple[float, ...]:
        return self.eps if ATTACKS[attack].norm == "Linf" else self.eps_l2

    def to_json(self) -> dict[str, Any]:
        return {
            "attacks": list(self.attacks),
            "threats": list(self.threats),
            "eps": list(self.eps),
            "eps_l2": list(self.eps_l2),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "max_memory_mb": self.max_memory_mb,
            "options": self.options.to_json(),
            "sanity_attack": self.sanity_attack,
            "accelerator": self.accelerator,
            "devices": self.devices,
            "strategy": self.strategy,
            "num_nodes": self.num_nodes,
        }
