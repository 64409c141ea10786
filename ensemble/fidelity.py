"""The fidelity certificate (fidelity.json): how exactly members reproduce the base where they must,
and how they and the ensemble behave on the train, validation and test splits.

Measured with the fused float32 module itself, i.e. exactly what attacks and export will run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ensemble.base import FusedEnsemble, summarize
from training.datasets import DatasetSplits, Split
from training.models import find_slot

FORMAT = "orbit.fidelity/1"
BATCH = 512


def _stats(values: torch.Tensor) -> dict[str, float]:
    v = values.to(torch.float64)
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


@torch.no_grad()
def anchor_errors(
    ensemble: FusedEnsemble, base: nn.Module, x: torch.Tensor, anchors: torch.Tensor
) -> torch.Tensor:
    """Per member max |member logits - base logits| on that member's own anchors [N, k].

    A symmetry ensemble on the base's own trunk is measured by the very computation its build
    redrew members by (ensemble.symmetry.fused_anchor_errors), so the two never disagree."""
    n = anchors.shape[0]
    uniq, inverse = torch.unique(anchors, return_inverse=True)
    from ensemble.symmetry import SymmetryEnsemble, fused_anchor_errors, slot_inputs

    if isinstance(ensemble, SymmetryEnsemble) and _shares_trunk(ensemble, base):
        return fused_anchor_errors(ensemble, find_slot(base), slot_inputs(base, x[uniq]), inverse)
    xa = x[uniq]
    base_logits = torch.cat([base(c) for c in xa.split(BATCH)])  # [U, C]
    member_logits = torch.cat([ensemble.member_logits(c) for c in xa.split(BATCH)], dim=1)
    rows = member_logits[torch.arange(n).unsqueeze(1), inverse]  # [N, k, C]: own anchors only
    errors = (rows - base_logits[inverse]).abs().amax(dim=(1, 2)).to(torch.float64)
    return errors


def _shares_trunk(ensemble: FusedEnsemble, base: nn.Module) -> bool:
    """True when the ensemble runs the base's own normalize + trunk (same weights)."""
    if not hasattr(ensemble, "member_logits_from_features") or not hasattr(base, "features"):
        return False
    for name in ("normalize", "trunk"):
        mine, theirs = getattr(ensemble, name, None), getattr(base, name, None)
        if mine is None or theirs is None:
            return False
        a, b = mine.state_dict(), theirs.state_dict()
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            return False
    return True


@torch.no_grad()
def split_fidelity(ensemble: FusedEnsemble, base: nn.Module, split: Split) -> dict[str, Any]:
    """Accuracy of base, members and ensemble, and agreement with the base, on one split.

    When the ensemble shares the base's trunk, it is run once per batch for both.
    """
    n = ensemble.num_members
    shared = _shares_trunk(ensemble, base)
    base_ok = ens_ok = ens_agree = 0
    member_ok = torch.zeros(n, dtype=torch.int64)
    member_agree = torch.zeros(n, dtype=torch.int64)
    agreement_sum = mi_sum = 0.0
    for x, y in zip(split.x.split(BATCH), split.y.split(BATCH), strict=True):
        if shared:
            z = base.features(x)
            base_pred = base.slot(z).argmax(-1)
            logits = ensemble.member_logits_from_features(z)
        else:
            base_pred = base(x).argmax(-1)
            logits = ensemble.member_logits(x)
        pred = summarize(logits)
        votes = logits.argmax(-1)  # [N, B]
        base_ok += int((base_pred == y).sum())
        ens_ok += int((pred.label == y).sum())
        ens_agree += int((pred.label == base_pred).sum())
        member_ok += (votes == y).sum(dim=1)
        member_agree += (votes == base_pred).sum(dim=1)
        agreement_sum += float(pred.agreement.sum())
        mi_sum += float(pred.mutual_info.sum())
    total = len(split)
    member_acc = member_ok.double() / total
    member_agr = member_agree.double() / total
    return {
        "samples": total,
        "base_accuracy": base_ok / total,
        "ensemble_accuracy": ens_ok / total,
        "ensemble_agreement_with_base": ens_agree / total,
        "member_accuracy": _stats(member_acc),
        "member_agreement_with_base": _stats(member_agr),
        "mean_vote_agreement": agreement_sum / total,
        "mean_mutual_info": mi_sum / total,
        "per_member_accuracy": [round(float(v), 6) for v in member_acc],
        "per_member_agreement_with_base": [round(float(v), 6) for v in member_agr],
    }


def fidelity_report(
    ensemble: FusedEnsemble,
    base: nn.Module,
    splits: DatasetSplits,
    *,
    anchors: torch.Tensor | None = None,
    condition: torch.Tensor | None = None,
    distance: torch.Tensor | None = None,
    redraws: torch.Tensor | None = None,
    exact_expected: bool = False,
    on_split: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """fidelity.json's content. Per-member quantities that do not apply to a method are null."""
    ensemble.eval()
    base.eval()
    n = ensemble.num_members
    errors = anchor_errors(ensemble, base, splits.train.x, anchors) if anchors is not None else None
    per_member = []
    for i in range(n):
        per_member.append(
            {
                "member": i,
                "anchor_max_abs_logit_diff": float(errors[i]) if errors is not None else None,
                "condition_number": (
                    _finite_or_none(float(condition[i])) if condition is not None else None
                ),
                "parameter_distance": float(distance[i]) if distance is not None else None,
                "redraws": int(redraws[i]) if redraws is not None else None,
            }
        )
    report: dict[str, Any] = {
        "format": FORMAT,
        "method": ensemble.method,
        "members": n,
        "anchors": {
            "per_member": int(anchors.shape[1]) if anchors is not None else None,
            "exact_expected": exact_expected,
            "max_abs_logit_diff": float(errors.max()) if errors is not None else None,
        },
        "condition_number": _stats(condition) if condition is not None else None,
        "parameter_distance": _stats(distance) if distance is not None else None,
        "splits": {},
        "per_member": per_member,
    }
    for name in ("train", "val", "test"):
        report["splits"][name] = split_fidelity(ensemble, base, getattr(splits, name))
        if on_split is not None:
            on_split(name)
    return report


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The headline numbers of a fidelity report, as (label, value) rows for the CLI."""
    rows = [("method", report["method"]), ("members", str(report["members"]))]
    anchors = report["anchors"]
    if anchors["max_abs_logit_diff"] is not None:
        rows.append(
            (
                f"max |logit diff| on anchors (k={anchors['per_member']})",
                f"{anchors['max_abs_logit_diff']:.2e}",
            )
        )
    if report["condition_number"] is not None:
        c = report["condition_number"]
        rows.append(("condition number (mean / max)", f"{c['mean']:.3g} / {c['max']:.3g}"))
    if report["parameter_distance"] is not None:
        d = report["parameter_distance"]
        rows.append(("parameter distance (mean)", f"{d['mean']:.4g}"))
    for name, s in report["splits"].items():
        rows.append(
            (
                f"{name} accuracy: base / ensemble / members (mean)",
                f"{s['base_accuracy']:.4f} / {s['ensemble_accuracy']:.4f} /"
                f" {s['member_accuracy']['mean']:.4f}",
            )
        )
        rows.append(
            (
                f"{name} agreement with base: ensemble / members (mean, min)",
                f"{s['ensemble_agreement_with_base']:.4f} /"
                f" {s['member_agreement_with_base']['mean']:.4f},"
                f" {s['member_agreement_with_base']['min']:.4f}",
            )
        )
    return rows
