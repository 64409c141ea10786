"""Experiment `distribution`: where common initialisations put Q, for several widths.

Paper's claim: every real value of Q labels a point of the flat minimum (the whole real line per
relu neuron, every symmetric matrix for a linear slot), yet Xavier initialisation puts Q in a
narrow range, so gradient flow (which keeps Q) only explores a small part of the minimum.
Square two-layer slots (d = h = C = width): per-neuron imbalances Q_i (relu / leaky_relu) and the
eigenvalues of Q (linear), pooled over independent draws; torch's default nn.Linear init for
comparison. Biases are zero under Xavier and uniform under torch's default.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from symmetry.conserved import imbalance, linear_q
from training.landscape.common import DTYPE

INITS = ("xavier", "torch_default")


@dataclass
class DistributionConfig:
    widths: tuple[int, ...] = (8, 32, 128, 512)
    draws: int = 50
    seed: int = 0
    bins: int = 60


def _draw(width: int, init: str, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    w1 = torch.empty(width, width, dtype=DTYPE)
    w2 = torch.empty(width, width, dtype=DTYPE)
    b1 = torch.zeros(width, dtype=DTYPE)
    if init == "xavier":
        torch.nn.init.xavier_uniform_(w1, generator=gen)
        torch.nn.init.xavier_uniform_(w2, generator=gen)
    else:  # nn.Linear.reset_parameters: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and bias
        bound = 1.0 / math.sqrt(width)
        for t in (w1, w2, b1):
            t.uniform_(-bound, bound, generator=gen)
    return w1, b1, w2


def _stats(values: torch.Tensor, width: int) -> dict:
    """Summary statistics; the (sample) standard deviation is None for a single value."""
    q = torch.quantile(values, torch.tensor([0.01, 0.5, 0.99], dtype=values.dtype))
    std = float(values.std()) if values.numel() > 1 else None
    return {
        "count": int(values.numel()),
        "mean": float(values.mean()),
        "std": std,
        "std_times_sqrt_width": None if std is None else std * math.sqrt(width),
        "p01": float(q[0]),
        "median": float(q[1]),
        "p99": float(q[2]),
        "range_98": float(q[2] - q[0]),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def run(cfg: DistributionConfig) -> dict:
    gen = torch.Generator().manual_seed(cfg.seed)
    out: dict[str, dict] = {}
    samples: dict[str, dict[str, list[float]]] = {}
    for init in INITS:
        out[init] = {}
        samples[init] = {}
        for width in cfg.widths:
            per_neuron, eig = [], []
            for _ in range(cfg.draws):
                w1, b1, w2 = _draw(width, init, gen)
                per_neuron.append(imbalance(w1, b1, w2))
                eig.append(torch.linalg.eigvalsh(linear_q(w1, b1, w2)))
            pn, ev = torch.cat(per_neuron), torch.cat(eig)
            out[init][str(width)] = {
                "relu_imbalance": _stats(pn, width),
                "linear_eigenvalues": _stats(ev, width),
            }
            if init == "xavier":
                samples[init][str(width)] = {"relu": pn.tolist(), "linear": ev.tolist()}
    xav = out["xavier"]
    # Narrowest against widest width (in whatever order they were given); with a single width
    # there is nothing to compare, so the answer is None, not False.
    first, last = str(min(cfg.widths)), str(max(cfg.widths))

    def shrinks(key: str) -> bool | None:
        if first == last:
            return None
        return bool(xav[last][key]["range_98"] < xav[first][key]["range_98"])

    summary = {
        "paper_claim": "Xavier initialisation concentrates Q in a narrow range of the minimum,"
        " whose Q ranges over all real values",
        "reachable_range": "(-inf, inf) per relu neuron; any symmetric Q for a linear slot"
        " (subject to the rank conditions of symmetry.flat_minimum)",
        "xavier_relu_range_98": {w: xav[w]["relu_imbalance"]["range_98"] for w in xav},
        "xavier_linear_eig_range_98": {w: xav[w]["linear_eigenvalues"]["range_98"] for w in xav},
        "relu_range_shrinks_with_width": shrinks("relu_imbalance"),
        "linear_range_shrinks_with_width": shrinks("linear_eigenvalues"),
    }
    return {
        "experiment": "distribution",
        "config": asdict(cfg),
        "summary": summary,
        "stats": out,
        "_samples": samples,
    }


def plot(result: dict, fig) -> None:  # noqa: ANN001
    """Histograms of Xavier's Q per width: relu imbalances and linear eigenvalues."""
    ax_r, ax_l = fig.subplots(1, 2)
    bins = result["config"]["bins"]
    for width, s in result["_samples"]["xavier"].items():
        ax_r.hist(s["relu"], bins=bins, density=True, histtype="step", label=f"width {width}")
        ax_l.hist(s["linear"], bins=bins, density=True, histtype="step", label=f"width {width}")
    ax_r.set(
        xlabel="Q_i = |W2[:, i]|^2 - |(W1[i], b1[i])|^2",
        ylabel="density",
        title="relu / leaky_relu: per-neuron Q under Xavier",
    )
    ax_l.set(
        xlabel="eigenvalue of Q = W2^T W2 - W1 W1^T",
        ylabel="density",
        title="linear slot: eigenvalues of Q under Xavier",
    )
    ax_r.legend(fontsize=7)
    ax_l.legend(fontsize=7)
