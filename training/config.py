"""Training configuration: one dataclass shared by the CLI, the pipeline and the deep-ensemble
builder (which trains more base models the same way)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from orbit.errors import UserError

# Epochs that reach the documented accuracy on 2 CPU cores; --epochs overrides.
DEFAULT_EPOCHS = {"digits": 30, "synthetic": 10, "fashion-mnist": 2, "mnist": 2, "cifar10": 15}
ADV_TRAIN_METHODS = ("pgd",)


@dataclass
class TrainConfig:
    out: Path
    dataset: str = "digits"
    model: str = "cnn"
    hidden: int = 64
    activation: str = "leaky_relu"
    epochs: int | None = None  # None: DEFAULT_EPOCHS[dataset]
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    data_root: Path | None = None
    resume: bool = False
    overwrite: bool = False
    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    adv_train: str | None = None  # "pgd": Madry-style training on torchattacks PGD examples
    adv_eps: float = 0.1
    adv_steps: int = 7
    init_q: float | None = None  # set the slot's conserved quantity at initialisation
    progress: bool = True

    def __post_init__(self) -> None:
        from training.datasets import DATASETS
        from training.models import ACTIVATIONS, ARCHITECTURES

        # Names first: a typo is reported before any data is loaded.
        for flag, value, choices in (
            ("dataset", self.dataset, DATASETS),
            ("model", self.model, ARCHITECTURES),
            ("activation", self.activation, ACTIVATIONS),
        ):
            if value not in choices:
                raise UserError(f"unknown {flag} {value!r}; choose one of: {', '.join(choices)}")
        self.out = Path(self.out)
        if self.data_root is not None:
            self.data_root = Path(self.data_root)
        if self.epochs is None:
            self.epochs = DEFAULT_EPOCHS.get(self.dataset, 10)
        for name in ("epochs", "hidden", "batch_size", "devices", "num_nodes"):
            value = getattr(self, name)
            if value <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if not 0 <= self.seed < 2**32:
            raise UserError(f"--seed must be in 0..2**32-1, got {self.seed}")
        if not self.lr > 0:
            raise UserError(f"--lr must be a positive learning rate, got {self.lr}")
        if self.adv_train is not None:
            if self.adv_train not in ADV_TRAIN_METHODS:
                raise UserError(
                    f"unknown --adv-train {self.adv_train!r};"
                    f" choose one of: {', '.join(ADV_TRAIN_METHODS)}"
                )
            if not 0 < self.adv_eps <= 1:
                raise UserError(f"--adv-eps must be in (0, 1] (pixel units), got {self.adv_eps}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        d["data_root"] = str(self.data_root) if self.data_root is not None else None
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], **overrides: Any) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in d.items() if k in known}, **overrides})
