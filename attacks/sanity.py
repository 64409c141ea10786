"""The sanity checks of a robustness evaluation (DESIGN.md, "Threat models").

Each check is reported per model as passed, as a warning with the numbers that failed it, or
as skipped with the reason (e.g. no black-box run to compare with). Several are the standard
signs of gradient masking (Athalye et al. 2018; Carlini et al. 2019): accuracy that does not
fall with eps, black-box or transfer attacks beating white-box ones, and accuracy that does not
reach ~0 at a large budget. A warning is never hidden; it means the numbers are not a reliable
robustness estimate for that model.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from attacks.catalog import ATTACKS, AUTOATTACK_ITERATIONS, AttackOptions
from attacks.stats import decode_mask, sign_test
from attacks.threats import UNBOUNDED_EPS, UNBOUNDED_STEPS
from ensemble.build import MATCHED_SETTINGS

# "A should fool at least as many inputs as B" is tested on the same inputs (paired): the
# one-sided exact sign test on the inputs only one of them fooled, at family-wise level ALPHA
# per (check, model) (Bonferroni over that check's comparisons). Two attacks of equal strength
# landing a few inputs apart do not warn; a real reversal does, at any sample size.
ALPHA = 0.05
# Without per-input results (old reports) a plain accuracy slack is used instead.
TOLERANCE = 0.01
# White-box PGD at eps = 0.5 (half the pixel range) must fool at least 98% of the inputs.
NEAR_ZERO = 0.02

PASSED, WARNING, SKIPPED = "passed", "warning", "skipped"


@dataclass
class Check:
    check: str
    model: str
    status: str
    message: str
    numbers: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _acc(row: dict[str, Any]) -> float:
    return row["correct"] / row["n"]


def _fmt(x: float) -> str:
    return f"{x:.3f}"


@dataclass
class Comparison:
    """`strong` should leave no more inputs correct than `weak` (same inputs)."""

    strong: dict[str, Any]
    weak: dict[str, Any]
    label: str

    def discordant(self) -> tuple[int, int] | None:
        """(inputs only `strong` left correct, inputs only `weak` left correct)."""
        a, b = self.strong.get("correct_mask"), self.weak.get("correct_mask")
        if not a or not b or self.strong["n"] != self.weak["n"]:
            return None
        sa, sb = decode_mask(a, self.strong["n"]), decode_mask(b, self.weak["n"])
        return int((sa & ~sb).sum()), int((~sa & sb).sum())

    def describe(self, d: tuple[int, int] | None) -> str:
        text = f"{self.label}: {_fmt(_acc(self.strong))} vs {_fmt(_acc(self.weak))}"
        if d is not None:
            text += f" ({d[0]} vs {d[1]} inputs, p={sign_test(*d):.2g})"
        return text


def _violations(comparisons: list[Comparison]) -> list[str]:
    """Descriptions of the comparisons where `strong` is significantly weaker than `weak`."""
    level = ALPHA / max(1, len(comparisons))
    bad = []
    for c in comparisons:
        d = c.discordant()
        if d is not None:
            failed = sign_test(*d) < level
        else:
            failed = _acc(c.strong) > _acc(c.weak) + TOLERANCE
        if failed:
            bad.append(c.describe(d))
    return bad


def run_checks(
    rows: list[dict[str, Any]],
    models: list[str],
    independent_clean: dict[str, tuple[int, int]],
    reference_clean: dict[str, tuple[int, int]] | None = None,
    options: AttackOptions | None = None,
    attacks: list[str] | None = None,
    models_meta: dict[str, dict[str, Any]] | None = None,
) -> list[Check]:
    """All checks for every model. `independent_clean[model]` = (correct, n) from a plain loop;
    `reference_clean[model]` = (correct, n) recorded at training time over the same inputs;
    `options`/`attacks`, when given, are checked for settings that cannot reach the budget or
    are weaker than the reference attack; `models_meta` (the report's models) for a random
    baseline matched to another symmetry ensemble than the one evaluated."""
    checks: list[Check] = []
    if options is not None and attacks:
        checks.append(_reach(options, attacks))
        checks.append(_iterations(options, attacks))
    if models_meta is not None:
        checks.append(_matched(models_meta))
    base = models[0]
    for m in models:
        mine = [r for r in rows if r["model"] == m and r["n"] > 0]
        checks.append(_clean(m, mine, independent_clean.get(m), (reference_clean or {}).get(m)))
        checks.append(_budget(m, mine))
        checks.append(_monotone(m, mine))
        checks.append(_iterative(m, mine))
        checks.append(_white_vs_transfer(m, mine, is_base=m == base))
        checks.append(_white_vs_black(m, mine))
        checks.append(_large_eps(m, mine))
    return checks


def _reach(options: AttackOptions, attacks: list[str]) -> Check:
    """PGD moves at most steps x step_size x eps from its random start: below 1 it cannot
    reach most of the ball's boundary, and its accuracies only bound robustness loosely."""
    name = "pgd can reach the budget"
    pgds = [a for a in attacks if a in ("pgd", "pgd-l2")]
    if not pgds:
        return Check(name, "(config)", SKIPPED, "no pgd attack")
    travel = options.steps_for("pgd") * options.step_size
    numbers = {"steps": options.steps_for("pgd"), "step_size": options.step_size}
    if travel < 1:
        return Check(
            name, "(config)", WARNING,
            f"{', '.join(pgds)}: {numbers['steps']} steps of {options.step_size:g} eps travel"
            f" {travel:g} eps < 1; raise --steps or --step-size for a real upper bound", numbers,
        )  # fmt: skip
    return Check(name, "(config)", PASSED, f"steps x step size = {travel:g} eps", numbers)


def _iterations(options: AttackOptions, attacks: list[str]) -> Check:
    """APGD and AutoAttack are defined with 100 iterations (Croce & Hein 2020); a --steps that
    cuts them makes them weaker than the attack their name promises."""
    name = "apgd / autoattack at the reference iterations"
    ours = [a for a in attacks if a in ("apgd-ce", "apgd-dlr", "autoattack")]
    if not ours:
        return Check(name, "(config)", SKIPPED, "no apgd or autoattack")
    steps = {a: options.steps_for(a) for a in ours}
    short = {a: s for a, s in steps.items() if s is not None and s < AUTOATTACK_ITERATIONS}
    if short:
        listed = ", ".join(f"{a} {s}" for a, s in short.items())
        return Check(
            name, "(config)", WARNING,
            f"{listed} iterations < the reference {AUTOATTACK_ITERATIONS}: weaker than the"
            " published attack, so its accuracies overstate robustness", {"steps": steps},
        )  # fmt: skip
    return Check(name, "(config)", PASSED, f"{AUTOATTACK_ITERATIONS} iterations", {"steps": steps})


def _matched(meta: dict[str, dict[str, Any]]) -> Check:
    """The random baseline is only a control for the symmetry ensemble it was matched to (same
    settings, member by member the same parameter distance)."""
    name = "random baseline matched to the symmetry ensemble"
    sym, rand = meta.get("symmetry"), meta.get("random")
    if sym is None or rand is None:
        return Check(name, "(config)", SKIPPED, "needs both a symmetry and a random ensemble")
    matched = rand.get("matched_to") or {}
    differ = {
        k: (matched.get(k), sym.get(k))
        for k in MATCHED_SETTINGS
        if matched.get(k, sym.get(k)) != sym.get(k)
    }
    if differ:
        listed = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in differ.items())
        return Check(
            name, "(config)", WARNING,
            f"random was matched to other symmetry settings than the evaluated ensemble"
            f" ({listed}); rebuild it: orbit build --method random --overwrite", differ,
        )  # fmt: skip
    return Check(name, "(config)", PASSED, "same settings, matched parameter distances")


