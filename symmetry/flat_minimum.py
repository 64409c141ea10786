"""Coordinates along a symmetry-induced flat minimum: move a slot to a requested Q, same function.

Q is constant under gradient flow and changes along the symmetry orbit, so it labels the points of
the flat minimum (paper, section 5). A scalar target t means:
- relu / leaky_relu: every neuron's imbalance Q_i = t. Scaling neuron i by c > 0 gives
  Q_i(c) = a / c^2 - b c^2 (a = ||W2[:, i]||^2, b = ||(W1[i], b1[i])||^2), which is monotone in
  c, so t is reached by exactly one c unless the neuron has no incoming (b = 0: needs t > 0) or no
  outgoing weights (a = 0: needs t < 0).
- linear: Q = t I. With A = W2^T W2, B = W~1 W~1^T, the move g = P^(1/2) reaches it iff the SPD
  matrix P solves the Riccati equation P B P + t P = A. With B invertible and M = B^(1/2) A B^(1/2):
  P = B^(-1/2) R B^(-1/2), R = r(M), r(m) = (-t + sqrt(t^2 + 4 m)) / 2, positive for all m when
  t < 0 and for m > 0 when t >= 0; symmetrically with A invertible for t > 0. So t < 0 needs
  [W1|b1] of full row rank h (d + 1 >= h), t > 0 needs W2 of full column rank (C >= h), t = 0
  both: since W2^T W2 has rank <= C, a slot with fewer classes than hidden units cannot reach
  Q = t I for t >= 0, and that is a property of the minimum, not of the solver.
Everything is computed in float64 and written back in the slot's dtype. Storing the moved weights
in float32 rounds each one by up to 2^-24 relative, which moves Q by about 2^-24 times the size of
the two terms that cancel in it (||W2^T W2|| + ||W~1 W~1^T||, typically O(1)): a floor of about
1e-7 absolute, so a target with |t| below about 0.1 cannot be met within 1e-6 relative in float32.
That is a limit of the number format, not of the minimum, so it is warned about (FloatFloorWarning,
with the error reached and the floor) and not refused; set_slot_q returns the error it reached.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from orbit.errors import UserError
from symmetry.conserved import linear_q
from symmetry.linear import act, augmented_first_layer, check_slot_shapes

Q_ACTIVATIONS = ("linear", "relu", "leaky_relu")
REACH_TOL = 1e-6  # relative error in Q that counts as "reached"
COND_LIMIT = 1e12  # a rank test for the Gram matrices of the two layers


class FloatFloorWarning(UserWarning):
    """The target Q was reached in float64 but the slot's dtype (float32) cannot store it within
    REACH_TOL: its rounding of the weights moves Q by more than that."""


@torch.no_grad()
def xavier_init_slot(slot: nn.Module, generator: torch.Generator | None = None) -> None:
    """Glorot-uniform weights and zero biases for fc1 and fc2 (the paper's default init)."""
    for layer in (slot.fc1, slot.fc2):
        nn.init.xavier_uniform_(layer.weight, generator=generator)
        if layer.bias is not None:
            layer.bias.zero_()


def _check_target(target: float) -> float:
    t = float(target)
    if not math.isfinite(t):
        raise UserError(f"target Q must be a finite number, got {target}")
    return t


def imbalance_scaling(
    w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, target: float | torch.Tensor
) -> torch.Tensor:
    """Positive per-neuron scales c (float64, h) with imbalance(c W~1, W2 / c) = target."""
    h = check_slot_shapes(w1, b1, w2)
    t = torch.as_tensor(target, dtype=torch.float64).expand(h).clone()
    if not torch.isfinite(t).all():
        raise UserError("target Q must be finite")
    a = w2.to(torch.float64).square().sum(0)
    b = augmented_first_layer(w1, b1).to(torch.float64).square().sum(1)
    disc = torch.sqrt(t.square() + 4.0 * a * b)
    # u = c^2 solves b u^2 + t u - a = 0; two algebraically equal forms, each stable on one side.
    u = torch.where(t > 0, 2.0 * a / (t + disc), (-t + disc) / (2.0 * b))
    u = torch.where(b == 0, a / t, u)
    u = torch.where(a == 0, -t / b, u)
    u = torch.where((a == 0) & (b == 0), torch.ones_like(u), u)
    bad = ~(torch.isfinite(u) & (u > 0)) | ((a == 0) & (b == 0) & (t != 0))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise UserError(
            f"target Q = {float(t[i]):g} is unreachable for hidden unit {i} (incoming norm^2"
            f" {float(b[i]):.3g}, outgoing norm^2 {float(a[i]):.3g}): a unit without incoming"
            " weights only reaches Q > 0, one without outgoing weights only Q < 0; pick another"
            " target or re-initialise the slot"
        )
    return torch.sqrt(u)


def _sym_fn(m: torch.Tensor, fn) -> torch.Tensor:  # noqa: ANN001
    """fn applied to the eigenvalues of a symmetric matrix."""
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * fn(vals)) @ vecs.T


