"""Shared pieces of the landscape experiments: small float64 two-layer problems, full-batch
gradient descent (or Adam) with the conserved quantities recorded, and the Hessian's top eigenvalue.

Parameters are a dict {w1, b1, w2, b2} in torch's layout (W1: h x d, W2: C x h); samples are rows.
The loss is the mean squared error 0.5 * mean_n ||f(x_n) - y_n||^2, as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.func import grad, jvp

from symmetry.conserved import imbalance, linear_q, whitened_q
from symmetry.flat_minimum import move_to_q
from symmetry.linear import radial
from training.models import make_activation

Params = dict[str, torch.Tensor]
DTYPE = torch.float64
PARAM_NAMES = ("w1", "b1", "w2", "b2")


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The zoo's activation by name, plus 'radial' (O(h)-equivariant, not in the zoo)."""
    return radial if name == "radial" else make_activation(name)


@dataclass
class Problem:
    """A regression problem for a two-layer net; `frozen` names parameters that are not trained."""

    x: torch.Tensor
    y: torch.Tensor
    activation: str
    frozen: tuple[str, ...] = ()
    act: Callable[[torch.Tensor], torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.act = activation_fn(self.activation)

    def forward(self, p: Params, x: torch.Tensor | None = None) -> torch.Tensor:
        x = self.x if x is None else x
        return self.act(x @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"]

    def loss(self, p: Params) -> torch.Tensor:
        return 0.5 * (self.forward(p) - self.y).square().sum(1).mean()

    def trainable(self, p: Params) -> list[str]:
        return [k for k in PARAM_NAMES if k not in self.frozen]


def xavier_params(d: int, h: int, c: int, gen: torch.Generator) -> Params:
    """Glorot-uniform weights, zero biases, float64 (the paper's initialisation)."""
    w1 = torch.nn.init.xavier_uniform_(torch.empty(h, d, dtype=DTYPE), generator=gen)
    w2 = torch.nn.init.xavier_uniform_(torch.empty(c, h, dtype=DTYPE), generator=gen)
    return {
        "w1": w1,
        "b1": torch.zeros(h, dtype=DTYPE),
        "w2": w2,
        "b2": torch.zeros(c, dtype=DTYPE),
    }


def conserved(p: Params, problem: Problem) -> torch.Tensor | None:
    """The slot's Q for the problem's activation (None for radial / unsupported)."""
    a = problem.activation
    if a == "linear":
        return linear_q(p["w1"], p["b1"], p["w2"])
    if a in ("relu", "leaky_relu"):
        return imbalance(p["w1"], p["b1"], p["w2"])
    if a in ("tanh", "sigmoid"):
        return whitened_q(p["w1"], p["b1"], p["w2"], problem.x, a)
    return None


def gradients(p: Params, problem: Problem) -> tuple[torch.Tensor, Params]:
    """Loss and its gradient with respect to the trainable parameters."""
    names = problem.trainable(p)
    leaves = {k: v.detach().requires_grad_(k in names) for k, v in p.items()}
    loss = problem.loss(leaves)
    gs = torch.autograd.grad(loss, [leaves[k] for k in names])
    return loss.detach(), dict(zip(names, gs, strict=True))


@dataclass
class Trajectory:
    steps: list[int]
    loss: list[float]
    params: Params  # final parameters (where a diverged run stopped)
    records: list[object]  # whatever `record` returned at each recorded step
    diverged_at: int | None = None  # the step whose loss was not finite (always recorded)


def train(
    p: Params,
    problem: Problem,
    lr: float,
    steps: int,
    optimizer: str = "gd",
    every: int = 10,
    record: Callable[[Params], object] | None = None,
) -> Trajectory:
    """Full-batch gradient descent (`gd`) or torch.optim.Adam for `steps` steps from p (copied).

    Records the loss (and `record(params)`) at step 0, every `every` steps and at the end. A run
    whose loss stops being finite ends there: that step is recorded (so loss[-1] is inf or nan,
    never a stale earlier value) and kept in `diverged_at`."""
    p = {k: v.detach().clone() for k, v in p.items()}
    names = problem.trainable(p)
    opt = None
    if optimizer == "adam":
        for k in names:
            p[k].requires_grad_(True)
        opt = torch.optim.Adam([p[k] for k in names], lr=lr)
    elif optimizer != "gd":
        raise ValueError(f"unknown optimizer {optimizer!r}")
    traj = Trajectory([], [], p, [])

    def snapshot(step: int, loss: float) -> None:
        traj.steps.append(step)
        traj.loss.append(loss)
        if record is not None:
            traj.records.append(record({k: v.detach() for k, v in p.items()}))

    for step in range(steps + 1):
        loss, g = gradients(p, problem)
        finite = bool(torch.isfinite(loss))
        if step % every == 0 or step == steps or not finite:
            snapshot(step, float(loss))
        if not finite:
            traj.diverged_at = step
            break
        if step == steps:
            break
        if opt is None:
            for k in names:
                p[k] = p[k] - lr * g[k]
        else:
            opt.zero_grad()
            for k in names:
                p[k].grad = g[k]
            opt.step()
    traj.params = {k: v.detach().clone() for k, v in p.items()}
    return traj


def grad_norm(p: Params, problem: Problem) -> float:
    """Euclidean norm of the loss gradient over the trainable parameters (0 where stationary)."""
    _, g = gradients(p, problem)
    return float(torch.sqrt(sum(t.square().sum() for t in g.values())))


def top_hessian_eigenvalue(
    p: Params, problem: Problem, iters: int = 200, tol: float = 1e-10, seed: int = 0
) -> float:
    """Largest-magnitude eigenvalue of the loss Hessian over the trainable parameters, by power
    iteration on Hessian-vector products (torch.func: forward-over-reverse jvp of grad)."""
    names = problem.trainable(p)
    fixed = {k: v.detach() for k, v in p.items() if k not in names}
    primal = {k: p[k].detach() for k in names}

    def loss_of(q: Params) -> torch.Tensor:
        return problem.loss({**fixed, **q})

    grad_fn = grad(loss_of)
    gen = torch.Generator().manual_seed(seed)
    v = {k: torch.randn(t.shape, generator=gen, dtype=t.dtype) for k, t in primal.items()}
    lam = 0.0
    for _ in range(iters):
        norm = torch.sqrt(sum(t.square().sum() for t in v.values()))
        v = {k: t / norm for k, t in v.items()}
        _, hv = jvp(grad_fn, (primal,), (v,))
        new = float(sum((hv[k] * v[k]).sum() for k in names))
        v = hv
        if abs(new - lam) <= tol * max(abs(new), 1e-30):
            lam = new
            break
        lam = new
    return lam


def teacher_problem(
    activation: str,
    samples: int,
    inputs: int,
    outputs: int,
    teacher_hidden: int,
    gen: torch.Generator,
) -> Problem:
    """Gaussian inputs labelled by a random (Xavier) teacher of the same activation: realisable,
    so the global minimum has zero loss."""
    x = torch.randn(samples, inputs, generator=gen, dtype=DTYPE)
    teacher = xavier_params(inputs, teacher_hidden, outputs, gen)
    y = Problem(x, torch.zeros(samples, outputs, dtype=DTYPE), activation).forward(teacher)
    return Problem(x, y.detach(), activation)


def with_q(p: Params, activation: str, target: float | None) -> Params:
    """p moved along its linear symmetry to Q = target (None: p itself); same function."""
    if target is None:
        return dict(p)
    w1, b1, w2 = move_to_q(p["w1"], p["b1"], p["w2"], activation, target)
    return {**p, "w1": w1, "b1": b1, "w2": w2}


def flat(p: Params, names: list[str] | tuple[str, ...] = PARAM_NAMES) -> torch.Tensor:
    return torch.cat([p[k].reshape(-1) for k in names])


class single_thread:  # noqa: N801  (used as a context manager)
    """Run tiny float64 problems on one thread: on a busy 2-core machine torch's thread pool
    costs ten times the arithmetic. Restores the previous setting."""

    def __enter__(self) -> None:
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.before)


def rank_correlation(a: list[float], b: list[float]) -> float | None:
    """Spearman's rho (average ranks for ties); None where it is undefined: fewer than 3 points,
    a value that is not a finite number (a diverged run), or a side that is constant."""
    if len(a) != len(b) or len(a) < 3:
        return None
    if not all(v is not None and math.isfinite(v) for v in (*a, *b)):
        return None

    def ranks(v: list[float]) -> torch.Tensor:
        t = torch.tensor(v, dtype=DTYPE)
        r = torch.empty_like(t)
        order = torch.argsort(t)
        r[order] = torch.arange(len(v), dtype=DTYPE)
        for value in torch.unique(t):  # average the ranks of ties
            tie = t == value
            r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return None if den == 0 else float((ra * rb).sum()) / den


def finite_max(values: list[float]) -> float | None:
    """max(values), or None when any is not a finite number (the run diverged): NaN would make
    Python's max depend on the order, and neither belongs in a summary."""
    if not values or not all(v is not None and math.isfinite(v) for v in values):
        return None
    return max(values)


def finite_points(xs: list, ys: list) -> tuple[list, list]:
    """The (x, y) pairs whose y is a finite number: what a plot of a diverged run can show."""
    kept = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and math.isfinite(y)]
    return [x for x, _ in kept], [y for _, y in kept]


def above(value: float | None, limit: float) -> bool | None:
    """value > limit, or None when value is undefined (None): such a value decides nothing."""
    return None if value is None else bool(value > limit)


def below(value: float | None, limit: float) -> bool | None:
    """value < limit, None when value is undefined (None)."""
    return None if value is None else bool(value < limit)
