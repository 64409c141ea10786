"""Report figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
import re
from pathlib import Path

from attacks.catalog import ATTACKS
from attacks.report import Report
from orbit import atomic

PLOT_PATTERNS = ("accuracy_*.png", "agreement_*.png")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _save(fig, path: Path) -> None:  # noqa: ANN001
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic.write_bytes(path, buf.getvalue())


def _line(ax, model: str, rows: list[dict], what: str) -> None:  # noqa: ANN001
    """One model's `what` against eps, with its Wilson 95% band for accuracy."""
    eps = [r["eps"] for r in rows]
    (line,) = ax.plot(eps, [r[what] for r in rows], marker="o", label=model)
    if what == "accuracy":
        lo, hi = [r["ci95"][0] for r in rows], [r["ci95"][1] for r in rows]
        ax.fill_between(eps, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)


def _finish(ax, unit: str, ylabel: str, title: str) -> None:  # noqa: ANN001
    ax.set_xlabel(f"eps ({unit}, pixel units)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def write_plots(report: Report, out_dir: str | Path) -> list[Path]:
    """Accuracy vs eps per (attack, threat), one line per model with its Wilson 95% band, and
    ensemble agreement vs eps. Returns the files written; stale figures are removed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    written: list[Path] = []
    models = list(report.models)
    for attack, threat in report.cells():
        rows = [r for r in report.sweep_rows() if (r["attack"], r["threat"]) == (attack, threat)]
        unit = "L2" if ATTACKS[attack].norm == "L2" else "L-inf"
        for what in ("accuracy", "agreement"):
            fig, ax = plt.subplots(figsize=(5.5, 3.8))
            drew = False
            for m in models:
                mine = sorted((r for r in rows if r["model"] == m), key=lambda r: r["eps"])
                mine = [r for r in mine if r[what] is not None]
                if mine:
                    _line(ax, m, mine, what)
                    drew = True
            if not drew:
                plt.close(fig)
                continue
            ylabel = what if what == "accuracy" else "mean member agreement"
            _finish(ax, unit, ylabel, f"{attack}, {threat}")
            path = out / f"{what}_{_slug(attack)}_{_slug(threat)}.png"
            _save(fig, path)
            plt.close(fig)
            written.append(path)
    written += _worst_case_plots(report, out, plt)
    keep = set(written)
    for pattern in PLOT_PATTERNS:
        for stale in out.glob(pattern):
            if stale not in keep:
                stale.unlink()
    return written


def _worst_case_plots(report: Report, out: Path, plt) -> list[Path]:  # noqa: ANN001
    """Per norm: the per-input worst case over every attack and threat model against eps,
    starting from clean accuracy at eps 0, one line per model with its Wilson band."""
    written = []
    worst = [r for r in report.rows if r["role"] == "worst-case"]
    clean = {r["model"]: r for r in report.rows if r["role"] == "clean"}
    for norm in sorted({r["norm"] for r in worst}):
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for m in report.models:
            mine = sorted((r for r in worst if r["model"] == m and r["norm"] == norm),
                          key=lambda r: r["eps"])  # fmt: skip
            if not mine:
                continue
            if m in clean:
                mine = [{**clean[m], "eps": 0.0}, *mine]
            _line(ax, m, mine, "accuracy")
        unit = "L2" if norm == "L2" else "L-inf"
        _finish(ax, unit, "accuracy", "worst case over every attack and threat model")
        path = out / f"accuracy_worst-case_{_slug(unit)}.png"
        _save(fig, path)
        plt.close(fig)
        written.append(path)
    return written
