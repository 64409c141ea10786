"""The symmetry ensemble: N members on the orbit of one trained model, fused into one module.

Building: anchors -> group elements -> one batched least-squares solve (symmetry/nonlinear.py);
members whose sigma(H0 g^T) is ill-conditioned are redrawn. Running: the trunk and H = fc1(z) are
computed once, then every member is one GEMM (H @ G_all^T), the activation and one bmm with U.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ensemble.anchors import member_anchors
from ensemble.base import FusedEnsemble
from orbit.errors import UserError
from symmetry.groups import check_algebra, group_elements, sample_generators
from symmetry.nonlinear import fold_second_layer, nonlinear_action, transform_first_layer
from training.models import OrbitClassifier, find_slot

# A member whose sigma(H0 g^T) has a larger condition number is redrawn. Measured (N = 64, k = 32,
# h = 64, trained cnn slots): the largest condition number was 860 (digits) and 430
# (Fashion-MNIST) for eps <= 1, with float32 anchor errors <= 1.2e-5; at eps = 5 it reached 2.3e4
# and 4.4e3, and the anchor error 2.4e-4, past the 1e-4 budget. 1e4 keeps a 10x margin over every
# member at eps <= 1. Far out, the float32 error also grows with the size of the move (even after
# redraws), which is why the build measures it on every member and warns past 1e-4.
MAX_CONDITION = 1e4
# With k > h (least squares, never exact) sigma(H0 g^T) is tall and measured at 1e4..1.5e5 on the
# same models (k = 80..256); its members are approximate anyway and their fidelity is reported, so
# only solves that are numerically meaningless are redrawn.
MAX_CONDITION_LSQ = 1e6
MAX_REDRAWS = 10  # per member; then the build stops with the numbers
# float32 budget for |member - base| logits on a member's own anchors (exact regime, k <= h). A
# well-conditioned sigma(H0 g^T) is not enough: far from the identity g itself is ill-conditioned
# (measured: eps = 20 gave ||g|| ~ 1e8 and float32 anchor errors of 3 to 12 with every condition
# number under 1e4), so each member's float32 error is measured and a member past it is redrawn.
ANCHOR_TOLERANCE = 1e-4
FEATURE_CHUNK = 1024


class SymmetryEnsemble(FusedEnsemble):
    """Base trunk and first layer shared; member n's head is act(H G_n^T) U_n + b2 (float32)."""

    method = "symmetry"

    def __init__(self, base: OrbitClassifier, g: torch.Tensor, u: torch.Tensor) -> None:
        super().__init__()
        slot = find_slot(base)
        n, h, _ = g.shape
        if u.shape[:2] != (n, h) or u.shape[2] != slot.fc2.out_features:
            raise ValueError(f"U has shape {tuple(u.shape)}, expected ({n}, {h}, classes)")
        self.spec = base.spec
        self.normalize = copy.deepcopy(base.normalize)
        self.trunk = copy.deepcopy(base.trunk)
        self.fc1 = copy.deepcopy(slot.fc1)
        self.act = copy.deepcopy(slot.act)
        self.register_buffer("g_flat", g.detach().to(torch.float32).reshape(n * h, h).clone())
        # U stored transposed [N, C, h]: members' logits come out as [N, C, B], the layout in
        # which both the bmm and the softmax over classes vectorise over the batch (measured
        # 1.6x base instead of 2.2x at N = 64, batch 256, with the [N, B, C] layout).
        self.register_buffer("u_t", u.detach().to(torch.float32).transpose(1, 2).contiguous())
        self.register_buffer("b2", slot.fc2.bias.detach().to(torch.float32).clone())
        self.eval()

    @property
    def num_members(self) -> int:
        return int(self.u_t.shape[0])

    @property
    def hidden(self) -> int:
        return int(self.u_t.shape[2])

    @property
    def g(self) -> torch.Tensor:
        """G [N, h, h] (float32), the members' group elements."""
        return self.g_flat.reshape(self.num_members, self.hidden, self.hidden)

    @property
    def u(self) -> torch.Tensor:
        """U [N, h, C] (float32) = Pi W2^T, the members' folded second layers."""
        return self.u_t.transpose(1, 2)

    def member_logits_ncb(self, x: torch.Tensor) -> torch.Tensor:
        """Members' logits as [N, C, B]: trunk and H once, one GEMM for all G_n, one bmm."""
        return self._head_ncb(self.trunk(self.normalize(x)))

    def _head_ncb(self, z: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(z)  # [B, h]
        # G_all H^T [N*h, B] is already [N, h, B] in memory: no transpose of the big activation
        # (measured 0.73 ms instead of 1.12 ms at N = 64, batch 64; bit-identical results).
        a = self.act(torch.matmul(self.g_flat, hidden.T))
        a = a.reshape(self.num_members, self.hidden, -1)  # [N, h, B]
        return torch.matmul(self.u_t, a) + self.b2.unsqueeze(-1)

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.member_logits_ncb(x).transpose(1, 2)  # [N, B, C]

    def member_logits_from_features(self, z: torch.Tensor) -> torch.Tensor:
        """[N, B, C] from the trunk's output z (shared with the base model it was built from)."""
        return self._head_ncb(z).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """log of the mean member probability [B, C] (as FusedEnsemble.forward, other layout)."""
        log_p = torch.log_softmax(self.member_logits_ncb(x), dim=1)
        return (torch.logsumexp(log_p, dim=0) - math.log(self.num_members)).transpose(0, 1)


def materialize_member(base: OrbitClassifier, g: torch.Tensor, u: torch.Tensor) -> OrbitClassifier:
    """Member as a stand-alone model: W1' = g W1, b1' = g b1, W2' = U^T (= W2 Pi^T)."""
    model = copy.deepcopy(base)
    slot = find_slot(model)
    w1, b1 = transform_first_layer(g.unsqueeze(0), slot.fc1.weight.detach(), slot.fc1.bias.detach())
    with torch.no_grad():
        slot.fc1.weight.copy_(w1[0].to(torch.float32))
        slot.fc1.bias.copy_(b1[0].to(torch.float32))
        slot.fc2.weight.copy_(u.detach().T.to(torch.float32))
    return model.eval()


@dataclass
class SymmetryBuild:
    """What the builder found, per member (leading dimension N)."""

    ensemble: SymmetryEnsemble
    g: torch.Tensor  # [N, h, h] float64
    u: torch.Tensor  # [N, h, C] float64
    anchors: torch.Tensor  # [N, k] int64 indices into the training split
    condition: torch.Tensor  # [N] float64
    residual: torch.Tensor  # [N] float64, max |A Pi - A0| in float64
    anchor_error: torch.Tensor  # [N] float64, max |member - base| logits on its anchors, float32
    redraws: torch.Tensor  # [N] int64, how many times each member's T was redrawn
    distance: torch.Tensor  # [N] float64, head-parameter distance to the base
    warnings: list[str]
    max_condition: float  # the redraw threshold that was applied


@torch.no_grad()
def slot_inputs(model: OrbitClassifier, x: torch.Tensor) -> torch.Tensor:
    """z = model.features(x) for many inputs, in chunks (eval mode, no graph)."""
    return torch.cat([model.features(c) for c in x.split(FEATURE_CHUNK)])


@torch.no_grad()
def fused_anchor_errors(
    ensemble: SymmetryEnsemble, slot: nn.Module, z: torch.Tensor, inverse: torch.Tensor
) -> torch.Tensor:
    """Per member max |member - base| logits on its own anchors, in float32, computed exactly
    as the fused module computes them (the same function certifies the build in fidelity.json).

    z [U, d]: the slot inputs of the unique anchors; inverse [N, k]: member n's anchors in z.
    """
    chunks = z.split(FEATURE_CHUNK)
    base = torch.cat([slot(c) for c in chunks])  # [U, C]
    members = torch.cat([ensemble.member_logits_from_features(c) for c in chunks], dim=1)
    rows = members[torch.arange(inverse.shape[0]).unsqueeze(1), inverse]  # [N, k, C]
    return (rows - base[inverse]).abs().amax(dim=(1, 2)).to(torch.float64)


def head_distance(
    g: torch.Tensor, u: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """Per member || (g W1, g b1, U^T) - (W1, b1, W2) ||_F over the head's parameters."""
    w1d, b1d = w1.detach().to(torch.float64), b1.detach().to(torch.float64)
    w1n, b1n = transform_first_layer(g, w1d, b1d)
    sq = (w1n - w1d).square().sum(dim=(1, 2)) + (b1n - b1d).square().sum(dim=1)
    sq = sq + (u.transpose(1, 2) - w2.detach().to(torch.float64)).square().sum(dim=(1, 2))
    return sq.sqrt()


def _check_build_args(members: int, eps: float, k: int, hidden: int, algebra: str) -> list[str]:
    if members <= 0:
        raise UserError(f"--members must be positive, got {members}")
    if not (eps > 0 and math.isfinite(eps)):
        raise UserError(f"--eps must be a positive number, got {eps}")
    check_algebra(algebra)
    notes = []
    if k > hidden:
        notes.append(
            f"--anchors {k} > hidden width {hidden}: members are a least-squares APPROXIMATE"
            " symmetry (not exact on their anchors); see fidelity.json for how far they are"
        )
    return notes


def build_symmetry(
    base: OrbitClassifier,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    *,
    members: int,
    eps: float,
    anchors: int,
    algebra: str = "gl",
    seed: int = 0,
    max_condition: float | None = None,
    max_redraws: int = MAX_REDRAWS,
) -> SymmetryBuild:
    """Build N symmetry members of `base`, each exact on its own k training anchors (k <= h).

    max_condition defaults to MAX_CONDITION (k <= h) or MAX_CONDITION_LSQ (k > h).
    """
    slot = find_slot(base)
    base.eval()
    h = slot.fc1.out_features
    notes = _check_build_args(members, eps, anchors, h, algebra)
    if max_condition is None:
        max_condition = MAX_CONDITION if anchors <= h else MAX_CONDITION_LSQ
    exact = anchors <= h
    idx = member_anchors(train_y, anchors, members, seed)  # [N, k]
    uniq, inverse = torch.unique(idx, return_inverse=True)
    z32 = slot_inputs(base, train_x[uniq])
    z = z32.to(torch.float64)
    w1 = slot.fc1.weight.detach().to(torch.float64)
    b1 = slot.fc1.bias.detach().to(torch.float64)
    w2 = slot.fc2.weight.detach().to(torch.float64)
    h0 = (z @ w1.T + b1)[inverse]  # [N, k, h]

    g = torch.empty(members, h, h, dtype=torch.float64)
    u = torch.empty(members, h, slot.fc2.out_features, dtype=torch.float64)
    condition = torch.empty(members, dtype=torch.float64)
    residual = torch.empty(members, dtype=torch.float64)
    error = torch.empty(members, dtype=torch.float64)
    rank = torch.empty(members, dtype=torch.int64)
    dead = torch.empty(members, dtype=torch.int64)
    redraws = torch.zeros(members, dtype=torch.int64)
    pending = torch.arange(members)
    with torch.no_grad():
        while True:
            t = sample_generators(algebra, h, pending.tolist(), seed, redraws[pending].tolist())
            gp = group_elements(t, eps)
            try:
                solve = nonlinear_action(h0[pending], gp, slot.act)
            except torch.linalg.LinAlgError as e:
                raise UserError(
                    f"the least-squares solve failed at --eps {eps:g} ({str(e).splitlines()[0]});"
                    " use a smaller --eps"
                ) from None
            up = fold_second_layer(solve.pi, w2)
            g[pending], u[pending] = gp, up
            # In the least-squares regime (k > h) dead units only shrink the solved subspace.
            used = solve.condition if exact else solve.kept_condition
            condition[pending], residual[pending] = used, solve.residual
            rank[pending], dead[pending] = solve.rank, solve.dead_units
            # Every member as the fused module will run it (float32, all N at once).
            trial = SymmetryEnsemble(base, g, u)
            error[pending] = fused_anchor_errors(trial, slot, z32, inverse)[pending]
            bad = ~torch.isfinite(used) | (used > max_condition)
            if exact:
                bad |= error[pending] > ANCHOR_TOLERANCE
            pending = pending[bad]
            if len(pending) == 0:
                break
            if int(redraws[pending].max()) >= max_redraws:
                raise UserError(
                    _failure_message(
                        pending,
                        condition,
                        error,
                        rank,
                        dead,
                        anchors,
                        h,
                        slot,
                        eps,
                        max_condition,
                        max_redraws,
                    )  # fmt: skip
                )
            redraws[pending] += 1
    distance = head_distance(g, u, slot.fc1.weight, slot.fc1.bias, slot.fc2.weight)
    if int(redraws.sum()) > 0:
        what = f"condition number exceeded {max_condition:.0e}"
        if exact:
            what += f" or float32 anchor error exceeded {ANCHOR_TOLERANCE:.0e}"
        notes.append(f"redrew {int((redraws > 0).sum())} of {members} members whose {what}")
    if not exact and int(dead.max()) > 0:
        notes.append(
            f"{int((dead > 0).sum())} of {members} members have units that are zero on all their"
            f" anchors (up to {int(dead.max())} of {h}); their least-squares fit uses the rest"
        )
    for note in notes:
        warnings.warn(note, stacklevel=2)
    ensemble = trial  # built from the final g and u: no member changed after it
    return SymmetryBuild(
        ensemble, g, u, idx, condition, residual, error, redraws, distance, notes, max_condition
    )


def _failure_message(
    pending: torch.Tensor,
    condition: torch.Tensor,
    error: torch.Tensor,
    rank: torch.Tensor,
    dead: torch.Tensor,
    k: int,
    h: int,
    slot: nn.Module,
    eps: float,
    max_condition: float,
    max_redraws: int,
) -> str:
    n = int(pending[0])
    cond = float(condition[n])
    full = min(k, h)
    head = f"{len(pending)} member(s) could not be built after {max_redraws} redraws; member {n}:"
    if k <= h and int(rank[n]) < full:
        what = (
            f"{slot.activation}(H0 g^T) is rank-deficient (rank {int(rank[n])} < {full},"
            f" {int(dead[n])} of {h} units zero on all its anchors)"
        )
    elif math.isfinite(cond) and cond > max_condition:
        what = f"{slot.activation}(H0 g^T) has condition number {cond:.3g} > {max_condition:.0e}"
    else:
        return (
            f"{head} float32 logits differ from the base by {float(error[n]):.2e} >"
            f" {ANCHOR_TOLERANCE:.0e} on its anchors (g is too far from the identity at"
            f" --eps {eps:g}); use a smaller --eps"
        )
    return (
        f"{head} {what}; use fewer anchors (--anchors {max(1, full // 2)}), another --eps, or a"
        " model with a smooth activation"
    )
