"""Experiment `sharpness`: the Hessian's top eigenvalue at the minimum reached, against initial Q.

Paper's claim: Q changes the sharpness of the minimum (for the scalar model u v -> y, the Hessian
at the minimum has top eigenvalue u^2 + v^2 = sqrt(Q^2 + 4 y^2): balanced Q = 0 is flattest). Two
measurements: (1) train from one Xavier initialisation moved to each initial Q and take the top
eigenvalue where training ends; (2) move the point that Xavier training reached along its flat
minimum to each Q (same loss) and measure there. Hessian-vector products with torch.func.
Whether each run really reached a minimum is reported beside its eigenvalue: the final loss (the
global minimum has loss 0: the problem is realisable) and the norm of the final gradient.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from symmetry.conserved import q_mean
from training.landscape.common import (
    conserved,
    grad_norm,
    rank_correlation,
    teacher_problem,
    top_hessian_eigenvalue,
    train,
    with_q,
    xavier_params,
)


@dataclass
class SharpnessConfig:
    activations: tuple[str, ...] = ("linear", "leaky_relu")
    hidden: dict[str, int] = field(default_factory=lambda: {"linear": 8, "leaky_relu": 32})
    samples: int = 32
    inputs: int = 8
    outputs: int = 8
    teacher_hidden: int = 8
    targets: tuple[float, ...] = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)
    lr: float = 0.05
    steps: int = 2000
    hessian_iters: int = 300
    seed: int = 0


def run(cfg: SharpnessConfig) -> dict:
    gen = torch.Generator().manual_seed(cfg.seed)
    results: dict[str, dict] = {}
    summary: dict[str, object] = {
        "paper_claim": "Q changes the sharpness of the minimum reached (balanced Q flattest)",
        "measure": "top Hessian eigenvalue; rho = Spearman(|Q|, eigenvalue)",
        "stability_limit_2_over_lr": 2.0 / cfg.lr,
    }
    for activation in cfg.activations:
        h = cfg.hidden.get(activation, 16)
        problem = teacher_problem(
            activation, cfg.samples, cfg.inputs, cfg.outputs, cfg.teacher_hidden, gen
        )
        p0 = xavier_params(cfg.inputs, h, cfg.outputs, gen)
        trained = []
        reached = None
        for target in (None, *cfg.targets):
            p = with_q(p0, activation, target)
            traj = train(p, problem, cfg.lr, cfg.steps, "gd", every=cfg.steps)
            diverged = traj.diverged_at is not None
            if target is None and not diverged:
                reached = traj.params
            trained.append(
                {
                    "target_q": target,
                    "q_mean_start": q_mean(conserved(p, problem)),
                    "loss_start": traj.loss[0],
                    "loss_end": traj.loss[-1],
                    "grad_norm_end": float("nan") if diverged else grad_norm(traj.params, problem),
                    "diverged_at_step": traj.diverged_at,
                    "top_eigenvalue": float("nan")
                    if diverged
                    else top_hessian_eigenvalue(
                        traj.params, problem, cfg.hessian_iters, seed=cfg.seed
                    ),
                }
            )
        along = []
        # The Xavier run's end moved along its orbit; nothing to move if that run diverged.
        for target in (None, *cfg.targets) if reached is not None else ():
            p = with_q(reached, activation, target)
            along.append(
                {
                    "target_q": target,
                    "q_mean": q_mean(conserved(p, problem)),
                    "loss": float(problem.loss(p)),
                    "grad_norm": grad_norm(p, problem),
                    "top_eigenvalue": top_hessian_eigenvalue(
                        p, problem, cfg.hessian_iters, seed=cfg.seed
                    ),
                }
            )
        results[activation] = {"hidden": h, "trained": trained, "along_minimum": along}

        def rho(rows: list[dict]) -> float | None:
            rows = [r for r in rows if r["target_q"] is not None]
            return rank_correlation(
                [abs(r["target_q"]) for r in rows], [r["top_eigenvalue"] for r in rows]
            )

        def key(target: float | None) -> str:
            return "xavier" if target is None else f"{target:g}"

        losses = [r["loss"] for r in along]
        rho_trained, rho_along = rho(trained), rho(along)
        summary[activation] = {
            "rho_abs_q_vs_sharpness_trained": rho_trained,
            "rho_abs_q_vs_sharpness_along_minimum": rho_along,
            "top_eigenvalue_trained": {
                f"{r['target_q']:g}": r["top_eigenvalue"] for r in trained[1:]
            },
            "top_eigenvalue_along_minimum": {
                f"{r['target_q']:g}": r["top_eigenvalue"] for r in along[1:]
            },
            # Did each trained run reach a minimum? Its loss (0 at the global one) and gradient.
            "loss_start": trained[0]["loss_start"],
            "loss_end_trained": {key(r["target_q"]): r["loss_end"] for r in trained},
            "grad_norm_end_trained": {key(r["target_q"]): r["grad_norm_end"] for r in trained},
            "diverged_at_step": {
                key(r["target_q"]): r["diverged_at_step"]
                for r in trained
                if r["diverged_at_step"] is not None
            },
            "loss_spread_along_minimum": max(losses) - min(losses) if losses else None,
            "sharper_with_larger_abs_q": None
            if rho_trained is None or rho_along is None
            else bool(rho_trained > 0.5 and rho_along > 0.5),
        }
    return {
        "experiment": "sharpness",
        "config": asdict(cfg),
        "summary": summary,
        "activations": results,
    }


def plot(result: dict, fig) -> None:  # noqa: ANN001
    """Top Hessian eigenvalue against Q: after training and along the reached minimum."""
    acts = list(result["activations"])
    axes = fig.subplots(1, len(acts), squeeze=False)[0]
    for ax, name in zip(axes, acts, strict=True):
        entry = result["activations"][name]
        for key, style, label in (
            ("trained", "o-", "trained from initial Q (x: initial Q)"),
            ("along_minimum", "s--", "reached minimum moved to Q (x: Q)"),
        ):
            rows = [r for r in entry[key] if r["target_q"] is not None]
            ax.plot(
                [r["target_q"] for r in rows],
                [r["top_eigenvalue"] for r in rows],
                style,
                label=label,
            )
        ax.set(
            xlabel="Q (per neuron, or Q = t I)",
            ylabel="top Hessian eigenvalue",
            title=f"{name}: sharpness against Q",
        )
        ax.legend(fontsize=7)
