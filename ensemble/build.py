"""The builders' entry point (what `orbit build` runs): build one ensemble of a trained base model,
certify it (fidelity.json) and write its artifacts into an explicit directory.

Importing this module is cheap (no torch); the CLI still imports it only inside the command, because
the serving image ships orbit/ and serve/ alone.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orbit.errors import UserError
from orbit.layout import ENSEMBLE_METHODS as METHODS

if TYPE_CHECKING:
    import torch

    from ensemble.base import FusedEnsemble
    from training.artifacts import LoadedModel
    from training.datasets import DatasetSplits

# Chosen by the sweep in the build note (digits cnn and Fashion-MNIST cnn, N = 64, k = 32): the
# largest eps of the grid at which the ensemble keeps the base's test accuracy (>= base - 0.5
# points) and members agree with the base on >= 90% of test inputs, on both models.
DEFAULT_EPS = 0.5
DEFAULT_MEMBERS = {"symmetry": 64, "random": 64, "deep": 5}
# The settings of the symmetry build a random baseline is matched to (recorded in `matched_to`).
MATCHED_SETTINGS = ("members", "eps", "anchors", "algebra", "seed")
FIDELITY_STEPS = 3  # train, val, test

Progress = Callable[[str], None]  # called once per finished step, with what comes next


@dataclass
class BuildRequest:
    method: str = "symmetry"
    members: int | None = None  # None: DEFAULT_MEMBERS[method]
    eps: float | None = None  # None: DEFAULT_EPS
    anchors: int | None = None  # None: hidden // 2
    algebra: str = "gl"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            choices = ", ".join(METHODS)
            raise UserError(f"unknown --method {self.method!r}; choose one of: {choices}")
        if self.members is None:
            self.members = DEFAULT_MEMBERS[self.method]
        if self.eps is None:
            self.eps = DEFAULT_EPS
        if self.members <= 0:
            raise UserError(f"--members must be positive, got {self.members}")
        if not self.eps > 0:
            raise UserError(f"--eps must be positive, got {self.eps}")
        if self.anchors is not None and self.anchors <= 0:
            raise UserError(f"--anchors must be positive, got {self.anchors}")
        if self.seed < 0:
            raise UserError(f"--seed must be non-negative, got {self.seed}")


@dataclass
class BuildOutcome:
    ensemble: FusedEnsemble
    info: dict[str, Any]  # what ensemble.json holds
    fidelity: dict[str, Any]  # what fidelity.json holds
    warnings: list[str] = field(default_factory=list)
    build_seconds: float = 0.0
    fidelity_seconds: float = 0.0


def total_steps(request: BuildRequest) -> int:
    """How many times `build_ensemble` calls `progress` (for a progress bar)."""
    assert request.members is not None
    return (request.members if request.method == "deep" else 1) + FIDELITY_STEPS


def _check_inputs(base: LoadedModel, splits: DatasetSplits, request: BuildRequest) -> int:
    """Validate the base/data pair and return k (the number of anchors per member)."""
    from ensemble.anchors import check_anchor_count, default_anchors
    from training.models import find_slot

    slot = find_slot(base.model)
    fingerprint = base.info.get("data_fingerprint")
    if fingerprint and fingerprint != splits.fingerprint():
        raise UserError(
            f"the {splits.name} training data differs from the data the base model was trained on"
            " (fingerprint mismatch); pass the same --data-root as for `orbit train`"
        )
    if tuple(splits.input_shape) != tuple(base.model.spec.input_shape):
        raise UserError(
            f"dataset {splits.name} has inputs {list(splits.input_shape)}, the base model expects"
            f" {list(base.model.spec.input_shape)}"
        )
    if request.method == "deep":  # trained members: no anchors
        return 0
    k = request.anchors if request.anchors is not None else default_anchors(slot.fc1.out_features)
    check_anchor_count(k, len(splits.train))
    return k


def build_ensemble(
    base: LoadedModel,
    splits: DatasetSplits,
    request: BuildRequest,
    out_dir: str | Path,
    *,
    members_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> BuildOutcome:
    """Build, certify and save one ensemble into out_dir (the caller makes that atomic).

    members_dir is where a deep ensemble's member models are trained (default out_dir/members).
    """
    from ensemble.artifacts import save_ensemble
    from ensemble.fidelity import fidelity_report
    from ensemble.symmetry import ANCHOR_TOLERANCE

    out = Path(out_dir)
    step = progress or (lambda _next: None)
    k = _check_inputs(base, splits, request)
    assert request.members is not None
    info: dict[str, Any] = {
        "method": request.method,
        "members": request.members,
        "eps": request.eps if request.method != "deep" else None,
        "algebra": request.algebra if request.method != "deep" else None,
        "anchors": k if request.method != "deep" else None,
        "seed": request.seed,
        "base_weights_sha256": base.weights_sha256,
        "dataset": splits.name,
        "class_names": list(splits.class_names),
        "input_shape": list(splits.input_shape),
        "hidden": base.model.spec.hidden,
        "activation": base.model.spec.activation,
    }
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if request.method == "deep":
            ensemble, tensors, cert = _deep(base, splits, request, out, members_dir, info, step)
        else:
            ensemble, tensors, cert = _orbit(base, splits, request, k, info)
            step("fidelity: train split")
    notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if request.method == "random":  # its notes come from the symmetry build it is matched to
        notes = [f"the symmetry members this baseline is matched to: {n}" for n in notes]
    build_seconds = time.perf_counter() - started

    started = time.perf_counter()
    names = iter(("fidelity: validation split", "fidelity: test split", "saving"))
    fidelity = fidelity_report(
        ensemble, base.model, splits, **cert, on_split=lambda _name: step(next(names))
    )
    fidelity_seconds = time.perf_counter() - started
    fidelity["build_seconds"] = round(build_seconds, 3)
    fidelity["fidelity_seconds"] = round(fidelity_seconds, 3)
    worst = fidelity["anchors"]["max_abs_logit_diff"]
    if cert.get("exact_expected") and worst is not None and worst > ANCHOR_TOLERANCE:
        notes.append(
            f"max |logit diff| on anchors is {worst:.2e} > {ANCHOR_TOLERANCE:.0e} in float32;"
            " members are not numerically exact on their anchors (see fidelity.json)"
        )
    info["build_seconds"] = round(build_seconds, 3)
    save_ensemble(out, tensors, info, fidelity)
    return BuildOutcome(ensemble, info, fidelity, notes, build_seconds, fidelity_seconds)


def _orbit(
    base: LoadedModel, splits: DatasetSplits, request: BuildRequest, k: int, info: dict[str, Any]
) -> tuple[FusedEnsemble, dict[str, torch.Tensor], dict[str, Any]]:
    """The symmetry ensemble, or the random baseline matched to it in parameter distance."""
    import torch

    from ensemble.perturbed import build_random, perturbed_distance
    from ensemble.symmetry import build_symmetry

    assert request.members is not None
    sym = build_symmetry(
        base.model,
        splits.train.x,
        splits.train.y,
        members=request.members,
        eps=request.eps,
        anchors=k,
        algebra=request.algebra,
        seed=request.seed,
    )
    exact = k <= sym.g.shape[-1]
    if request.method == "symmetry":
        info["max_condition"] = sym.max_condition
        info["exact_on_anchors"] = exact
        tensors = {
            "g": sym.g.to(torch.float32),
            "u": sym.u.to(torch.float32),
            "anchors": sym.anchors,
            "condition": sym.condition,
            "distance": sym.distance,
            "redraws": sym.redraws,
        }
        cert = {
            "anchors": sym.anchors,
            "condition": sym.condition,
            "distance": sym.distance,
            "redraws": sym.redraws,
            "exact_expected": exact,
        }
        return sym.ensemble, tensors, cert
    ensemble = build_random(base.model, sym.distance, request.seed)
    distance = perturbed_distance(ensemble, base.model)
    info["matched_to"] = {
        "method": "symmetry",
        **{key: info[key] for key in MATCHED_SETTINGS},
        "mean_parameter_distance": float(sym.distance.mean()),
        "note": "member n is a Gaussian direction scaled to symmetry member n's distance",
    }
    w1, b1, w2 = ensemble.member_heads()
    tensors = {"w1": w1, "b1": b1, "w2": w2, "distance": distance}
    # The symmetry members' anchors, to show what a random move of the same size does there.
    cert = {"anchors": sym.anchors, "distance": distance, "exact_expected": False}
    return ensemble, tensors, cert


def _deep(
    base: LoadedModel,
    splits: DatasetSplits,
    request: BuildRequest,
    out: Path,
    members_dir: str | Path | None,
    info: dict[str, Any],
    step: Progress,
) -> tuple[FusedEnsemble, dict[str, torch.Tensor], dict[str, Any]]:
    import torch

    from ensemble.deep import build_deep

    assert request.members is not None
    target = Path(members_dir) if members_dir is not None else out / "members"

    def on_member(done: int, total: int) -> None:
        step("fidelity: train split" if done == total else f"training member {done + 1}/{total}")

    ensemble, records = build_deep(
        base.info,
        splits,
        members=request.members,
        seed=request.seed,
        members_dir=target,
        on_member=on_member,
    )
    info["deep_members"] = [
        {
            "dir": str(_relative(r.path, out)),
            "seed": r.seed,
            "weights_sha256": r.weights_sha256,
            "test_accuracy": r.test_accuracy,
        }
        for r in records
    ]
    tensors = {"seeds": torch.tensor([r.seed for r in records], dtype=torch.int64)}
    return ensemble, tensors, {}


def _relative(path: Path, root: Path) -> Path:
    """path relative to root when it lies inside it (the ensemble directory can then move)."""
    try:
        return path.resolve().relative_to(root.resolve())
    except ValueError:
        return path.resolve()
