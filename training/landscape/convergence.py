"""Experiment `convergence`: loss against gradient-descent steps for several initial Q.

Paper's claim: Q, fixed at initialisation and kept by gradient flow, changes the convergence rate
(for a two-layer linear net the rate grows with |Q|: the scalar model u v -> y converges at a rate
proportional to u^2 + v^2 = sqrt(Q^2 + 4 (uv)^2)). One Xavier initialisation is moved along its
symmetry to each target Q, so every run starts from the SAME function and the same loss; only Q
differs. Realisable teacher-student regression, full-batch GD, float64.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from symmetry.conserved import q_mean
from training.landscape.common import (
    below,
    conserved,
    finite_points,
    rank_correlation,
    teacher_problem,
    train,
    with_q,
    xavier_params,
)

FRACTIONS = (1e-1, 1e-2, 1e-3)


@dataclass
class ConvergenceConfig:
    activations: tuple[str, ...] = ("linear", "leaky_relu")
    hidden: dict[str, int] = field(default_factory=lambda: {"linear": 8, "leaky_relu": 32})
    samples: int = 32
    inputs: int = 8
    outputs: int = 8
    teacher_hidden: int = 8
    targets: tuple[float, ...] = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)
    lr: float = 0.02
    steps: int = 1500
    every: int = 10
    seed: int = 0


def steps_to(traj_steps: list[int], losses: list[float], fraction: float) -> int | None:
    """First recorded step whose loss is at most `fraction` of the initial loss (None: never)."""
    for s, v in zip(traj_steps, losses, strict=True):
        if v <= fraction * losses[0]:
            return s
    return None


def run(cfg: ConvergenceConfig) -> dict:
    gen = torch.Generator().manual_seed(cfg.seed)
    results: dict[str, dict] = {}
    summary: dict[str, object] = {
        "paper_claim": "larger |Q| at initialisation changes (speeds up) convergence",
        "measure": "steps to reach 1% of the initial loss; rho = Spearman(|Q|, steps); a run that"
        " never reaches it (or diverges) ranks last; null: undefined (e.g. every run tied)",
    }
    for activation in cfg.activations:
        h = cfg.hidden.get(activation, 16)
        problem = teacher_problem(
            activation, cfg.samples, cfg.inputs, cfg.outputs, cfg.teacher_hidden, gen
        )
        p0 = xavier_params(cfg.inputs, h, cfg.outputs, gen)
        runs = []
        for target in (None, *cfg.targets):
            p = with_q(p0, activation, target)
            traj = train(p, problem, cfg.lr, cfg.steps, "gd", cfg.every)
            runs.append(
                {
                    "target_q": target,
                    "q_mean_start": q_mean(conserved(p, problem)),
                    "q_mean_end": q_mean(conserved(traj.params, problem)),
                    "loss_start": traj.loss[0],
                    "loss_end": traj.loss[-1],  # inf / nan (null in the JSON) if it diverged
                    "diverged_at_step": traj.diverged_at,
                    **{f"steps_to_{f:g}": steps_to(traj.steps, traj.loss, f) for f in FRACTIONS},
                    "series": {"step": traj.steps, "loss": traj.loss},
                }
            )
        moved = [r for r in runs if r["target_q"] is not None]
        # "not reached" (within the steps, or before diverging) ranks after every reached value
        never = cfg.steps + cfg.every
        speed = [r["steps_to_0.01"] if r["steps_to_0.01"] is not None else never for r in moved]
        rho = rank_correlation([abs(r["target_q"]) for r in moved], speed)
        results[activation] = {"hidden": h, "runs": runs}
        summary[activation] = {
            "rho_abs_q_vs_steps_to_1pct": rho,
            "steps_to_1pct": {f"{r['target_q']:g}": r["steps_to_0.01"] for r in moved},
            "loss_end": {f"{r['target_q']:g}": r["loss_end"] for r in moved},
            "diverged_at_step": {
                f"{r['target_q']:g}": r["diverged_at_step"]
                for r in moved
                if r["diverged_at_step"] is not None
            },
            "start_loss_spread": max(r["loss_start"] for r in runs)
            - min(r["loss_start"] for r in runs),
            "faster_with_larger_abs_q": below(rho, -0.5),  # None when rho is undefined
        }
    return {
        "experiment": "convergence",
        "config": asdict(cfg),
        "summary": summary,
        "activations": results,
    }


def plot(result: dict, fig) -> None:  # noqa: ANN001
    """Loss curves per initial Q, one panel per activation."""
    acts = list(result["activations"])
    axes = fig.subplots(1, len(acts), squeeze=False)[0]
    for ax, name in zip(axes, acts, strict=True):
        for r in result["activations"][name]["runs"]:
            t = r["target_q"]
            label = f"Xavier (mean Q {r['q_mean_start']:.2f})" if t is None else f"Q = {t:g}"
            if r["diverged_at_step"] is not None:
                label += f" (diverged at step {r['diverged_at_step']})"
            style = "k--" if t is None else "-"
            steps, losses = finite_points(r["series"]["step"], r["series"]["loss"])
            ax.plot(steps, losses, style, label=label)
        ax.set(
            yscale="log",
            xlabel="GD step",
            ylabel="loss (MSE)",
            title=f"{name}: loss for each initial Q (same start function)",
        )
        lo, hi = ax.get_ylim()
        if lo > 0 and hi <= lo * (1 + 1e-9):  # one loss value (every run diverged at once)
            ax.set_ylim(lo / 2, hi * 2)
        ax.legend(fontsize=7)
