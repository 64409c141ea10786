"""Ensemble artifacts: ensemble.safetensors (tensors) + ensemble.json (what they are, and for which
base weights). Loading rebuilds the fused module from these and the base model alone, and refuses
an ensemble built for other base weights. Nothing is unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ensemble.base import FusedEnsemble
from orbit import atomic
from orbit.errors import UserError
from training.artifacts import LoadedModel, file_sha256, library_versions, load_model

FORMAT = "orbit.ensemble/1"
TENSORS = "ensemble.safetensors"
DESCRIPTION = "ensemble.json"
FIDELITY = "fidelity.json"

# Tensors each method needs to rebuild its module (others, e.g. anchors, are kept for the record).
REQUIRED = {"symmetry": ("g", "u"), "random": ("w1", "b1", "w2"), "deep": ()}


@dataclass
class LoadedEnsemble:
    ensemble: FusedEnsemble
    info: dict[str, Any]  # the parsed ensemble.json
    tensors: dict[str, torch.Tensor]


def save_ensemble(
    out_dir: str | Path,
    tensors: dict[str, torch.Tensor],
    info: dict[str, Any],
    fidelity: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write tensors, then fidelity, then the description last (each atomically); returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic.atomic_path(out / TENSORS) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    if fidelity is not None:
        atomic.write_json(out / FIDELITY, fidelity)
    description = {
        "format": FORMAT,
        **info,
        "tensors_sha256": file_sha256(out / TENSORS),
        "versions": library_versions(),
    }
    atomic.write_json(out / DESCRIPTION, description)
    return description


def read_description(ensemble_dir: str | Path) -> dict[str, Any]:
    path = Path(ensemble_dir) / DESCRIPTION
    if not path.is_file():
        raise UserError(f"{path} not found; build the ensemble first (`orbit build`)")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); rebuild it with `orbit build`") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise UserError(f"{path} is not an orbit ensemble description (expected format {FORMAT})")
    if info.get("method") not in REQUIRED:
        raise UserError(f"{path} names an unknown ensemble method {info.get('method')!r}")
    return info


def _read_tensors(ensemble_dir: Path, info: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = ensemble_dir / TENSORS
    if not path.is_file():
        raise UserError(f"{path} not found; the ensemble directory is incomplete, rebuild it")
    digest = file_sha256(path)
    if info.get("tensors_sha256") not in (None, digest):
        raise UserError(
            f"{path} does not match {DESCRIPTION} (sha256 {digest[:12]} !="
            f" {str(info['tensors_sha256'])[:12]}); rebuild with `orbit build --overwrite`"
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); rebuild it") from None
    missing = [k for k in REQUIRED[info["method"]] if k not in tensors]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; rebuild it with `orbit build`")
    return tensors


def check_base(info: dict[str, Any], base: LoadedModel, where: Path) -> None:
    """Refuse an ensemble whose recorded base-weight hash is not the given base's."""
    expected = info.get("base_weights_sha256")
    if expected != base.weights_sha256:
        raise UserError(
            f"{where} was built for base weights {str(expected)[:12]}, but the base model now has"
            f" {base.weights_sha256[:12]}; rebuild it with `orbit build --overwrite`"
        )


def load_ensemble(ensemble_dir: str | Path, base: LoadedModel) -> LoadedEnsemble:
    """Rebuild the fused ensemble stored in ensemble_dir on top of `base` (eval mode, float32)."""
    from ensemble.deep import DeepEnsemble
    from ensemble.perturbed import PerturbedEnsemble
    from ensemble.symmetry import SymmetryEnsemble

    ensemble_dir = Path(ensemble_dir)
    info = read_description(ensemble_dir)
    check_base(info, base, ensemble_dir)
    tensors = _read_tensors(ensemble_dir, info)
    method = info["method"]
    try:
        if method == "symmetry":
            ensemble: FusedEnsemble = SymmetryEnsemble(base.model, tensors["g"], tensors["u"])
        elif method == "random":
            ensemble = PerturbedEnsemble(base.model, tensors["w1"], tensors["b1"], tensors["w2"])
        else:
            ensemble = DeepEnsemble(_load_deep_members(ensemble_dir, info))
        ensemble.member_logits(torch.zeros(1, *base.model.spec.input_shape))
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"{ensemble_dir / TENSORS} does not fit the base model ({first}); rebuild it"
        ) from None
    return LoadedEnsemble(ensemble.eval(), info, tensors)


def _load_deep_members(ensemble_dir: Path, info: dict[str, Any]) -> list:
    members = info.get("deep_members")
    if not isinstance(members, list) or not members:
        raise UserError(f"{ensemble_dir / DESCRIPTION} lists no deep members; rebuild it")
    models = []
    for m in members:
        path = Path(m["dir"])
        path = path if path.is_absolute() else ensemble_dir / path
        loaded = load_model(path)
        if loaded.weights_sha256 != m.get("weights_sha256"):
            raise UserError(
                f"deep member {path} changed since the ensemble was built (sha256"
                f" {loaded.weights_sha256[:12]} != {str(m.get('weights_sha256'))[:12]});"
                " rebuild with `orbit build --method deep --overwrite`"
            )
        models.append(loaded.model)
    return models
