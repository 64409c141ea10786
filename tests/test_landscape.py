"""Q monitoring during Lightning training, the four landscape experiments, `orbit landscape`."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from typer.testing import CliRunner

from orbit.cli import app
from orbit.errors import UserError
from symmetry.conserved import relative_drift, slot_q, slot_q_scale
from symmetry.flat_minimum import set_slot_q
from training.config import TrainConfig
from training.datasets import load_dataset
from training.landscape import make_config, run_experiment
from training.landscape.common import (
    Problem,
    rank_correlation,
    teacher_problem,
    top_hessian_eigenvalue,
    train,
    xavier_params,
)
from training.lightning import ClassifierModule, SplitsDataModule
from training.models import ModelSpec, build_model
from training.q_monitor import QMonitor
from training.train import train as train_pipeline

PNG = b"\x89PNG\r\n\x1a\n"


def _strict_json(path: Path) -> dict:
    """The file parsed as strict JSON: NaN / Infinity (which json.dumps writes by default, and
    no other JSON reader accepts) fail the test."""

    def reject(constant: str) -> None:
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=reject)


def _metric_rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def _fit(
    tmp_path: Path, activation: str, init_q: float | None = None
) -> tuple[QMonitor, torch.nn.Module, list[dict]]:
    torch.manual_seed(0)
    splits = load_dataset("synthetic", None)
    model = build_model(ModelSpec("mlp", splits.input_shape, splits.num_classes, 16, activation))
    if init_q is not None:
        set_slot_q(model.slot, init_q)
    module = ClassifierModule(model, splits.num_classes, lr=1e-2, epochs=2)
    monitor = QMonitor()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="logs"),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, SplitsDataModule("synthetic", None, 128, splits))
    return monitor, model, _metric_rows(Path(trainer.logger.log_dir) / "metrics.csv")


def test_q_monitor_logs_q_and_its_drift_every_epoch(tmp_path: Path) -> None:
    monitor, model, rows = _fit(tmp_path, "leaky_relu")
    logged = [r for r in rows if r.get("q_norm")]
    assert len(logged) == 2  # one row per epoch
    q_end = slot_q(model.slot).double()
    assert monitor.q_start is not None
    last = logged[-1]
    assert math.isclose(float(last["q_norm"]), float(q_end.norm()), rel_tol=1e-6)
    assert math.isclose(float(last["q_norm_start"]), float(monitor.q_start.norm()), rel_tol=1e-6)
    drift = relative_drift(q_end, monitor.q_start)
    assert math.isclose(float(last["q_drift"]), drift, rel_tol=1e-6)
    assert drift > 1e-3  # minibatch Adam with lr 1e-2 does not conserve Q
    restored = QMonitor()
    restored.load_state_dict(monitor.state_dict())  # --resume keeps the start value
    assert torch.equal(restored.q_start, monitor.q_start)


def test_q_monitor_drift_stays_finite_from_balanced_layers(tmp_path: Path) -> None:
    """With --init-q 0 the start is Q = 0 up to float32 rounding: drift is measured against
    1e-3 of the layers' size instead of dividing by (nearly) zero."""
    monitor, model, rows = _fit(tmp_path, "relu", init_q=0.0)
    q_start = monitor.q_start
    assert q_start is not None and monitor.drift_scale is not None
    start_scale = monitor.drift_scale
    assert float(q_start.norm()) < 1e-3 * start_scale  # so the denominator is not ||Q_start||
    q_end = slot_q(model.slot).double()
    last = [r for r in rows if r.get("q_drift")][-1]
    expected = float((q_end - q_start).norm()) / start_scale
    assert math.isclose(float(last["q_drift"]), expected, rel_tol=1e-6)
    assert 0 < expected < 1e6 and slot_q_scale(model.slot) > 0


def test_q_monitor_does_nothing_without_a_conserved_quantity(tmp_path: Path) -> None:
    monitor, _, rows = _fit(tmp_path, "tanh")
    assert monitor.q_start is None
    assert rows and not any(k.startswith("q_") for k in rows[0])


def test_training_pipeline_with_init_q_records_q_from_the_requested_value(tmp_path: Path) -> None:
    config = TrainConfig(
        out=tmp_path / "base", dataset="synthetic", model="mlp", hidden=16, epochs=1,
        activation="leaky_relu", init_q=-1.5, progress=False,
    )  # fmt: skip
    train_pipeline(config)
    csvs = list((tmp_path / "base").rglob("metrics.csv"))
    rows = [r for r in _metric_rows(csvs[0]) if r.get("q_norm_start")]
    assert math.isclose(float(rows[0]["q_norm_start"]), 1.5 * math.sqrt(16), rel_tol=1e-5)


