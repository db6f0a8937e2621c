"""Summaries over seeds, shared by the experiment, the studies and the figures.

Mean and sample standard deviation (``ddof=1``; 0 for a single value), as every table and
``results.json`` gives them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["sample_std", "mean_std", "format_mean_std"]


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
