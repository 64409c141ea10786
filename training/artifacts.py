"""Base-model artifacts: model.safetensors (weights) + model.json (how to rebuild them).

A model is rebuilt from these two files alone; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from orbit import __version__, atomic
from orbit.errors import UserError
from training.models import ModelSpec, OrbitClassifier, build_model

FORMAT = "orbit.model/1"
WEIGHTS = "model.safetensors"
DESCRIPTION = "model.json"


@dataclass
class LoadedModel:
    model: OrbitClassifier
    info: dict[str, Any]  # the parsed model.json
    weights_sha256: str


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "orbit": __version__}
    for pkg in ("torch", "torchvision", "pytorch-lightning", "torchattacks", "safetensors", "onnx"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return versions


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_model(out_dir: str | Path, model: OrbitClassifier, info: dict[str, Any]) -> str:
    """Write weights then description (each atomically); returns the weights' SHA-256."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic.atomic_path(out / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    digest = file_sha256(out / WEIGHTS)
    description = {
        "format": FORMAT,
        "spec": model.spec.to_json(),
        **info,
        "weights_sha256": digest,
        "versions": library_versions(),
    }
    atomic.write_json(out / DESCRIPTION, description)
    return digest


def read_description(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / DESCRIPTION
    if not path.is_file():
        raise UserError(f"{path} not found; train a model first (`orbit train`) or check the path")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); retrain or restore it") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or "spec" not in info:
        raise UserError(f"{path} is not an orbit model description (expected format {FORMAT})")
    return info


def load_model(model_dir: str | Path) -> LoadedModel:
    """Rebuild the model from model.json and load model.safetensors into it (eval mode)."""
    model_dir = Path(model_dir)
    info = read_description(model_dir)
    weights = model_dir / WEIGHTS
    if not weights.is_file():
        raise UserError(f"{weights} not found; the model directory is incomplete, retrain it")
    try:
        spec = ModelSpec.from_json(info["spec"])
    except (TypeError, KeyError, ValueError) as e:
        raise UserError(f"{model_dir / DESCRIPTION} has an invalid model spec ({e})") from None
    model = build_model(spec)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{weights} is not a readable safetensors file ({e}); retrain it") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise UserError(f"{weights} does not match {DESCRIPTION} ({first})") from None
    model.eval()
    digest = file_sha256(weights)
    expected = info.get("weights_sha256")
    if expected and expected != digest:
        raise UserError(
            f"{weights} changed since {DESCRIPTION} was written (sha256 {digest[:12]} !="
            f" {expected[:12]}); retrain or restore the original weights"
        )
    return LoadedModel(model=model, info=info, weights_sha256=digest)


def state_dict_sha256(model: torch.nn.Module) -> str:
    """A hash of the weights themselves (independent of the file container)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