def _invertible(gram: torch.Tensor) -> bool:
    vals = torch.linalg.eigvalsh(gram)
    return bool(vals[-1] > 0 and vals[0] > vals[-1] / COND_LIMIT)


def _riccati_root(m: torch.Tensor, t: float) -> torch.Tensor:
    """R = r(M), r(m) the positive root of r^2 + t r - m = 0, stable for either sign of t."""

    def r(vals: torch.Tensor) -> torch.Tensor:
        vals = vals.clamp_min(0.0)
        disc = torch.sqrt(t * t + 4.0 * vals)
        return 2.0 * vals / (t + disc) if t > 0 else (-t + disc) / 2.0

    return _sym_fn(m, r)


def linear_q_move(
    w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, target: float
) -> torch.Tensor:
    """The SPD g (float64, h x h) with linear_q(g W~1, W2 g^-1) = target * I (see module doc)."""
    h = check_slot_shapes(w1, b1, w2)
    t = _check_target(target)
    w1a = augmented_first_layer(w1, b1).to(torch.float64)
    w2d = w2.to(torch.float64)
    a, b = w2d.T @ w2d, w1a @ w1a.T
    a_inv, b_inv = _invertible(a), _invertible(b)
    if b_inv and (t < 0 or a_inv):
        b_half = _sym_fn(b, torch.sqrt)
        b_mhalf = _sym_fn(b, torch.rsqrt)
        p = b_mhalf @ _riccati_root(b_half @ a @ b_half, t) @ b_mhalf
        return _sym_fn(p, torch.sqrt)
    if a_inv and t > 0:
        # S = P^-1 solves S A S - t S - B = 0: the same equation with A <-> B and t -> -t.
        a_half = _sym_fn(a, torch.sqrt)
        a_mhalf = _sym_fn(a, torch.rsqrt)
        s = a_mhalf @ _riccati_root(a_half @ b @ a_half, -t) @ a_mhalf
        return _sym_fn(s, torch.rsqrt)
    need = {
        -1: f"Q = t I with t < 0 needs [W1|b1] of full row rank (d + 1 >= h = {h})",
        1: f"Q = t I with t > 0 needs W2 of full column rank (classes C >= h = {h})",
        0: "Q = 0 needs both [W1|b1] and W2 of full rank h",
    }[(t > 0) - (t < 0)]
    raise UserError(
        f"Q = {t:g} I is unreachable for this linear slot (h = {h}, d + 1 = {w1a.shape[1]},"
        f" C = {w2.shape[0]}): {need}; choose another target or slot width"
    )


