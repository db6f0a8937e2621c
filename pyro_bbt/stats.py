"""Summaries over seeds, shared by the experiment, the studies and the figures.

Mean and sample standard deviation (``ddof=1``; 0 for a single value), as every table and
``results.json`` gives them; the exact sign test of paired differences, which assumes nothing about
their distribution (scratch's fits at 1 % of B end in one of two optima, so a t interval's normal
errors do not hold there).
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb

import numpy as np

__all__ = ["sample_std", "mean_std", "format_mean_std", "sign_test"]


def sample_std(values, axis=None):
    """Standard deviation over seeds with ``ddof=1`` (0 where there is one value), as the tables use."""
    array = np.asarray(values, dtype=float)
    n = array.size if axis is None else array.shape[axis]
    if n < 2:
        return np.zeros(()) if axis is None else np.zeros(np.delete(array.shape, axis))
    return array.std(axis=axis, ddof=1)


def mean_std(values: Sequence[float]) -> dict:
    """``{"mean", "std", "n"}`` of ``values`` (as ``results.json`` records them)."""
    return {"mean": float(np.mean(values)), "std": float(sample_std(values)), "n": len(values)}


def format_mean_std(values: Sequence[float | None], digits: int = 4) -> str:
    """``"mean ± std"`` of the values that are not ``None`` (``"—"`` when none is)."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    return f"{np.mean(values):.{digits}f} ± {sample_std(values):.{digits}f}"


def sign_test(differences: Sequence[float]) -> tuple[int, int, float]:
    """``(below, above, p)``: how many paired differences are below and above 0, and the exact
    two-sided sign test's p-value of "a difference is as likely below 0 as above" (differences of
    exactly 0 are dropped, as the test prescribes). With ``n = below + above`` and
    ``k = min(below, above)``, ``p = min(1, 2 sum_{i<=k} C(n, i) / 2^n)``; no differences: ``p = 1``.
    It needs no normality: with 10 seeds, 8 of one sign give p = 0.109, 9 give 0.021, 10 give 0.002."""
    below = sum(1 for d in differences if d < 0)
    above = sum(1 for d in differences if d > 0)
    n, k = below + above, min(below, above)
    p = min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return below, above, p
