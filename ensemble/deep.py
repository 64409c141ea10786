"""The deep-ensemble baseline: K base models trained with different seeds, averaged like the others.

Members share nothing (each has its own trunk), so member_logits is a plain stack over members:
this is the honest cost of a deep ensemble, K full forward passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ensemble.base import FusedEnsemble
from orbit.errors import UserError
from training.datasets import DatasetSplits
from training.models import OrbitClassifier

SEED_STRIDE = 1000  # --seed S gives member seeds base_seed + 1 + S * SEED_STRIDE + i


class DeepEnsemble(FusedEnsemble):
    """K independently trained classifiers; member_logits stacks their logits [K, B, C]."""

    method = "deep"

    def __init__(self, models: list[OrbitClassifier]) -> None:
        super().__init__()
        if not models:
            raise UserError("a deep ensemble needs at least one member (--members >= 1)")
        self.spec = models[0].spec
        self.models = nn.ModuleList(models)
        self.eval()

    @property
    def num_members(self) -> int:
        return len(self.models)

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.models])


@dataclass
class DeepMember:
    seed: int
    path: Path
    weights_sha256: str
    test_accuracy: float


def member_seeds(base_seed: int, members: int, seed: int) -> list[int]:
    """Seeds of the K members: distinct from each other and from the base model's seed."""
    if seed < 0:
        raise UserError(f"--seed must be non-negative, got {seed}")
    return [base_seed + 1 + seed * SEED_STRIDE + i for i in range(members)]


def build_deep(
    base_info: dict[str, Any],
    splits: DatasetSplits,
    *,
    members: int,
    seed: int,
    members_dir: Path,
    on_member: Callable[[int, int], None] | None = None,
) -> tuple[DeepEnsemble, list[DeepMember]]:
    """Train `members` base models like the base (same train_config, other seeds) into members_dir.

    Each member is written by the training pipeline into members_dir/seed<S>/; on_member(i, K) is
    called after each one (progress).
    """
    from training.artifacts import load_model
    from training.config import TrainConfig
    from training.train import train

    if members <= 0:
        raise UserError(f"--members must be positive, got {members}")
    config_json = base_info.get("train_config")
    if not isinstance(config_json, dict):
        raise UserError(
            "the base model.json has no train_config (it was not trained by `orbit train`);"
            " a deep ensemble retrains it with other seeds, so retrain the base with `orbit train`"
        )
    base_seed = int(config_json.get("seed", 0))
    models: list[OrbitClassifier] = []
    records: list[DeepMember] = []
    for i, s in enumerate(member_seeds(base_seed, members, seed)):
        out = Path(members_dir) / f"seed{s}"
        config = TrainConfig.from_json(
            config_json, out=out, seed=s, overwrite=True, resume=False, progress=False
        )
        result = train(config, splits=splits)
        loaded = load_model(out)
        models.append(loaded.model)
        records.append(DeepMember(s, out, loaded.weights_sha256, float(result.test_accuracy)))
        if on_member is not None:
            on_member(i + 1, members)
    return DeepEnsemble(models), records
