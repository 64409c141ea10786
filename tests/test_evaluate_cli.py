"""`orbit evaluate` on a real run directory (trained base + built symmetry ensemble): the report,
2 DDP processes giving exactly the single-process numbers, and one-line user errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orbit.cli import app
from orbit.errors import UserError
from training.config import TrainConfig
from training.train import train

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--samples", "48", "--batch-size", "16", "--attacks", "fgsm,pgd", "--eps", "0,0.1",
        "--steps", "5", "--no-progress"]  # fmt: skip


def orbit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orbit.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """runs/NAME with a base MLP trained by the real pipeline and an 8-member symmetry ensemble."""
    run = tmp_path_factory.mktemp("runs") / "digits"
    config = TrainConfig(
        out=run / "base", dataset="digits", model="mlp", hidden=32, epochs=2, progress=False
    )
    train(config)
    result = CliRunner().invoke(
        app, ["build", "--run", str(run), "--members", "8", "--anchors", "16", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture(scope="module")
def single(run_dir) -> dict:
    result = CliRunner().invoke(app, ["evaluate", "--run", str(run_dir), *ARGS])
    assert result.exit_code == 0, result.output
    assert "sanity checks:" in result.output
    return json.loads((run_dir / "report" / "report.json").read_text())


def _numbers(report: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in report["rows"]]


def test_evaluate_compares_base_and_ensemble_and_writes_the_report(run_dir, single):
    assert list(single["models"]) == ["base", "symmetry"]
    assert single["status"] == "complete"
    assert single["data"]["samples"] == 48 and single["data"]["dataset"] == "digits"
    assert {r["threat"] for r in single["rows"]} == {"clean", "transfer", "white-box", "any"}
    worst = [r for r in single["rows"] if r["role"] == "worst-case"]
    assert {(r["model"], r["eps"]) for r in worst} == {("base", 0.1), ("symmetry", 0.1)}
    report_dir = run_dir / "report"
    assert (report_dir / "report.md").is_file()
    assert (report_dir / "accuracy_pgd_white-box.png").stat().st_size > 0
    base = [c for c in single["sanity"] if c["model"] == "base"]
    assert {c["status"] for c in base} <= {"passed", "skipped"}, base


def test_two_ddp_processes_give_exactly_the_single_process_numbers(run_dir, single):
    out = run_dir / "report-ddp"
    proc = orbit("evaluate", "--run", str(run_dir), *ARGS, "--out", str(out),
                 "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((out / "report.json").read_text())
    assert ddp["environment"]["world_size"] == 2
    assert single["environment"]["world_size"] == 1
    assert _numbers(ddp) == _numbers(single)


def test_a_process_left_without_a_batch_still_gives_the_single_process_numbers(run_dir):
    # 10 inputs in batches of 16: one batch, so the second process has nothing to attack.
    small = ["--samples", "10", "--batch-size", "16", "--attacks", "fgsm", "--eps", "0,0.1",
             "--no-progress"]  # fmt: skip
    one, two = run_dir / "report-small-1", run_dir / "report-small-2"
    result = CliRunner().invoke(app, ["evaluate", "--run", str(run_dir), *small, "--out", str(one)])
    assert result.exit_code == 0, result.output
    proc = orbit("evaluate", "--run", str(run_dir), *small, "--out", str(two),
                 "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((two / "report.json").read_text())
    assert ddp["environment"]["world_size"] == 2
    assert _numbers(ddp) == _numbers(json.loads((one / "report.json").read_text()))


def test_bad_input_is_one_line_and_exit_code_2(run_dir):
    proc = orbit("evaluate", "--run", str(run_dir), "--attacks", "fgsm,deepfool")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "orbit: error: unknown attack 'deepfool'; choose from: fgsm, pgd, pgd-l2, apgd-ce,"
        " apgd-dlr, autoattack, square, cw"
    ]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--threat", "transfer,grey-box"], "unknown threat model 'grey-box'"),
        (["--eps", "0,-0.1"], "must be finite and >= 0"),
        (["--samples", "100000"], "more than the 359 inputs of the digits test split"),
        (["--models", "base,deep"], "'deep' is not in"),
        (["--strategy", "ddp_spawn"], "use --strategy ddp"),
        (["--strategy", "bogus"], "Lightning refuses"),
        (["--eps", "0,inf"], "finite"),
        (["--attacks", "autoattack", "--threat", "transfer"], "has no transfer version"),
        (["--attacks", "fgsm,pgd", "--threat", "black-box"], "fgsm is a gradient attack"),
    ],
)
def test_user_errors_name_the_problem(run_dir, tmp_path, args, message):
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["evaluate", "--run", str(run_dir), "--out", str(out), *args])
    assert isinstance(result.exception, UserError)
    assert message in str(result.exception)
    assert not out.exists()  # nothing written before the input was checked


def test_a_report_folder_that_cannot_be_made_is_one_line_exit_2(run_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = orbit("evaluate", "--run", str(run_dir), "--out", str(blocker / "report"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not a directory" in lines[0], proc.stderr


def test_runs_without_a_base_model_or_without_ensembles_are_refused(run_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(app, ["evaluate", "--run", str(empty)])
    assert isinstance(result.exception, UserError)
    assert "no base model" in str(result.exception)
    lone = tmp_path / "lone"
    shutil.copytree(run_dir / "base", lone / "base")
    result = CliRunner().invoke(app, ["evaluate", "--run", str(lone)])
    assert isinstance(result.exception, UserError)
    assert "no ensemble" in str(result.exception)


def test_an_adversarially_trained_model_in_the_run_joins_the_comparison(run_dir, tmp_path):
    from orbit.commands.evaluate import load_models
    from orbit.layout import RunLayout

    run = tmp_path / "with-adv"
    shutil.copytree(run_dir / "base", run / "base")
    shutil.copytree(run_dir / "ensemble", run / "ensemble")
    shutil.copytree(run_dir / "base", run / "adv")  # stands in for an --adv-train model
    models, _ = load_models(RunLayout.of(run), None)
    assert [m.name for m in models] == ["base", "adv", "symmetry"]
    assert [m.is_ensemble for m in models] == [False, False, True]
