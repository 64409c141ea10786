"""The model zoo: every model is normalisation -> trunk -> symmetry slot, from pixels to logits.

The slot is `Linear(d, h) -> activation -> Linear(h, classes)`, reachable as `model.slot.fc1`,
`model.slot.act` and `model.slot.fc2`; the symmetry stage acts on it and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from orbit.errors import UserError

ARCHITECTURES = ("mlp", "cnn", "resnet")
ACTIVATIONS = ("leaky_relu", "tanh", "sigmoid", "gelu", "silu", "elu", "relu", "linear")
LEAKY_SLOPE = 0.01


def make_activation(name: str) -> nn.Module:
    """The slot's elementwise activation by name ('linear' is the identity, for linear slots)."""
    table = {
        "leaky_relu": lambda: nn.LeakyReLU(LEAKY_SLOPE),
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "gelu": nn.GELU,
        "silu": nn.SiLU,
        "elu": nn.ELU,
        "relu": nn.ReLU,
        "linear": nn.Identity,
    }
    if name not in table:
        raise UserError(f"unknown activation {name!r}; choose one of: {', '.join(ACTIVATIONS)}")
    return table[name]()


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model's structure; stored in model.json."""

    arch: str
    input_shape: tuple[int, int, int]
    num_classes: int
    hidden: int = 64
    activation: str = "leaky_relu"
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise UserError(
                f"unknown model {self.arch!r}; choose one of: {', '.join(ARCHITECTURES)}"
            )
        if self.activation not in ACTIVATIONS:
            raise UserError(
                f"unknown activation {self.activation!r}; choose one of: {', '.join(ACTIVATIONS)}"
            )
        if self.hidden <= 0:
            raise UserError(f"--hidden must be a positive width, got {self.hidden}")
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))

    def to_json(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_json(cls, d: dict) -> ModelSpec:
        return cls(**{**d, "input_shape": tuple(d["input_shape"])})


class Normalize(nn.Module):
    """Per-channel standardisation as the first layer, so models (and attacks) work in pixels."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SymmetrySlot(nn.Module):
    """logits = fc2(act(fc1(z))): the two layers whose parameter symmetries orbit exploits."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(hidden, num_classes)

    def pre_activation(self, z: torch.Tensor) -> torch.Tensor:
        """H = z W1^T + b1, the quantity the nonlinear group action transforms."""
        return self.fc1(z)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(z)))


class OrbitClassifier(nn.Module):
    """pixels in [0, 1] -> logits, as normalize -> trunk -> slot."""

    def __init__(self, spec: ModelSpec, trunk: nn.Module, features: int) -> None:
        super().__init__()
        self.spec = spec
        self.normalize = Normalize(spec.mean, spec.std)
        self.trunk = trunk
        self.slot = SymmetrySlot(features, spec.hidden, spec.num_classes, spec.activation)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """z = trunk(normalize(x)): the slot's input, shared by every ensemble member."""
        return self.trunk(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.slot(self.features(x))


def _mlp_trunk(spec: ModelSpec) -> tuple[nn.Module, int]:
    d = math.prod(spec.input_shape)
    width = 256
    return nn.Sequential(nn.Flatten(), nn.Linear(d, width), nn.ReLU()), width


def _cnn_trunk(spec: ModelSpec) -> tuple[nn.Module, int]:
    c, h, w = spec.input_shape
    trunk = nn.Sequential(
        nn.Conv2d(c, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    return trunk, 64 * (h // 4) * (w // 4)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _resnet_trunk(spec: ModelSpec) -> tuple[nn.Module, int]:
    """A small ResNet (three stages of one basic block) for CIFAR-sized inputs."""
    c = spec.input_shape[0]
    trunk = nn.Sequential(
        nn.Conv2d(c, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        _BasicBlock(32, 32, 1),
        _BasicBlock(32, 64, 2),
        _BasicBlock(64, 128, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return trunk, 128


_TRUNKS = {"mlp": _mlp_trunk, "cnn": _cnn_trunk, "resnet": _resnet_trunk}


def build_model(spec: ModelSpec) -> OrbitClassifier:
    """A freshly initialised model for `spec` (seed torch beforehand for reproducibility)."""
    _, h, w = spec.input_shape
    if spec.arch == "cnn" and (h < 4 or w < 4):
        raise UserError(f"the cnn needs images of at least 4x4 pixels, got {h}x{w}")
    trunk, features = _TRUNKS[spec.arch](spec)
    return OrbitClassifier(spec, trunk, features)


def find_slot(model: nn.Module) -> SymmetrySlot:
    """The model's symmetry slot, or a user error naming what is missing."""
    slot = getattr(model, "slot", None)
    if not isinstance(slot, SymmetrySlot):
        raise UserError(
            f"{type(model).__name__} has no symmetry slot (model.slot = Linear -> activation ->"
            " Linear); build it with orbit's model zoo (training.models.build_model)"
        )
    return slot
