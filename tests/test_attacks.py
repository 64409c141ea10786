"""The attack registry on a small trained digits model, the statistics, the memory bound and the
sanity checks' logic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attacks import memory
from attacks.catalog import ATTACKS, AttackOptions, parse_attacks
from attacks.registry import build_attack, perturbation_norm
from attacks.sanity import NEAR_ZERO, run_checks
from attacks.stats import (
    auroc,
    auroc_interval,
    decode_mask,
    encode_mask,
    mean_interval,
    sign_test,
    wilson_interval,
)
from attacks.threats import parse_eps, parse_threats, plan, skipped_cells
from orbit.errors import UserError
from training.datasets import load_dataset
from training.models import ModelSpec, build_model


@pytest.fixture(scope="module")
def trained():
    """A small MLP trained on digits for a few seconds (plain torch), and 32 test inputs."""
    torch.manual_seed(0)
    d = load_dataset("digits")
    mean, std = d.channel_stats()
    model = build_model(ModelSpec("mlp", d.input_shape, 10, hidden=32, mean=mean, std=std))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(4):
        perm = torch.randperm(len(d.train))
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(d.train.x[idx]), d.train.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model, d.test.x[:32], d.test.y[:32]


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


@pytest.mark.parametrize("name", list(ATTACKS))
def test_each_attack_lowers_accuracy_within_its_budget(trained, name):
    model, x, y = trained
    clean = _accuracy(model, x, y)
    assert clean >= 0.9
    info = ATTACKS[name]
    eps = 0.3 if info.norm == "Linf" else 3.0
    options = AttackOptions(steps=10, queries=100, cw_c=10.0, cw_lr=0.05)
    torch.manual_seed(0)
    adv = build_attack(name, model, eps, options, seed=0, num_classes=10)(x, y)
    assert adv.shape == x.shape
    adv = adv.detach()
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    if info.bounded:
        assert float(perturbation_norm(adv - x, info.norm).max()) <= eps * (1 + 1e-5)
    assert _accuracy(model, adv, y) <= clean - 0.3


def test_registry_rejects_unknown_names_and_bad_budgets():
    assert parse_attacks("FGSM, pgd,fgsm") == ["fgsm", "pgd"]
    with pytest.raises(UserError, match="unknown attack 'pgdd'"):
        parse_attacks("fgsm,pgdd")
    with pytest.raises(UserError, match="unknown threat model 'grey-box'"):
        parse_threats("transfer,grey-box")
    with pytest.raises(UserError, match=">= 0"):
        parse_eps("0,-0.1")
    with pytest.raises(UserError, match="not a number"):
        parse_eps("0,abc")
    assert parse_eps("0.1,0,0.1") == [0.0, 0.1]
    with pytest.raises(UserError, match="finite"):
        parse_eps("0,inf")
    with pytest.raises(UserError, match="--steps"):
        AttackOptions(steps=0)


def test_black_box_is_square_and_gradient_attacks_never_run_query_only():
    cells = plan(["fgsm", "pgd"], ["transfer", "black-box"])
    assert [(c.attack, c.threat) for c in cells] == [
        ("fgsm", "transfer"),
        ("pgd", "transfer"),
        ("square", "black-box"),
    ]
    assert [(c.attack, c.threat) for c in plan(["square"], ["white-box"])] == [
        ("square", "black-box")
    ]


def test_no_requested_attack_is_silently_dropped():
    cells = plan(["fgsm", "autoattack"], ["transfer", "white-box"])
    assert [(c.attack, c.threat) for c in cells] == [
        ("fgsm", "transfer"),
        ("fgsm", "white-box"),
        ("autoattack", "white-box"),  # it has no transfer version: listed as not run
    ]
    skipped = skipped_cells(["fgsm", "autoattack", "cw"], ["transfer", "white-box"])
    assert [(s["attack"], s["threat"]) for s in skipped] == [
        ("autoattack", "transfer"),
        ("cw", "transfer"),
    ]
    with pytest.raises(UserError, match="cw cannot run under --threat transfer"):
        plan(["cw"], ["transfer"])
    with pytest.raises(UserError, match="pgd is a gradient attack"):
        plan(["pgd"], ["black-box"])


def _ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize(
    ("name", "options"),
    [("pgd", AttackOptions(steps=3, restarts=2)), ("apgd-ce", AttackOptions(steps=5))],
)
def test_transfer_versions_perturb_every_input_where_white_box_ones_return_it_clean(
    trained, name, options
):
    """White-box versions hand back the clean input wherever the model resisted (that is all the
    white-box count needs); a transfer source must give every input its highest-loss point,
    or resisted inputs would reach the other models unattacked."""
    model, x, y = trained
    eps = 0.03  # small: the model resists many inputs
    torch.manual_seed(0)
    white = build_attack(name, model, eps, options, 0, 10)(x, y)
    torch.manual_seed(0)
    source = build_attack(name, model, eps, options, 0, 10, transfer=True)(x, y)
    untouched = perturbation_norm(white - x, "Linf") == 0
    assert int(untouched.sum()) > 0  # the white-box version left resisted inputs clean
    assert bool((perturbation_norm(source - x, "Linf") > 0).all())
    assert float(perturbation_norm(source - x, "Linf").max()) <= eps * (1 + 1e-5)
    assert bool((_ce(model, source, y) >= _ce(model, x, y) - 1e-6).all())
    with pytest.raises(ValueError, match="no transfer version"):
        build_attack("autoattack", model, eps, options, 0, 10, transfer=True)


def test_pgd_restarts_keep_the_first_success_per_input(trained):
    model, x, y = trained
    one = AttackOptions(steps=3, restarts=1)
    three = AttackOptions(steps=3, restarts=3)
    torch.manual_seed(0)
    a1 = build_attack("pgd", model, 0.08, one, 0, 10)(x, y)
    torch.manual_seed(0)
    a3 = build_attack("pgd", model, 0.08, three, 0, 10)(x, y)
    fooled1 = _accuracy(model, a1, y)
    fooled3 = _accuracy(model, a3, y)
    assert fooled3 <= fooled1  # the first restart is the single run; later ones only add
    assert float(perturbation_norm(a3 - x, "Linf").max()) <= 0.08 * (1 + 1e-5)


# --- statistics ---------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 5000), data=st.data())
def test_wilson_interval_contains_the_estimate_and_is_symmetric(n, data):
    k = data.draw(st.integers(0, n))
    lo, hi = wilson_interval(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    lo2, hi2 = wilson_interval(n - k, n)
    assert lo2 == pytest.approx(1 - hi, abs=1e-12) and hi2 == pytest.approx(1 - lo, abs=1e-12)
    if n < 2500:
        lo4, hi4 = wilson_interval(2 * k, 2 * n)
        assert hi4 - lo4 < hi - lo  # more data, narrower interval


def test_wilson_interval_covers_the_true_proportion_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    for p, n in ((0.05, 40), (0.3, 100), (0.9, 359)):
        draws = rng.binomial(n, p, size=4000)
        covered = np.mean([lo <= p <= hi for lo, hi in (wilson_interval(int(k), n) for k in draws)])
        assert 0.92 <= covered <= 0.985, (p, n, covered)


@pytest.mark.parametrize("b,c", [(0, 0), (5, 1), (1, 5), (12, 3), (40, 40), (0, 9)])
def test_sign_test_is_scipys_exact_binomial_test(b, c):
    from scipy.stats import binomtest

    expected = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5, alternative="greater").pvalue
    assert sign_test(b, c) == pytest.approx(expected, rel=1e-12)


def test_auroc_matches_torchmetrics_and_ignores_sample_order():
    from torchmetrics.functional.classification import binary_auroc

    rng = np.random.default_rng(1)
    neg = rng.normal(0, 1, 300).round(1)  # rounded: plenty of ties
    pos = rng.normal(0.7, 1, 200).round(1)
    ours = auroc(neg, pos)
    scores = torch.tensor(np.concatenate([neg, pos]))
    labels = torch.tensor([0] * 300 + [1] * 200)
    assert ours == pytest.approx(float(binary_auroc(scores, labels)), abs=1e-6)
    assert auroc(rng.permutation(neg), rng.permutation(pos)) == ours
    assert auroc(neg, np.array([])) is None


def test_auroc_interval_matches_the_spread_of_auroc_over_resamples():
    """Hanley-McNeil's standard error against the AUROC's real spread over 400 experiments."""
    rng = np.random.default_rng(0)
    n_neg, n_pos = 120, 60
    values = [auroc(rng.normal(0, 1, n_neg), rng.normal(0.8, 1, n_pos)) for _ in range(400)]
    a = float(np.mean(values))
    lo, hi = auroc_interval(a, n_neg, n_pos)
    assert lo < a < hi
    assert (hi - lo) / 2 / 1.96 == pytest.approx(float(np.std(values)), rel=0.15)
    assert auroc_interval(1.0, 10, 10) == (1.0, 1.0)
    narrow = auroc_interval(0.7, 1000, 1000)
    assert narrow[1] - narrow[0] < hi - lo


def test_mean_interval_covers_the_mean():
    values = np.array([1.0] * 90 + [0.5] * 10)
    lo, hi = mean_interval(values)
    assert lo < 0.95 < hi and hi <= 1.0
    assert mean_interval(np.array([1.0])) is None


def test_correctness_mask_round_trips_in_any_order():
    rng = np.random.default_rng(2)
    ok = rng.random(77) > 0.4
    order = rng.permutation(77)
    mask = encode_mask(order.astype(np.float32), ok[order].astype(np.float32))
    assert (decode_mask(mask, 77) == ok).all()


# --- memory bound -------------------------------------------------------------------------------


def test_memory_estimate_grows_with_width_and_cuts_batches_to_the_bound():
    x = torch.rand(1, 1, 8, 8)
    small = build_model(ModelSpec("mlp", (1, 8, 8), 10, hidden=16)).eval()
    wide = build_model(ModelSpec("cnn", (1, 8, 8), 10, hidden=16)).eval()
    e_small, e_wide = memory.estimate(small, x), memory.estimate(wide, x)
    assert 0 < e_small.per_input_bytes < e_wide.per_input_bytes
    one = e_wide.attack_bytes("pgd", 1, x.numel() * 4)
    fits = memory.fit_batch({"cnn": e_wide}, "pgd", 1000, 10 * one / 2**20, x.numel() * 4)
    assert 1 <= fits < 1000
    assert e_wide.attack_bytes("pgd", fits, x.numel() * 4) <= 10 * one
    with pytest.raises(UserError, match="--max-memory-mb"):
        memory.fit_batch({"cnn": e_wide}, "pgd", 10, 0.5 * one / 2**20, x.numel() * 4)


# --- sanity-check logic on constructed rows -----------------------------------------------------


def _row(model, attack, threat, eps, correct_ids, n=200, role="sweep", violations=0):
    ok = np.zeros(n, dtype=bool)
    ok[list(correct_ids)] = True
    return {
        "role": role,
        "model": model,
        "attack": attack,
        "threat": threat,
        "eps": eps,
        "n": n,
        "correct": int(ok.sum()),
        "budget_violations": violations,
        "correct_mask": np.packbits(ok).tobytes().hex(),
    }


def _statuses(checks, model):
    return {c.check: c.status for c in checks if c.model == model}


def test_sanity_checks_pass_a_consistent_evaluation_and_flag_masking():
    clean = range(0, 190)
    rows = [
        _row(m, None, "clean", 0.0, clean, role="clean") for m in ("base", "ens")
    ]  # fmt: skip
    rows += [
        _row("base", "fgsm", "white-box", 0.1, range(0, 120)),
        _row("base", "pgd", "white-box", 0.1, range(0, 90)),
        _row("base", "pgd", "white-box", 0.5, range(0, 1), role="sanity"),
        _row("ens", "fgsm", "transfer", 0.1, range(0, 125)),
        _row("ens", "fgsm", "white-box", 0.1, range(0, 121)),
        # white-box pgd on the ensemble leaves 60 more inputs correct than transfer: masking
        _row("ens", "pgd", "transfer", 0.1, range(0, 95)),
        _row("ens", "pgd", "white-box", 0.1, range(0, 155)),
        _row("ens", "pgd", "white-box", 0.5, range(0, 40), role="sanity"),
    ]
    independent = {"base": (190, 200), "ens": (190, 200)}
    checks = run_checks(rows, ["base", "ens"], independent)
    base = _statuses(checks, "base")
    assert "warning" not in base.values()
    assert base["white-box beats transfer"] == "skipped"
    ens = _statuses(checks, "ens")
    assert ens["white-box beats transfer"] == "warning"
    assert ens["iterative attacks beat single-step"] == "warning"  # pgd 155 > fgsm 121
    assert ens["large eps drives accuracy near zero"] == "warning"
    assert NEAR_ZERO < 40 / 200
    assert ens["eps=0 equals clean accuracy"] == "passed"


def test_sanity_checks_tolerate_equal_attacks_landing_a_few_inputs_apart():
    rows = [_row("ens", None, "clean", 0.0, range(190), role="clean")]
    rows += [
        _row("ens", "pgd", "transfer", 0.1, range(0, 100)),
        _row("ens", "pgd", "white-box", 0.1, range(2, 104)),  # 4 vs 2 discordant inputs
    ]
    checks = run_checks(rows, ["base", "ens"], {"ens": (190, 200)})
    assert _statuses(checks, "ens")["white-box beats transfer"] == "passed"


def test_sanity_checks_flag_rising_accuracy_budget_violations_and_clean_mismatch():
    rows = [_row("base", None, "clean", 0.0, range(150), role="clean")]
    rows += [
        _row("base", "pgd", "white-box", 0.1, range(0, 40), violations=3),
        _row("base", "pgd", "white-box", 0.2, range(0, 110)),
    ]
    checks = run_checks(rows, ["base"], {"base": (149, 200)})
    s = _statuses(checks, "base")
    assert s["accuracy falls as eps grows"] == "warning"
    assert s["perturbations within budget"] == "warning"
    assert s["eps=0 equals clean accuracy"] == "warning"


def test_a_pgd_too_short_to_reach_the_budget_is_flagged():
    rows = [_row("base", None, "clean", 0.0, range(190), role="clean")]
    short = run_checks(
        rows, ["base"], {"base": (190, 200)}, options=AttackOptions(steps=3), attacks=["pgd"]
    )
    (reach,) = [c for c in short if c.check == "pgd can reach the budget"]
    assert reach.status == "warning" and "0.75 eps < 1" in reach.message
    default = run_checks(
        rows, ["base"], {"base": (190, 200)}, options=AttackOptions(), attacks=["fgsm", "pgd"]
    )
    assert [c.status for c in default if c.check == "pgd can reach the budget"] == ["passed"]


def test_apgd_and_autoattack_cut_below_100_iterations_are_flagged():
    rows = [_row("base", None, "clean", 0.0, range(190), role="clean")]

    def status(options: AttackOptions) -> str:
        checks = run_checks(rows, ["base"], {"base": (190, 200)}, options=options,
                            attacks=["apgd-ce", "autoattack"])  # fmt: skip
        (c,) = [c for c in checks if c.check == "apgd / autoattack at the reference iterations"]
        return c.status

    assert status(AttackOptions()) == "passed"
    assert status(AttackOptions(steps=20)) == "warning"


def test_a_random_baseline_matched_to_other_symmetry_settings_is_flagged():
    rows = [_row("base", None, "clean", 0.0, range(190), role="clean")]
    settings = {"members": 64, "eps": 0.5, "anchors": 32, "algebra": "gl", "seed": 0}

    def status(matched: dict) -> str:
        meta = {"symmetry": dict(settings), "random": {"matched_to": matched}}
        checks = run_checks(rows, ["base"], {"base": (190, 200)}, models_meta=meta)
        (c,) = [c for c in checks if c.check == "random baseline matched to the symmetry ensemble"]
        return c.status

    assert status(dict(settings)) == "passed"
    assert status({**settings, "eps": 5.0}) == "warning"


def test_worst_case_counts_only_inputs_right_under_every_attack_and_threat():
    from attacks.pipeline import worst_case_rows

    rows = [_row("ens", None, "clean", 0.0, range(190), role="clean")]
    rows += [
        {**_row("ens", "fgsm", "transfer", 0.1, range(0, 150)), "norm": "Linf"},
        {**_row("ens", "pgd", "white-box", 0.1, range(50, 180)), "norm": "Linf"},
        {**_row("ens", "pgd", "white-box", 0.2, range(100, 120)), "norm": "Linf"},
        {**_row("ens", "pgd", "white-box", 0.0, range(190)), "norm": "Linf", "from_clean": True},
    ]
    worst = {r["eps"]: r for r in worst_case_rows(rows, ["ens"])}
    assert set(worst) == {0.1, 0.2}  # eps 0 is the clean input, not an attack
    assert worst[0.1]["correct"] == 100  # inputs 50..149: right under both cells
    assert worst[0.1]["over"] == ["fgsm/transfer", "pgd/white-box"]
    assert worst[0.2]["correct"] == 20 and worst[0.2]["n"] == 200
    lo, hi = worst[0.1]["ci95"]
    assert lo < 0.5 < hi
