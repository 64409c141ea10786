"""Threat models and the sweep plan: which (attack, threat model, eps) cells one run evaluates.

- transfer:  crafted on the base model, evaluated on every model (the attacker never sees the
             ensemble's members);
- white-box: crafted on each evaluated model itself; an ensemble through its fused
             log-mean-probability output (the adaptive attacker);
- black-box: query-only (Square) against each model, to expose gradient masking.

Gradient attacks run under transfer and white-box; the query-only attack (square) is the
black-box threat model, so `--threat black-box` adds square and `square` runs as black-box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from attacks.catalog import ATTACKS
from orbit.errors import UserError

THREATS = ("transfer", "white-box", "black-box")
BLACK_BOX_ATTACK = "square"

# The sanity check "a large eps drives accuracy near zero": white-box PGD at an L-inf budget
# of half the pixel range, with more steps than the sweep, must fool (almost) every input.
UNBOUNDED_EPS = 0.5
UNBOUNDED_STEPS = 20


def parse_threats(text: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError(f"--threat is empty; choose from: {', '.join(THREATS)}")
    unknown = [n for n in names if n not in THREATS]
    if unknown:
        raise UserError(f"unknown threat model {unknown[0]!r}; choose from: {', '.join(THREATS)}")
    return list(dict.fromkeys(names))


def parse_eps(text: str, flag: str = "--eps") -> list[float]:
    """'0,0.05,0.1' -> sorted unique budgets; negative, infinite or non-numeric values are user
    errors."""
    values: list[float] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            v = float(part)
        except ValueError:
            raise UserError(f"{flag}: {part!r} is not a number (e.g. {flag} 0,0.05,0.1)") from None
        if not math.isfinite(v) or v < 0:
            raise UserError(f"{flag}: budgets must be finite and >= 0 (pixel units), got {part}")
        values.append(v)
    if not values:
        raise UserError(f"{flag} is empty; give budgets such as 0,0.05,0.1")
    return sorted(set(values))


@dataclass(frozen=True)
class Cell:
    """One attack under one threat model; evaluated at every eps of its norm."""

    attack: str
    threat: str


NO_TRANSFER = (
    "it returns the clean input wherever it fails on the base model, so it has no transfer"
    " version (transfer needs a highest-loss point for every input)"
)


def plan(attacks: list[str], threats: list[str]) -> list[Cell]:
    """The (attack, threat) cells of the sweep, in a fixed order. Every requested attack gets at
    least one cell, or the request is a user error (nothing is silently dropped)."""
    attacks = list(attacks)
    threats = list(threats)
    if "black-box" in threats and BLACK_BOX_ATTACK not in attacks:
        attacks.append(BLACK_BOX_ATTACK)
    cells: list[Cell] = []
    for a in attacks:
        info = ATTACKS[a]
        if not info.gradient:
            cells.append(Cell(a, "black-box"))
            continue
        mine = [
            Cell(a, t) for t in threats if t == "white-box" or (t == "transfer" and info.transfer)
        ]
        if not mine:
            if "transfer" in threats:
                raise UserError(
                    f"{a} cannot run under --threat transfer: {NO_TRANSFER}; add white-box"
                )
            raise UserError(
                f"{a} is a gradient attack: it runs under --threat transfer or white-box, not"
                " black-box alone (the black-box attack is square)"
            )
        cells += mine
    return cells


def skipped_cells(attacks: list[str], threats: list[str]) -> list[dict[str, str]]:
    """The requested (attack, threat) pairs the sweep leaves out, and why (for the report)."""
    return [
        {"attack": a, "threat": "transfer", "reason": NO_TRANSFER}
        for a in attacks
        if "transfer" in threats and ATTACKS[a].gradient and not ATTACKS[a].transfer
    ]