def _clean(m, rows, independent, reference) -> Check:  # noqa: ANN001
    name = "eps=0 equals clean accuracy"
    clean = [r for r in rows if r["role"] == "clean"]
    if not clean:
        return Check(name, m, SKIPPED, "no clean pass")
    c = clean[0]
    numbers: dict[str, Any] = {"sweep": [c["correct"], c["n"]]}
    problems = []
    # (The eps=0 rows of the grid are the clean pass itself; what can disagree with it is a
    # plain loop over the same inputs and training's own measurement.)
    if independent is not None:
        numbers["independent"] = list(independent)
        if tuple(independent) != (c["correct"], c["n"]):
            problems.append(
                f"the sweep counted {c['correct']}/{c['n']} correct but a plain loop over the"
                f" same inputs {independent[0]}/{independent[1]}"
            )
    if reference is not None:
        numbers["training_time"] = list(reference)
        if tuple(reference) != (c["correct"], c["n"]):
            problems.append(
                f"training recorded {reference[0]}/{reference[1]} correct on the same inputs,"
                f" the sweep {c['correct']}/{c['n']}"
            )
    if problems:
        return Check(name, m, WARNING, "; ".join(problems), numbers)
    return Check(name, m, PASSED, f"clean accuracy {_fmt(_acc(c))} (n={c['n']})", numbers)


def _budget(m, rows) -> Check:  # noqa: ANN001
    name = "perturbations within budget"
    attacked = [r for r in rows if r["attack"] and ATTACKS[r["attack"]].bounded]
    bad = [r for r in attacked if r["budget_violations"] > 0]
    if not attacked:
        return Check(name, m, SKIPPED, "no bounded attack ran")
    if bad:
        worst = ", ".join(
            f"{r['attack']} {r['threat']} eps {r['eps']:g}: {r['budget_violations']}" for r in bad
        )
        return Check(
            name, m, WARNING, f"inputs outside eps or [0, 1] (counted as not fooled): {worst}"
        )
    return Check(name, m, PASSED, f"{len(attacked)} attacked cells, every input within budget")


