"""Interval estimates and detection scores for the report."""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (well behaved at 0 and 1, unlike Wald)."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, {n}], got {successes}")
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # At k = 0 and k = n the bounds are exactly 0 and 1; say so rather than round near them.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return (lo, hi)


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float | None:
    """AUROC of a score at ranking positives above negatives (ties count one half).

    None when either class is empty. Uses scikit-learn's roc_auc_score, which is independent
    of the order of the samples (so a sharded run gives the single-process number).
    """
    from sklearn.metrics import roc_auc_score

    negatives = np.asarray(negatives, dtype=np.float64).ravel()
    positives = np.asarray(positives, dtype=np.float64).ravel()
    if negatives.size == 0 or positives.size == 0:
        return None
    scores = np.concatenate([negatives, positives])
    labels = np.concatenate([np.zeros(negatives.size), np.ones(positives.size)])
    return float(roc_auc_score(labels, scores))


def auroc_interval(a: float, negatives: int, positives: int, z: float = Z95) -> tuple[float, float]:
    """95% interval of an AUROC from its standard error (Hanley & McNeil, 1982), clipped to
    [0, 1]; a normal approximation, adequate at the sample sizes of a report (tens or more)."""
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (positives - 1) * (q1 - a * a) + (negatives - 1) * (q2 - a * a)) / (
        positives * negatives
    )
    half = z * math.sqrt(max(var, 0.0))
    return (max(0.0, a - half), min(1.0, a + half))


def mean_interval(values: np.ndarray, z: float = Z95) -> list[float] | None:
    """95% normal interval of the mean of per-input values in [0, 1] (None when n < 2)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size < 2:
        return None
    half = z * float(values.std(ddof=1)) / math.sqrt(values.size)
    m = float(values.mean())
    return [max(0.0, m - half), min(1.0, m + half)]


def encode_mask(ids: np.ndarray, oks: np.ndarray) -> str:
    """Per-input correctness as hex: bit i (numpy packbits order) = input i stayed correct."""
    n = int(ids.max()) + 1 if ids.size else 0
    bits = np.zeros(n, dtype=bool)
    bits[np.asarray(ids).astype(np.int64)] = np.asarray(oks) > 0.5
    return np.packbits(bits).tobytes().hex()


def decode_mask(mask: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(mask), dtype=np.uint8))[:n].astype(bool)


def sign_test(b: int, c: int) -> float:
    """One-sided exact McNemar (sign) test: P(X >= b) for X ~ Binomial(b + c, 1/2).

    With b inputs that only attack A left correct and c that only attack B left correct, a
    small value says A is really weaker than B on these inputs, not just unlucky.
    """
    n = b + c
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(b, n + 1)) / 2**n
