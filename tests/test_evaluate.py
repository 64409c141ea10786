"""The evaluation sweep end to end: a small trained digits model and a real symmetry ensemble,
the Lightning/torchmetrics loop, report.json/report.md, figures, and failure handling."""

from __future__ import annotations

import json
from dataclasses import replace

import matplotlib.image
import pytest
import torch
from torch import nn

import attacks.evaluate as evaluate_mod
from attacks.catalog import AttackOptions
from attacks.config import EvalConfig
from attacks.evaluate import EvalModel, Sweep
from attacks.pipeline import evaluate
from attacks.registry import build_attack
from attacks.report import SCHEMA, Report, load_report, write_report
from ensemble.symmetry import build_symmetry
from orbit.errors import UserError
from training.datasets import load_dataset
from training.models import ModelSpec, build_model

SAMPLES = 64


@pytest.fixture(scope="module")
def setup():
    """Base MLP trained on digits for a few seconds, and an 8-member symmetry ensemble of it."""
    torch.manual_seed(0)
    d = load_dataset("digits")
    mean, std = d.channel_stats()
    base = build_model(ModelSpec("mlp", d.input_shape, 10, hidden=32, mean=mean, std=std))
    opt = torch.optim.Adam(base.parameters(), 3e-3)
    for _ in range(4):
        perm = torch.randperm(len(d.train))
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(base(d.train.x[idx]), d.train.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    base.eval()
    built = build_symmetry(base, d.train.x, d.train.y, members=8, eps=0.5, anchors=16, seed=0)
    return base, built.ensemble, d.test.x[:SAMPLES], d.test.y[:SAMPLES]


CONFIG = EvalConfig(
    attacks=("fgsm", "pgd"),
    threats=("transfer", "white-box"),
    eps=(0.0, 0.1, 0.3),
    batch_size=24,
    options=AttackOptions(steps=5),
    progress=False,
)


@pytest.fixture(scope="module")
def report(setup, tmp_path_factory):
    base, ens, x, y = setup
    out = tmp_path_factory.mktemp("report")
    models = [EvalModel("base", base), EvalModel("symmetry", ens)]
    rep = evaluate(models, x, y, 10, CONFIG, out, {"dataset": "digits", "samples": SAMPLES})
    return rep, out


def _rows(rep, **match):
    return [r for r in rep.rows if all(r.get(k) == v for k, v in match.items())]


def test_eps_zero_is_the_clean_accuracy_of_a_plain_forward(setup, report):
    base, ens, x, y = setup
    rep, _ = report
    for name, module in (("base", base), ("symmetry", ens)):
        with torch.no_grad():
            direct = int((module(x).argmax(-1) == y).sum())
        (clean,) = _rows(rep, model=name, role="clean")
        assert (clean["correct"], clean["n"]) == (direct, SAMPLES)
        eps0 = _rows(rep, model=name, role="sweep", eps=0.0)
        assert len(eps0) == 4  # fgsm, pgd x transfer, white-box
        assert all(r["correct"] == direct for r in eps0)


def test_attacks_lower_accuracy_and_every_number_has_its_interval(report):
    rep, _ = report
    for r in rep.rows:
        assert r["n"] == SAMPLES
        lo, hi = r["ci95"]
        assert lo <= r["accuracy"] <= hi
    for model in ("base", "symmetry"):
        (clean,) = _rows(rep, model=model, role="clean")
        for threat in ("transfer", "white-box"):
            (pgd,) = _rows(rep, model=model, attack="pgd", threat=threat, eps=0.3)
            assert pgd["accuracy"] < clean["accuracy"] - 0.5
    for r in _rows(rep, model="symmetry", role="sweep"):
        assert 0.0 <= r["agreement"] <= 1.0
        if r["eps"] > 0:
            assert 0.0 <= r["auroc_mi"] <= 1.0
    assert all(r["agreement"] is None for r in _rows(rep, model="base"))


def test_transfer_rows_of_the_base_model_are_its_white_box_rows(report):
    rep, _ = report
    for attack in ("fgsm", "pgd"):
        for eps in (0.1, 0.3):
            (t,) = _rows(rep, model="base", attack=attack, threat="transfer", eps=eps)
            (w,) = _rows(rep, model="base", attack=attack, threat="white-box", eps=eps)
            assert t["correct_mask"] == w["correct_mask"]


def test_every_sanity_check_passes_for_the_trained_base_model(report):
    rep, out = report
    base = [c for c in rep.sanity if c["model"] == "base"]
    assert {c["status"] for c in base} <= {"passed", "skipped"}, base
    ran = {c["check"] for c in base if c["status"] == "passed"}
    assert {"eps=0 equals clean accuracy", "accuracy falls as eps grows",
            "iterative attacks beat single-step", "large eps drives accuracy near zero",
            "perturbations within budget"} <= ran  # fmt: skip
    md = (out / "report.md").read_text()
    assert "## Sanity checks" in md and "## pgd — white-box" in md


def test_report_json_round_trips_and_rejects_other_schemas(report, tmp_path):
    rep, out = report
    loaded = load_report(out)
    assert loaded.to_json() == rep.to_json()
    assert loaded.schema == SCHEMA and loaded.status == "complete"
    assert loaded.config["attacks"] == ["fgsm", "pgd"] and "versions" in loaded.environment
    write_report(tmp_path, loaded)
    assert load_report(tmp_path / "report.json").to_json() == rep.to_json()
    bad = json.loads((out / "report.json").read_text())
    bad["schema"] = "orbit.report/0"
    (tmp_path / "report.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match="schema"):
        load_report(tmp_path)
    del bad["rows"]
    bad["schema"] = SCHEMA
    (tmp_path / "report.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match="rows"):
        load_report(tmp_path)


def test_plots_are_written_and_show_something(report):
    _, out = report
    for attack in ("fgsm", "pgd"):
        for threat in ("transfer", "white-box"):
            for what in ("accuracy", "agreement"):
                path = out / f"{what}_{attack}_{threat}.png"
                assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
                image = matplotlib.image.imread(path)
                assert image.shape[0] > 100 and image.shape[1] > 100
                assert image[..., :3].std() > 0.05  # not a blank canvas


def _trunk_backward_calls(ensemble: nn.Module, run) -> int:  # noqa: ANN001
    calls = []
    handle = ensemble.trunk.register_full_backward_hook(lambda *_: calls.append(1))
    try:
        run()
    finally:
        handle.remove()
    return len(calls)


def test_white_box_differentiates_through_the_fused_ensemble(setup):
    base, ens, x, y = setup
    x, y = x[:32], y[:32]
    eps = 0.1
    adv = build_attack("fgsm", ens, eps, AttackOptions(), 0, 10)(x, y)
    xg = x.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(ens(xg), y)  # log of the mean member probability
    (grad,) = torch.autograd.grad(loss, xg)
    assert torch.equal(adv, (x + eps * grad.sign()).clamp(0, 1))
    base_adv = build_attack("fgsm", base, eps, AttackOptions(), 0, 10)(x, y)
    assert not torch.equal(adv, base_adv)

    def sweep(threats):  # noqa: ANN001, ANN202
        config = replace(CONFIG, threats=threats, eps=(0.1,), sanity_attack=False)
        models = [EvalModel("base", base), EvalModel("symmetry", ens)]
        return lambda: Sweep(models, x, y, 10, config).run()

    assert _trunk_backward_calls(ens, sweep(("white-box",))) > 0
    assert _trunk_backward_calls(ens, sweep(("transfer",))) == 0  # crafted on the base only


def test_a_failing_attack_leaves_the_numbers_computed_before_it(setup, tmp_path, monkeypatch):
    base, ens, x, y = setup
    real = evaluate_mod.build_attack

    def flaky(name, *args, **kwargs):  # noqa: ANN001, ANN202
        if name == "pgd":
            raise RuntimeError("simulated crash inside the attack")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(evaluate_mod, "build_attack", flaky)
    models = [EvalModel("base", base), EvalModel("symmetry", ens)]
    (tmp_path / "report.json").write_text('{"the last": "complete report"}')
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate(models, x, y, 10, CONFIG, tmp_path, {"dataset": "digits"})
    partial = load_report(tmp_path, partial=True)
    assert partial.status == "failed" and "simulated crash" in partial.error
    fgsm = [r for r in partial.rows if r["attack"] == "fgsm" and r["eps"] > 0]
    assert len(fgsm) == 2 * 2 * 2  # two eps, two threats, two models
    assert not [r for r in partial.rows if r["attack"] == "pgd" and r["eps"] > 0]
    assert "simulated crash" in (tmp_path / "report.partial.md").read_text()
    # the last complete report is not replaced by a failed run
    assert (tmp_path / "report.json").read_text() == '{"the last": "complete report"}'


def test_memory_bound_chunks_batches_and_refuses_what_cannot_fit(setup):
    base, ens, x, y = setup
    models = [EvalModel("base", base), EvalModel("symmetry", ens)]
    roomy = Sweep(models, x, y, 10, CONFIG)
    assert {j.batch_size for j in roomy.jobs} == {CONFIG.batch_size}
    small = replace(CONFIG, attacks=("pgd",), eps=(0.1,), sanity_attack=False)
    tight = Sweep(models, x[:24], y[:24], 10, replace(small, max_memory_mb=0.3))
    sizes = {j.batch_size for j in tight.jobs if j.attack is not None}
    assert max(sizes) < CONFIG.batch_size
    results = tight.run()
    assert all(c["n"] == 24 for r in results for c in r.cells.values())
    with pytest.raises(UserError, match="--max-memory-mb"):
        Sweep(models, x, y, 10, replace(CONFIG, max_memory_mb=0.001))


def test_report_from_json_rejects_a_non_object():
    with pytest.raises(UserError, match="not a JSON object"):
        Report.from_json([1, 2], "x.json")


def test_cw_fools_the_ensemble_whose_outputs_are_all_negative(setup):
    base, ens, x, y = setup
    x, y = x[:32], y[:32]
    with torch.no_grad():
        assert (ens(x) <= 0).all()  # log-mean-probabilities: where torchattacks' CW gives up
        clean = float((ens(x).argmax(-1) == y).float().mean())
    options = AttackOptions(steps=30, cw_c=10.0, cw_lr=0.05)
    adv = build_attack("cw", ens, 3.0, options, 0, 10)(x, y)
    with torch.no_grad():
        fooled = float((ens(adv).argmax(-1) == y).float().mean())
    assert fooled <= clean - 0.3


def test_an_attack_that_repairs_a_mistake_does_not_count_as_robust():
    from attacks.evaluate import CellMetric, Outputs

    metric = CellMetric(ensemble=False)
    y = torch.tensor([0, 1, 2, 3])
    clean = Outputs(torch.tensor([0, 1, 9, 9]))  # wrong on the last two
    adv = Outputs(torch.tensor([0, 9, 2, 9]))  # the attack "repairs" input 2
    metric.update(torch.arange(4), y, clean, adv, 0)
    assert metric.compute()["correct"] == 1  # only input 0 is right both clean and attacked


def test_white_box_on_an_ensemble_also_attacks_the_mean_member_logit(setup, monkeypatch):
    # An attacker through the fused output that never moves the input, and one through the mean
    # logit that does: each input the first one leaves right must come from the second.
    from ensemble.base import MeanLogits

    base, ens, x, y = setup
    real = evaluate_mod.build_attack
    seen = []

    def only_mean_logits_moves(name, model, *args, **kwargs):  # noqa: ANN001, ANN202
        seen.append(type(model).__name__)
        attack = real(name, model, *args, **kwargs)
        return attack if isinstance(model, MeanLogits) else (lambda images, labels: images)

    monkeypatch.setattr(evaluate_mod, "build_attack", only_mean_logits_moves)
    config = replace(CONFIG, threats=("white-box",), eps=(0.3,), sanity_attack=False)
    models = [EvalModel("base", base), EvalModel("symmetry", ens)]
    (result,) = [r for r in Sweep(models, x, y, 10, config).run() if r.job.attack == "pgd"]
    with torch.no_grad():
        clean = int((ens(x).argmax(-1) == y).sum())
        base_clean = int((base(x).argmax(-1) == y).sum())
    assert result.cells[("symmetry", "white-box")]["correct"] < clean  # mean-logit examples used
    # A plain model has no second loss: its (unmoving) attack leaves it at clean accuracy.
    assert result.cells[("base", "white-box")]["correct"] == base_clean
    assert "MeanLogits" in seen
