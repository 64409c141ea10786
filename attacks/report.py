"""The evaluation report: report.json (versioned schema, every number) and report.md (tables).

Schema `orbit.report/1`:
  schema, status ("running" | "complete" | "failed"), error, created, seconds,
  config      the sweep's configuration (attacks, threats, eps, options, seed, devices...),
  environment library versions, platform, world size,
  data        dataset, fingerprint, test-split size, samples evaluated and how they were chosen,
  models      name -> kind, source path, weights hash, members,
  rows        one per (model, attack, threat, eps): n, correct, accuracy, ci95 (Wilson),
              agreement, auroc_mi, auroc_mi_successful, budget_violations, role
              (role "clean": no attack; "sweep": the grid; "sanity": the large-eps check;
              "worst-case": per model and budget, the inputs right under every cell, with the
              cells it is taken "over"),
  sanity      the checks of attacks/sanity.py (check, model, status, message, numbers).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from orbit import atomic
from orbit.errors import UserError

SCHEMA = "orbit.report/1"
JSON_NAME = "report.json"
MD_NAME = "report.md"
# While a sweep runs, and when it fails, its numbers go here; report.json/md are only ever a
# complete report, so a failed rerun never replaces the last complete one.
PARTIAL_JSON_NAME = "report.partial.json"
PARTIAL_MD_NAME = "report.partial.md"
STATUSES = ("running", "complete", "failed")


@dataclass
class Report:
    config: dict[str, Any]
    environment: dict[str, Any]
    data: dict[str, Any]
    models: dict[str, dict[str, Any]]
    rows: list[dict[str, Any]] = field(default_factory=list)
    sanity: list[dict[str, Any]] = field(default_factory=list)
    status: str = "running"
    error: str | None = None
    created: str = ""
    seconds: float = 0.0
    schema: str = SCHEMA

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {"schema": d.pop("schema"), **d}

    @classmethod
    def from_json(cls, d: Any, source: str = "report") -> Report:
        if not isinstance(d, dict):
            raise UserError(f"{source} is not a JSON object; rerun `orbit evaluate`")
        if d.get("schema") != SCHEMA:
            raise UserError(
                f"{source} has schema {d.get('schema')!r}, expected {SCHEMA};"
                " rerun `orbit evaluate`"
            )
        names = {f.name for f in fields(cls)}
        missing = [n for n in ("config", "environment", "data", "models", "rows") if n not in d]
        if missing:
            raise UserError(f"{source} lacks {', '.join(missing)}; rerun `orbit evaluate`")
        if d.get("status") not in STATUSES:
            raise UserError(f"{source} has an unknown status {d.get('status')!r}")
        return cls(**{k: v for k, v in d.items() if k in names})

    # --- views -------------------------------------------------------------------------------

    def sweep_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["role"] == "sweep"]

    def cells(self) -> list[tuple[str, str]]:
        """(attack, threat) pairs of the sweep, in the order they were run."""
        seen: dict[tuple[str, str], None] = {}
        for r in self.sweep_rows():
            seen.setdefault((r["attack"], r["threat"]), None)
        return list(seen)

    def warnings(self) -> list[dict[str, Any]]:
        return [c for c in self.sanity if c["status"] == "warning"]


def write_report(out_dir: str | Path, report: Report) -> None:
    """report.json then report.md (each written atomically) for a complete report, which also
    removes the partial files; report.partial.json/md for a running or failed one."""
    out = Path(out_dir)
    complete = report.status == "complete"
    names = (JSON_NAME, MD_NAME) if complete else (PARTIAL_JSON_NAME, PARTIAL_MD_NAME)
    atomic.write_text(
        out / names[0], json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n"
    )
    atomic.write_text(out / names[1], render_markdown(report))
    if complete:
        for name in (PARTIAL_JSON_NAME, PARTIAL_MD_NAME):
            (out / name).unlink(missing_ok=True)


def load_report(path: str | Path, partial: bool = False) -> Report:
    """The complete report in `path` (a report.json or its directory); `partial`: the numbers of
    a running or failed sweep instead."""
    path = Path(path)
    if path.is_dir():
        path = path / (PARTIAL_JSON_NAME if partial else JSON_NAME)
    if not path.is_file():
        raise UserError(f"{path} not found; run `orbit evaluate` first")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); rerun `orbit evaluate`") from None
    return Report.from_json(d, str(path))


# --- markdown ----------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _cell(r: dict[str, Any]) -> str:
    lo, hi = r["ci95"]
    return f"{_pct(r['accuracy'])} [{_pct(lo)}, {_pct(hi)}]"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _est(r: dict[str, Any], key: str) -> str:
    """An estimate with its 95% interval (and its clean/adversarial counts for AUROCs)."""
    ci = r.get(f"{key}_ci95")
    text = _num(r[key]) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if r[key] is not None and ci else "")
    counts = r.get(f"{key}_n")
    return text + (f" ({counts[0]}/{counts[1]})" if counts else "")


def render_markdown(report: Report) -> str:
    cfg, data = report.config, report.data
    lines = [
        "# Robustness report",
        "",
        f"Status: **{report.status}**" + (f" — {report.error}" if report.error else ""),
        "",
        f"Dataset `{data.get('dataset')}`, {data.get('samples')} test inputs"
        f" (of {data.get('test_size')}; {data.get('selection')}); seed {cfg.get('seed')};"
        f" {report.environment.get('world_size', 1)} process(es).",
        "Accuracy in %, with the Wilson 95% interval; eps is L-inf in pixel units"
        " (L2 radius for pgd-l2 and cw).",
        "",
    ]
    clean = [r for r in report.rows if r["role"] == "clean"]
    if clean:
        lines += ["## Clean accuracy", "", "| model | accuracy | n | agreement |"]
        lines += ["|---|---|---|---|"]
        lines += [
            f"| {r['model']} | {_cell(r)} | {r['n']} | {_num(r['agreement'])} |" for r in clean
        ]
        lines.append("")
    models = list(report.models)
    for attack, threat in report.cells():
        rows = [r for r in report.sweep_rows() if (r["attack"], r["threat"]) == (attack, threat)]
        eps = sorted({r["eps"] for r in rows})
        lines += [f"## {attack} — {threat}", ""]
        lines += ["| model | " + " | ".join(f"eps {e:g}" for e in eps) + " |"]
        lines += ["|---|" + "---|" * len(eps)]
        for m in models:
            by_eps = {r["eps"]: r for r in rows if r["model"] == m}
            if by_eps:
                cells = [_cell(by_eps[e]) if e in by_eps else "" for e in eps]
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
        ens = [r for r in rows if r["agreement"] is not None and r["eps"] > 0]
        if ens:
            lines += [
                "",
                "| ensemble | eps | agreement | AUROC(MI) all | AUROC(MI) successful |",
                "|---|---|---|---|---|",
            ]
            lines += [
                f"| {r['model']} | {r['eps']:g} | {_est(r, 'agreement')} | {_est(r, 'auroc_mi')}"
                f" | {_est(r, 'auroc_mi_successful')} |"
                for r in ens
            ]
        lines.append("")
    worst = [r for r in report.rows if r["role"] == "worst-case"]
    if worst:
        lines += [
            "## Worst case over every attack and threat model",
            "",
            "An input counts only if the model stayed right on it under every attack and threat"
            " model run at that budget (the per-input worst case: what the model can claim).",
            "",
        ]
        budgets = sorted({(r["norm"], r["eps"]) for r in worst})
        lines += ["| model | " + " | ".join(f"{n} eps {e:g}" for n, e in budgets) + " |"]
        lines += ["|---|" + "---|" * len(budgets)]
        for m in models:
            by = {(r["norm"], r["eps"]): r for r in worst if r["model"] == m}
            if by:
                cells = [_cell(by[b]) if b in by else "" for b in budgets]
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
        over = sorted({c for r in worst for c in r.get("over", [])})
        lines += ["", f"Over: {', '.join(over)}.", ""]
    not_run = cfg.get("cells_not_run") or []
    if not_run:
        lines += ["## Not run", ""]
        lines += [f"- {c['attack']} under {c['threat']}: {c['reason']}" for c in not_run]
        lines.append("")
    if report.sanity:
        lines += ["## Sanity checks", "", "| model | check | status | detail |"]
        lines += ["|---|---|---|---|"]
        mark = {"passed": "passed", "warning": "**WARNING**", "skipped": "skipped"}
        lines += [
            f"| {c['model']} | {c['check']} | {mark[c['status']]} | {c['message']} |"
            for c in report.sanity
        ]
        lines.append("")
        warns = report.warnings()
        lines += ["## Warnings", ""]
        lines += [f"- {c['model']}: {c['check']}: {c['message']}" for c in warns] or ["- none"]
        lines.append("")
    lines += [
        "Robust accuracy counts an input when the model is right on it both clean and attacked."
        " Agreement: mean share of members voting with the ensemble, with a normal 95% interval"
        " over inputs. AUROC(MI): how well the ensemble's mutual information separates clean from"
        " adversarial inputs (0.5 = not at all), with its Hanley-McNeil 95% interval and"
        " (clean/adversarial) counts; 'successful' restricts to correctly classified clean inputs"
        " and the adversarial inputs that fooled the ensemble.",
        "",
    ]
    return "\n".join(lines)
