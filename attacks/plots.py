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
                if not mine:
                    continue
                eps = [r["eps"] for r in mine]
                (line,) = ax.plot(eps, [r[what] for r in mine], marker="o", label=m)
                if what == "accuracy":
                    lo = [r["ci95"][0] for r in mine]
                    hi = [r["ci95"][1] for r in mine]
                    ax.fill_between(eps, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
                drew = True
            if not drew:
                plt.close(fig)
                continue
            ax.set_xlabel(f"eps ({unit}, pixel units)")
            ax.set_ylabel(what if what == "accuracy" else "mean member agreement")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{attack}, {threat}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
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
            eps = [r["eps"] for r in mine]
            (line,) = ax.plot(eps, [r["accuracy"] for r in mine], marker="o", label=m)
            lo, hi = [r["ci95"][0] for r in mine], [r["ci95"][1] for r in mine]
            ax.fill_between(eps, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        unit = "L2" if norm == "L2" else "L-inf"
        ax.set_xlabel(f"eps ({unit}, pixel units)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("worst case over every attack and threat model")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = out / f"accuracy_worst-case_{_slug(unit)}.png"
        _save(fig, path)
        plt.close(fig)
        written.append(path)
    return written