def test_top_hessian_eigenvalue_matches_the_full_hessian() -> None:
    gen = torch.Generator().manual_seed(0)
    problem = teacher_problem("leaky_relu", 16, 4, 3, 4, gen)
    p = train(xavier_params(4, 6, 3, gen), problem, 0.05, 300, every=300).params
    names = problem.trainable(p)
    sizes = [p[k].numel() for k in names]

    def loss_flat(v: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(names, torch.split(v, sizes), strict=True))
        return problem.loss({k: parts[k].reshape(p[k].shape) for k in names})

    full = torch.func.hessian(loss_flat)(torch.cat([p[k].reshape(-1) for k in names]))
    eig = torch.linalg.eigvalsh(full)
    top = float(eig[eig.abs().argmax()])
    assert math.isclose(top_hessian_eigenvalue(p, problem, iters=500), top, rel_tol=1e-6)


SMALL = {
    "dynamics": {"steps": 100, "every": 10, "samples": 6, "inputs": 8, "hidden": 6},
    "distribution": {"widths": (4, 16), "draws": 4},
    "convergence": {"targets": (-1.0, 0.0, 1.0), "steps": 200, "samples": 16},
    "sharpness": {"targets": (-1.0, 1.0), "steps": 100, "hessian_iters": 50, "samples": 16},
}


