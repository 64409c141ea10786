"""The Lightning training pipeline, end to end on digits, and the `orbit train` command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from orbit.errors import UserError
from training.artifacts import load_model
from training.config import TrainConfig
from training.datasets import load_dataset
from training.train import evaluate_split, train

ORBIT = [sys.executable, "-m", "orbit.cli"]


def run_orbit(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*ORBIT, *args], capture_output=True, text=True, timeout=timeout, cwd=Path.cwd()
    )


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_default_digits_cnn_reaches_95_percent_and_writes_loadable_artifacts(tmp_path, digits):
    result = train(TrainConfig(out=tmp_path / "base", progress=False), splits=digits)
    assert result.test_accuracy >= 0.95
    out = tmp_path / "base"
    for name in ("model.safetensors", "model.json", "metrics.json"):
        assert (out / name).is_file()
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "checkpoints" / "best.ckpt").is_file()
    assert list(out.glob("logs/version_*/metrics.csv"))
    info = json.loads((out / "model.json").read_text())
    assert info["dataset"] == "digits" and info["spec"]["arch"] == "cnn"
    assert info["data_fingerprint"] == digits.fingerprint()
    assert {"torch", "pytorch-lightning"} <= set(info["versions"])
    metrics = json.loads((out / "metrics.json").read_text())
    # The conserved quantity of the leaky_relu slot at the end, and its drift from the start.
    assert {"q_mean", "q_drift"} <= set(metrics) and 0 < metrics["q_drift"] < float("inf")
    loaded = load_model(out)
    acc, loss = evaluate_split(loaded.model, digits.test)
    assert acc == pytest.approx(metrics["test_accuracy"]) and acc == result.test_accuracy
    assert loss == pytest.approx(metrics["test_loss"], rel=1e-5)


def test_existing_run_is_refused_unless_overwrite(tmp_path, digits):
    config = dict(out=tmp_path, dataset="digits", model="mlp", epochs=1, progress=False)
    train(TrainConfig(**config), splits=digits)
    before = (tmp_path / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="already holds a run"):
        train(TrainConfig(**config), splits=digits)
    assert (tmp_path / "model.safetensors").read_bytes() == before  # nothing lost
    train(TrainConfig(**config, overwrite=True, seed=1), splits=digits)
    assert (tmp_path / "model.safetensors").read_bytes() != before


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("lr", 0.0, "--lr"), ("epochs", 0, "--epochs"), ("hidden", -1, "--hidden"),
     ("batch_size", 0, "--batch-size"), ("adv_train", "fgsm", "--adv-train")],
)  # fmt: skip
def test_bad_config_is_a_user_error(tmp_path, field, value, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(out=tmp_path, **{field: value})


def test_adversarial_training_uses_pgd_examples_inside_the_budget(digits):
    from training.lightning import ClassifierModule
    from training.models import ModelSpec, build_model

    model = build_model(ModelSpec("mlp", (1, 8, 8), 10))
    module = ClassifierModule(model, 10, adv_eps=0.1, adv_steps=5)
    x, y = digits.train.x[:64], digits.train.y[:64]
    x_adv = module._adversarial(x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and (x_adv - x).abs().max() > 0.05
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    loss = torch.nn.functional.cross_entropy
    assert loss(model(x_adv), y) > loss(model(x), y)
    assert model.training  # the attack restores the training mode


def test_cli_adv_train_writes_the_adv_baseline(tmp_path):
    r = run_orbit(
        "train", "--dataset", "synthetic", "--model", "mlp", "--epochs", "1", "--run",
        str(tmp_path), "--adv-train", "pgd", "--adv-eps", "0.05", "--no-progress",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    info = json.loads((tmp_path / "adv" / "model.json").read_text())
    assert info["adversarial_training"] == {"method": "pgd", "eps": 0.05, "steps": 7}
    assert not (tmp_path / "base").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "imagenet"], "unknown dataset"),
        (["--model", "vit"], "unknown model"),
        (["--lr", "-1"], "--lr"),
        (["--epochs", "0"], "--epochs"),
        (["--dataset", "mnist", "--data-root", "/nonexistent"], "is not a directory"),
        (["--precision", "nope"], "Lightning refuses"),
        (["--strategy", "nope"], "Lightning refuses"),
        (["--seed", "-1"], "--seed"),
        (["--epochs", "abc"], "Invalid value for '--epochs'"),
        (["--activation", "tanh", "--init-q", "1"], "has no linear symmetry"),
        (["--activation", "swish"], "unknown activation 'swish'"),
        (["--bogus"], "No such option: --bogus"),
    ],
)
def test_cli_user_errors_are_one_line_exit_2(tmp_path, args, message):
    r = run_orbit("train", "--run", str(tmp_path / "run"), *args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_overwrite_that_fails_keeps_the_old_run(tmp_path, digits):
    config = dict(out=tmp_path / "base", model="mlp", epochs=1, progress=False)
    train(TrainConfig(**config), splits=digits)
    before = {p.name: p.read_bytes() for p in (tmp_path / "base").iterdir() if p.is_file()}
    with pytest.raises(UserError, match="Lightning refuses"):
        train(TrainConfig(**config, overwrite=True, precision="nope"), splits=digits)
    with pytest.raises(UserError, match="unreachable"):  # a linear slot with h > C cannot
        train(TrainConfig(**config, overwrite=True, activation="linear", init_q=1.0), digits)
    after = {p.name: p.read_bytes() for p in (tmp_path / "base").iterdir() if p.is_file()}
    assert after == before


def test_an_out_that_is_a_file_or_an_interrupted_overwrite_is_a_user_error(tmp_path, digits):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for out in (afile, afile / "base"):
        with pytest.raises(UserError, match="is a file|which is a file"):
            train(TrainConfig(out=out, model="mlp", epochs=1, progress=False), splits=digits)
    assert afile.read_text() == "keep me"
    (tmp_path / ".base.replaced").mkdir()  # what a SIGKILL during --overwrite leaves
    with pytest.raises(UserError, match="interrupted --overwrite"):
        train(TrainConfig(out=tmp_path / "base", overwrite=True, progress=False), splits=digits)
    assert (tmp_path / ".base.replaced").is_dir() and not (tmp_path / "base").exists()


def test_guarded_out_restores_the_old_run_or_leaves_nothing(tmp_path):
    from training.train import _guarded_out

    out = tmp_path / "base"
    out.mkdir()
    (out / "model.json").write_text("old")
    with pytest.raises(RuntimeError), _guarded_out(out, replace=True):
        assert not out.exists()  # the old run is aside while the new one trains
        (out / "checkpoints").mkdir(parents=True)
        raise RuntimeError("training failed")
    assert sorted(p.name for p in out.iterdir()) == ["model.json"]
    assert (out / "model.json").read_text() == "old"
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError), _guarded_out(fresh, replace=False):
        (fresh / "logs").mkdir(parents=True)
        (fresh / "train_config.json").write_text("{}")
        raise RuntimeError("training failed")
    assert not fresh.exists()  # no checkpoint: nothing that would block the next attempt
    with _guarded_out(out, replace=True):
        out.mkdir()
        (out / "model.json").write_text("new")
    assert (out / "model.json").read_text() == "new"
    assert not list(tmp_path.glob(".*replaced"))


def test_resume_from_a_corrupt_checkpoint_is_a_user_error(tmp_path):
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(UserError, match="unreadable.*--overwrite"):
        train(TrainConfig(out=tmp_path, resume=True, progress=False))


def test_ddp_on_two_cpu_processes_writes_the_same_artifacts(tmp_path):
    r = run_orbit(
        "train", "--run", str(tmp_path), "--epochs", "3", "--accelerator", "cpu",
        "--devices", "2", "--strategy", "ddp", "--no-progress",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((tmp_path / "base" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs"] == 3
    loaded = load_model(tmp_path / "base")
    acc, _ = evaluate_split(loaded.model, load_dataset("digits").test)
    assert acc == pytest.approx(metrics["test_accuracy"]) and acc > 0.5


def test_sigkill_after_first_checkpoint_then_resume_finishes(tmp_path):
    args = ["train", "--run", str(tmp_path), "--epochs", "25", "--no-progress"]
    proc = subprocess.Popen([*ORBIT, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = tmp_path / "base" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert last.exists(), "no checkpoint was written"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "base" / "model.json").exists()  # killed before the end
    killed_at = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    assert killed_at < 24
    r = run_orbit(*args, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((tmp_path / "base" / "metrics.json").read_text())
    assert metrics["epochs"] == 25
    loaded = load_model(tmp_path / "base")
    acc, _ = evaluate_split(loaded.model, load_dataset("digits").test)
    assert acc == pytest.approx(metrics["test_accuracy"]) and acc >= 0.9
    assert len(list((tmp_path / "base").glob("logs/version_*"))) == 2  # both attempts logged


def test_resume_without_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="nothing to resume"):
        train(TrainConfig(out=tmp_path, resume=True, progress=False))
