"""Base-model artifacts: safetensors + JSON round trip, and refusal of damaged files."""

from __future__ import annotations

import json

import pytest
import torch

from orbit.errors import UserError
from training.artifacts import load_model, save_model
from training.models import ModelSpec, build_model


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelSpec("cnn", (1, 8, 8), 10, mean=[0.3], std=[0.4])).eval()
    save_model(tmp_path, model, {"dataset": "digits", "class_names": [str(i) for i in range(10)]})
    return tmp_path, model


@pytest.mark.parametrize("arch", ["mlp", "cnn", "resnet"])
def test_round_trip_gives_identical_logits(tmp_path, arch):
    torch.manual_seed(1)
    shape = (3, 32, 32) if arch == "resnet" else (1, 8, 8)
    model = build_model(ModelSpec(arch, shape, 10)).eval()
    save_model(tmp_path, model, {"dataset": "x"})
    loaded = load_model(tmp_path)
    x = torch.rand(5, *shape)
    assert torch.equal(model(x), loaded.model(x))
    assert loaded.info["dataset"] == "x" and len(loaded.weights_sha256) == 64
    assert not any(p.suffix == ".tmp" for p in tmp_path.iterdir())


def test_changed_weights_are_refused(saved):
    path, _ = saved
    info = json.loads((path / "model.json").read_text())
    info["weights_sha256"] = "0" * 64
    (path / "model.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match="changed since"):
        load_model(path)


def test_corrupt_weights_are_a_user_error(saved):
    path, _ = saved
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="safetensors"):
        load_model(path)


def test_missing_or_foreign_description(saved, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(UserError, match="not found"):
        load_model(empty)
    path, _ = saved
    (path / "model.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_model(path)
    (path / "model.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(UserError, match="not an orbit model"):
        load_model(path)


def test_atomic_writes_respect_the_umask(tmp_path):
    """The serving image runs as another user: artifacts must not be owner-only (mkstemp's 0600)."""
    import os

    from orbit import atomic

    old = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "a.txt", "x")
        with atomic.atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