@pytest.mark.parametrize("name", list(SMALL))
def test_each_experiment_writes_json_and_png(tmp_path: Path, name: str) -> None:
    json_path, png_path, result = run_experiment(name, tmp_path, make_config(name, **SMALL[name]))
    assert png_path.read_bytes()[:8] == PNG
    on_disk = _strict_json(json_path)
    assert on_disk["experiment"] == name and on_disk["summary"] == json.loads(
        json.dumps(result["summary"])
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    s = on_disk["summary"]
    if name == "dynamics":
        assert max(s["gd_relative_drift_max"].values()) < 1e-3
        assert on_disk["activations"]["radial"]["cancellation_max"] < 1e-10
    elif name == "distribution":  # Xavier's per-neuron Q narrows as the width grows
        assert s["xavier_relu_range_98"]["16"] < s["xavier_relu_range_98"]["4"]
    elif name == "convergence":  # every run starts from the same function, hence the same loss
        assert s["linear"]["start_loss_spread"] < 1e-9
    else:  # moving along the minimum keeps the loss, and changes the sharpness
        for act in ("linear", "leaky_relu"):
            assert s[act]["loss_spread_along_minimum"] < 1e-9
            assert len(set(s[act]["top_eigenvalue_along_minimum"].values())) == 2
            # whether each run reached a minimum: its final loss and gradient norm, every run
            runs = on_disk["activations"][act]["trained"]
            assert set(s[act]["loss_end_trained"]) == {"xavier", "-1", "1"}
            for r in runs:
                k = "xavier" if r["target_q"] is None else f"{r['target_q']:g}"
                assert s[act]["loss_end_trained"][k] == r["loss_end"] < r["loss_start"]
                assert s[act]["grad_norm_end_trained"][k] == r["grad_norm_end"] > 0
            assert s[act]["rho_abs_q_vs_sharpness_trained"] is None  # 2 targets: undefined
            assert s[act]["sharper_with_larger_abs_q"] is None


def test_sharpness_reports_the_gradient_norm_where_each_run_ends() -> None:
    from training.landscape import sharpness

    cfg = make_config(
        "sharpness", activations=("leaky_relu",), targets=(0.0,), steps=50, hessian_iters=20
    )
    result = sharpness.run(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    problem = teacher_problem(
        "leaky_relu", cfg.samples, cfg.inputs, cfg.outputs, cfg.teacher_hidden, gen
    )
    p0 = xavier_params(cfg.inputs, cfg.hidden["leaky_relu"], cfg.outputs, gen)
    end = train(p0, problem, cfg.lr, cfg.steps, every=cfg.steps)
    leaves = {k: v.clone().requires_grad_(True) for k, v in end.params.items()}
    grads = torch.autograd.grad(problem.loss(leaves), list(leaves.values()))
    expected = float(torch.sqrt(sum(t.square().sum() for t in grads)))
    summary = result["summary"]["leaky_relu"]
    assert summary["grad_norm_end_trained"]["xavier"] == pytest.approx(expected, rel=1e-9)
    assert summary["loss_end_trained"]["xavier"] == pytest.approx(end.loss[-1], rel=1e-12)


def test_training_records_where_it_diverges() -> None:
    gen = torch.Generator().manual_seed(0)
    problem = teacher_problem("linear", 16, 4, 3, 4, gen)
    p0 = xavier_params(4, 6, 3, gen)
    blown = train(p0, problem, 1e3, 50, every=10)
    assert blown.diverged_at is not None and 0 < blown.diverged_at < 10
    assert blown.steps[-1] == blown.diverged_at and not math.isfinite(blown.loss[-1])
    calm = train(p0, problem, 1e-2, 50, every=10)
    assert calm.diverged_at is None and calm.steps[-1] == 50


def test_a_diverged_experiment_writes_strict_json_and_says_so(tmp_path: Path) -> None:
    """The reviewer's case: lr 1e3 diverges at once; the loss must not read as loss_start, and
    no NaN may reach the JSON; undefined statistics are null, not False."""
    cfg = make_config("convergence", lr=1e3, steps=5, targets=(-1.0, 0.0, 1.0), samples=16)
    json_path, _, result = run_experiment("convergence", tmp_path, cfg)
    on_disk = _strict_json(json_path)
    assert on_disk == result
    for act in ("linear", "leaky_relu"):
        for r in on_disk["activations"][act]["runs"]:
            assert r["diverged_at_step"] is not None and r["diverged_at_step"] <= 5
            assert r["loss_end"] is None or r["loss_end"] > 1e6 * r["loss_start"]
        s = on_disk["summary"][act]
        assert set(s["diverged_at_step"]) == {"-1", "0", "1"}
        assert s["rho_abs_q_vs_steps_to_1pct"] is None  # every run tied at "never"
        assert s["faster_with_larger_abs_q"] is None
    cfg = make_config("dynamics", lr=1e3, adam_lr=1e3, steps=20, samples=6, inputs=8, hidden=6)
    json_path, _, _ = run_experiment("dynamics", tmp_path, cfg)
    s = _strict_json(json_path)["summary"]
    assert s["diverged_at_step"] and s["gd_within_1e-3"] is None


def test_distribution_with_one_width_has_nothing_to_compare(tmp_path: Path) -> None:
    cfg = make_config("distribution", widths=(1,), draws=1)
    json_path, _, _ = run_experiment("distribution", tmp_path, cfg)
    on_disk = _strict_json(json_path)
    s = on_disk["summary"]
    assert s["relu_range_shrinks_with_width"] is None
    assert s["linear_range_shrinks_with_width"] is None
    assert on_disk["stats"]["xavier"]["1"]["relu_imbalance"]["std"] is None  # one value
    # widths in any order: the narrowest is compared with the widest
    json_path, _, _ = run_experiment(
        "distribution", tmp_path, make_config("distribution", widths=(16, 4), draws=4)
    )
    assert _strict_json(json_path)["summary"]["relu_range_shrinks_with_width"] is True


def test_rank_correlation_is_none_where_undefined() -> None:
    assert rank_correlation([1.0, 2.0], [3.0, 4.0]) is None
    assert rank_correlation([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]) is None
    assert rank_correlation([1.0, 2.0, 3.0], [1.0, float("nan"), 2.0]) is None
    assert rank_correlation([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)


def _forbid_running(monkeypatch: pytest.MonkeyPatch) -> None:
    from training.landscape import distribution

    def run(cfg: object) -> dict:
        raise AssertionError("the experiment ran although --out is unusable")

    monkeypatch.setattr(distribution, "run", run)


def test_unusable_out_is_a_user_error_before_the_experiment_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _forbid_running(monkeypatch)
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for out in (afile, afile / "sub", afile / "sub" / "deeper"):
        with pytest.raises(UserError, match=f"--out {out}"):
            run_experiment("distribution", out, make_config("distribution", draws=1))
    assert afile.read_text() == "keep me"

    def unwritable(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(kwargs.get("dir")))

    monkeypatch.setattr("tempfile.mkstemp", unwritable)
    new = tmp_path / "new" / "out"
    with pytest.raises(UserError, match="Permission denied"):
        run_experiment("distribution", new, make_config("distribution", draws=1))
    assert not (tmp_path / "new").exists()  # the directories it made for nothing are gone


def test_a_failed_run_leaves_no_directory_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _forbid_running(monkeypatch)
    with pytest.raises(AssertionError, match="ran although"):
        run_experiment("distribution", tmp_path / "a" / "b", make_config("distribution"))
    assert list(tmp_path.iterdir()) == []


def test_cli_out_under_a_file_is_one_line_exit_2(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "orbit.cli", "landscape", "dynamics", "--out", str(afile / "sub")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Not a directory" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stdout == ""  # refused before running: no summary printed


def test_make_config_rejects_options_of_other_experiments() -> None:
    with pytest.raises(UserError, match="--draws does not apply to the dynamics"):
        make_config("dynamics", draws=3)
    with pytest.raises(UserError, match="unknown experiment"):
        make_config("nope")


def test_cli_landscape_writes_into_out(tmp_path: Path) -> None:
    out = tmp_path / "land"
    result = CliRunner().invoke(
        app, ["landscape", "distribution", "--widths", "4,8", "--draws", "2", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert (out / "distribution.json").is_file() and (out / "distribution.png").is_file()
    assert "relu_range_shrinks_with_width" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["landscape", "wobble"], "unknown experiment 'wobble'"),
        (["landscape", "dynamics", "--lr", "0"], "--lr must be positive"),
        (["landscape", "distribution", "--widths", "4,x"], "--widths must be"),
        (["landscape", "sharpness", "--draws", "3"], "--draws does not apply"),
        (["landscape", "distribution", "--widths", "8,40000"], "--widths 40000 is beyond"),
        (["landscape", "dynamics", "--seed", str(2**70)], "--seed must be in"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "orbit.cli", *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_problem_freezes_what_it_is_told() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    problem = Problem(x, y, "tanh", frozen=("b1",))
    p0 = xavier_params(3, 5, 2, gen)
    p0["b1"] = torch.ones(5, dtype=torch.float64)
    p = train(p0, problem, 0.1, 20).params
    assert torch.equal(p["b1"], p0["b1"]) and not torch.equal(p["w1"], p0["w1"])