def move_to_q(
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    activation: str,
    target: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The slot moved along its linear symmetry so that its Q equals the target (same dtype).

    Checks the result in float64 and raises UserError if it misses the target by more than
    REACH_TOL relative (ill-conditioned slots). Then checks it again in the dtype it is returned
    in: if that dtype's rounding alone puts Q more than REACH_TOL away (small |target| in float32),
    warns with FloatFloorWarning, giving the error reached and the float floor (module doc)."""
    check_slot_shapes(w1, b1, w2)
    t = _check_target(target)
    if activation not in Q_ACTIVATIONS:
        raise UserError(
            f"activation {activation!r} has no linear symmetry to move along, so Q cannot be set;"
            f" use one of: {', '.join(Q_ACTIVATIONS)}"
        )
    f64 = [None if p is None else p.to(torch.float64) for p in (w1, b1, w2)]
    if activation == "linear":
        moved = act(*f64, linear_q_move(*f64, t))
    else:
        moved = act(*f64, torch.diag(imbalance_scaling(*f64, t)))
    err = q_error(*moved, activation, t)
    if not err <= REACH_TOL:
        raise UserError(
            f"moving to Q = {t:g} is numerically unreachable for this slot (relative error"
            f" {err:.1e} > {REACH_TOL:g}); choose a target closer to the slot's current Q"
        )
    w1n, b1n, w2n = moved
    out = w1n.to(w1.dtype), None if b1 is None else b1n.to(b1.dtype), w2n.to(w2.dtype)
    if any(x is not None and x.dtype != torch.float64 for x in out):
        _warn_if_floored(*out, activation, t, stacklevel=3)
    return out


def _q_and_scale(
    w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, activation: str
) -> tuple[torch.Tensor, float]:
    """Q (float64, from the weights as given) and the size of the two terms that cancel in it."""
    w1a = augmented_first_layer(w1, b1).to(torch.float64)
    w2d = w2.to(torch.float64)
    if activation == "linear":
        return linear_q(w1a, None, w2d), float((w2d.T @ w2d).norm() + (w1a @ w1a.T).norm())
    a, b = w2d.square().sum(0), w1a.square().sum(1)
    return a - b, float((a + b).norm())


def q_error(
    w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, activation: str, target: float
) -> float:
    """Relative error of the slot's Q against `target` (Q = t I for linear, Q_i = t otherwise),
    computed in float64 from the weights exactly as stored: ||Q - want|| / ||want||, or, for
    t = 0, relative to the size of the two terms that cancel."""
    q, scale = _q_and_scale(w1, b1, w2, activation)
    want = (
        target * torch.eye(q.shape[0], dtype=torch.float64, device=q.device)
        if activation == "linear"
        else torch.full_like(q, target)
    )
    den = float(want.norm()) if target != 0 else scale
    return float((q - want).norm()) / max(den, 1e-300)


def _warn_if_floored(
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    activation: str,
    t: float,
    stacklevel: int,
) -> float:
    """The error reached by the stored weights; a FloatFloorWarning with the numbers if it is
    over REACH_TOL (their dtype's rounding, since the float64 solution was within it)."""
    err = q_error(w1, b1, w2, activation, t)
    if err <= REACH_TOL:
        return err
    _, scale = _q_and_scale(w1, b1, w2, activation)
    h = w1.shape[0]
    dtype = max((x.dtype for x in (w1, b1, w2) if x is not None), key=lambda d: torch.finfo(d).eps)
    unit = torch.finfo(dtype).eps / 2  # the unit roundoff of the least precise of them
    floor = unit * scale  # about what rounding the weights to their dtype moves ||Q|| by
    warnings.warn(
        f"Q = {t:g} reached only within {err:.1e} relative (not {REACH_TOL:g}) in the slot's"
        f" {str(dtype).removeprefix('torch.')} weights: rounding them moves Q by about"
        f" {floor:.1e} ({unit:.1e} x the size {scale:.3g} of the two terms that cancel in Q);"
        f" targets with |Q| >= {floor / (REACH_TOL * math.sqrt(h)):.2g} reach {REACH_TOL:g},"
        " or use float64 weights",
        FloatFloorWarning,
        stacklevel=stacklevel,
    )
    return err


@torch.no_grad()
def set_slot_q(slot: nn.Module, target: float) -> float:
    """Move a slot (fc1, act, fc2, .activation) in place to Q = target (per neuron for relu and
    leaky_relu, target * I for linear); the network function is unchanged.

    Returns the relative error of Q measured (in float64) on the weights as stored in the slot.
    It is within REACH_TOL unless the slot's dtype cannot hold the target that closely (float32
    and |target| below about 0.1, see the module doc): then a FloatFloorWarning says so with the
    numbers, and the weights are still the float64 solution rounded to the slot's dtype, the
    closest the slot can store. An unreachable target is a UserError and leaves the slot as is."""
    for name in ("fc1", "fc2"):
        if not isinstance(getattr(slot, name, None), nn.Linear):
            raise UserError(f"a slot needs nn.Linear layers fc1 and fc2; {name} is missing")
    activation = str(getattr(slot, "activation", None))
    t = _check_target(target)
    b1 = slot.fc1.bias
    with warnings.catch_warnings():  # measured and warned below, on what the slot really stores
        warnings.simplefilter("ignore", FloatFloorWarning)
        w1n, b1n, w2n = move_to_q(slot.fc1.weight, b1, slot.fc2.weight, activation, t)
    slot.fc1.weight.copy_(w1n)
    if b1 is not None:
        b1.copy_(b1n)
    slot.fc2.weight.copy_(w2n)
    # stacklevel 4: past this function and torch.no_grad's wrapper, to the caller
    return _warn_if_floored(slot.fc1.weight, b1, slot.fc2.weight, activation, t, stacklevel=4)
