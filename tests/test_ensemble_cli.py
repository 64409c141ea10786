"""`orbit build` on a real digits run: the three methods, overwrite protection, bad flags."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from ensemble.artifacts import DESCRIPTION, FIDELITY, TENSORS, load_ensemble
from orbit import cli
from orbit.layout import RunLayout
from training.artifacts import load_model
from training.config import TrainConfig
from training.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> RunLayout:
    layout = RunLayout.of(tmp_path_factory.mktemp("runs") / "digits")
    train(TrainConfig(out=layout.base, dataset="digits", epochs=1, progress=False))
    return layout


def orbit(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, *args: str):
    """Run the real console entry point; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["orbit", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_build_symmetry_then_refuse_then_overwrite(run: RunLayout, capsys, monkeypatch) -> None:
    target = run.ensemble("symmetry")
    code, out, err = orbit(capsys, monkeypatch, "build", "--run", run.root, "--members", "8")
    assert code == 0, err
    assert "max |logit diff| on anchors" in out and "test accuracy" in out
    info = json.loads((target / DESCRIPTION).read_text())
    assert (info["method"], info["members"], info["anchors"]) == ("symmetry", 8, 32)
    assert json.loads((target / FIDELITY).read_text())["anchors"]["max_abs_logit_diff"] <= 1e-4
    before = (target / TENSORS).read_bytes()

    code, out, err = orbit(capsys, monkeypatch, "build", "--run", run.root, "--members", "8")
    assert code == 2
    assert err.strip().count("\n") == 0 and "--overwrite" in err
    assert (target / TENSORS).read_bytes() == before  # nothing already written is lost

    args = ("build", "--run", run.root, "--members", "8", "--seed", "1", "--overwrite")
    code, _, err = orbit(capsys, monkeypatch, *args)
    assert code == 0, err
    assert (target / TENSORS).read_bytes() != before
    assert json.loads((target / DESCRIPTION).read_text())["seed"] == 1
    assert run.built_ensembles() == {"symmetry": target}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--eps", "0"), "--eps must be positive"),
        (("--members", "-3"), "--members must be positive"),
        (("--anchors", "100000"), "more than the"),
        (("--method", "bagging"), "unknown --method"),
        (("--algebra", "sl"), "unknown --algebra"),
    ],
)
def test_bad_flags_exit_2_with_one_line(run, capsys, monkeypatch, flags, message) -> None:
    args = ("build", "--run", run.root, "--overwrite", "--members", "4", *flags)
    code, _, err = orbit(capsys, monkeypatch, *args)
    assert code == 2
    assert message in err and err.strip().count("\n") == 0


def test_missing_run_is_a_user_error(tmp_path: Path, capsys, monkeypatch) -> None:
    code, _, err = orbit(capsys, monkeypatch, "build", "--run", tmp_path / "nothing")
    assert code == 2 and "train a model first" in err


def test_build_random_and_deep_baselines(run: RunLayout, capsys, monkeypatch) -> None:
    # Matched to the run's symmetry ensemble: a flag that contradicts it is refused...
    code, out, err = orbit(capsys, monkeypatch, "build", "--run", run.root, "--method", "random",
                           "--eps", "0.3")  # fmt: skip
    assert code == 2 and "differs from the symmetry ensemble" in err
    assert not run.ensemble("random").exists()
    # ...and without flags it takes that ensemble's settings and member distances.
    code, out, err = orbit(capsys, monkeypatch, "build", "--run", run.root, "--method", "random")
    assert code == 0, err
    info = json.loads((run.ensemble("random") / DESCRIPTION).read_text())
    sym = json.loads((run.ensemble("symmetry") / DESCRIPTION).read_text())
    for key in ("members", "eps", "anchors", "algebra", "seed"):
        assert info[key] == sym[key] == info["matched_to"][key]
    assert info["matched_to"]["mean_parameter_distance"] > 0
    from safetensors.torch import load_file

    d_sym = load_file(run.ensemble("symmetry") / TENSORS)["distance"]
    d_rand = load_file(run.ensemble("random") / TENSORS)["distance"]
    assert torch.allclose(d_rand.double(), d_sym.double(), rtol=1e-4)

    code, out, err = orbit(capsys, monkeypatch, "build", "--run", run.root, "--method", "deep",
                           "--members", "2")  # fmt: skip
    assert code == 0, err
    info = json.loads((run.ensemble("deep") / DESCRIPTION).read_text())
    seeds = [m["seed"] for m in info["deep_members"]]
    assert len(set(seeds)) == 2 and 0 not in seeds  # base trained with seed 0
    for m in info["deep_members"]:
        assert (run.ensemble("deep") / m["dir"]).parent == run.deep_members
    base = load_model(run.base)
    deep = load_ensemble(run.ensemble("deep"), base).ensemble
    members = [load_model(run.ensemble("deep") / m["dir"]).model for m in info["deep_members"]]
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(deep.member_logits(x), torch.stack([m(x) for m in members]))
        assert not torch.equal(members[0](x), members[1](x))
    assert set(run.built_ensembles()) >= {"random", "deep"}