def _series(rows) -> dict[tuple[str, str], list[dict]]:  # noqa: ANN001
    """(attack, threat) -> sweep rows sorted by eps, with the clean row at eps 0."""
    clean = [r for r in rows if r["role"] == "clean"]
    out: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        if r["role"] == "sweep" and r["eps"] > 0:
            out[(r["attack"], r["threat"])].append(r)
    for key in out:
        out[key] = clean[:1] + sorted(out[key], key=lambda r: r["eps"])
    return out


def _monotone(m, rows) -> Check:  # noqa: ANN001
    name = "accuracy falls as eps grows"
    series = _series(rows)
    if not series:
        return Check(name, m, SKIPPED, "no attack at eps > 0")
    comparisons = [
        Comparison(b, a, f"{attack} {threat} eps {a['eps']:g} -> {b['eps']:g}")
        for (attack, threat), seq in series.items()
        for a, b in zip(seq, seq[1:], strict=False)
    ]
    rises = _violations(comparisons)
    if rises:
        return Check(
            name, m, WARNING, "accuracy rose with eps (gradient masking?): " + "; ".join(rises)
        )
    return Check(name, m, PASSED, f"no significant rise in {len(comparisons)} eps steps")


def _by(rows, threat) -> dict[tuple[str, float], dict]:  # noqa: ANN001
    return {
        (r["attack"], r["eps"]): r
        for r in rows
        if r["role"] == "sweep" and r["threat"] == threat and r["eps"] > 0
    }


def _iterative(m, rows) -> Check:  # noqa: ANN001
    name = "iterative attacks beat single-step"
    wb = _by(rows, "white-box")
    pairs = [
        (wb[(a, e)], wb[("fgsm", e)])
        for (a, e) in wb
        if a != "fgsm"
        and ("fgsm", e) in wb
        and ATTACKS[a].iterative
        and ATTACKS[a].norm == "Linf"
        and ATTACKS[a].gradient
    ]
    if not pairs:
        return Check(name, m, SKIPPED, "needs fgsm and an iterative L-inf attack under white-box")
    bad = _violations(
        [Comparison(it, fg, f"{it['attack']} vs fgsm at eps {it['eps']:g}") for it, fg in pairs]
    )
    if bad:
        return Check(name, m, WARNING, "white-box: " + "; ".join(bad))
    return Check(name, m, PASSED, f"{len(pairs)} white-box comparisons with fgsm")


def _white_vs_transfer(m, rows, is_base: bool) -> Check:  # noqa: ANN001
    name = "white-box beats transfer"
    if is_base:
        return Check(name, m, SKIPPED, "the base model is the transfer source (same inputs)")
    wb, tr = _by(rows, "white-box"), _by(rows, "transfer")
    keys = sorted(set(wb) & set(tr))
    if not keys:
        return Check(name, m, SKIPPED, "needs both transfer and white-box runs")
    bad = _violations(
        [Comparison(wb[k], tr[k], f"{k[0]} eps {k[1]:g} white-box vs transfer") for k in keys]
    )
    if bad:
        return Check(
            name, m, WARNING, "attacking the base model works better (masked gradients?): "
            + "; ".join(bad),
        )  # fmt: skip
    return Check(name, m, PASSED, f"{len(keys)} comparisons")


def _white_vs_black(m, rows) -> Check:  # noqa: ANN001
    name = "white-box beats black-box"
    bb = {e: r for (a, e), r in _by(rows, "black-box").items()}
    wb = _by(rows, "white-box")
    keys = sorted(e for e in bb if any(ee == e and ATTACKS[a].norm == "Linf" for a, ee in wb))
    if not keys:
        return Check(name, m, SKIPPED, "needs a black-box (square) and a white-box L-inf run")
    comparisons = []
    for e in keys:
        best = min(
            (r for (a, ee), r in wb.items() if ee == e and ATTACKS[a].norm == "Linf"), key=_acc
        )
        comparisons.append(Comparison(best, bb[e], f"eps {e:g} {best['attack']} vs square"))
    bad = _violations(comparisons)
    if bad:
        return Check(
            name, m, WARNING, "a query-only attack beats gradients (gradient masking): "
            + "; ".join(bad),
        )  # fmt: skip
    return Check(name, m, PASSED, f"{len(keys)} budgets compared")


def _large_eps(m, rows) -> Check:  # noqa: ANN001
    name = "large eps drives accuracy near zero"
    sanity = [r for r in rows if r["role"] == "sanity"]
    if not sanity:
        return Check(name, m, SKIPPED, "the sanity attack was not run")
    r = sanity[0]
    numbers = {"eps": UNBOUNDED_EPS, "steps": UNBOUNDED_STEPS, "correct": r["correct"], "n": r["n"]}
    msg = f"white-box pgd ({UNBOUNDED_STEPS} steps) at eps {UNBOUNDED_EPS:g}: {_fmt(_acc(r))}"
    if _acc(r) > NEAR_ZERO:
        return Check(
            name, m, WARNING, f"{msg} > {NEAR_ZERO} (gradient masking or a broken attack)", numbers
        )
    return Check(name, m, PASSED, msg, numbers)
