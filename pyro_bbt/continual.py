"""Continual-learning metrics computed from an accuracy matrix.

Throughout, ``R`` is a ``T x T`` accuracy matrix (numpy array or nested lists)
with ``R[i, j]`` = test accuracy on task ``j`` after training on task ``i``
(0-based, ``T >= 2``, entries in ``[0, 1]``).

Definitions follow Lopez-Paz & Ranzato (2017, "Gradient Episodic Memory") for
average accuracy / backward transfer / forward transfer and Chaudhry et al.
(2018, "Riemannian Walk") for forgetting, matching the conventions used by
Avalanche:

* average accuracy   ``ACC  = 1/T * sum_j R[T-1, j]``
* backward transfer  ``BWT  = 1/(T-1) * sum_{i<T-1} (R[T-1, i] - R[i, i])``
* forward transfer   ``FWT  = 1/(T-1) * sum_{i>=1} (R[i-1, i] - b[i])``
* forgetting         ``f_j  = max_{l<T-1} R[l, j] - R[T-1, j]`` for ``j < T-1``
* average forgetting ``F    = 1/(T-1) * sum_{j<T-1} f_j``
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence, Union

import numpy as np

ArrayLike = Union[np.ndarray, Sequence[Sequence[float]]]
VectorLike = Union[np.ndarray, Sequence[float]]

__all__ = [
    "ContinualSummary",
    "average_accuracy",
    "average_forgetting",
    "backward_transfer",
    "forgetting",
    "forward_transfer",
    "summarize",
    "validate_accuracy_matrix",
]


def validate_accuracy_matrix(R: ArrayLike) -> np.ndarray:
    """Check ``R`` is a valid ``T x T`` accuracy matrix and return it as float64.

    Raises:
        ValueError: if ``R`` is not 2-D square, if ``T < 2``, if it contains
            NaN, or if any entry lies outside ``[0, 1]``. The message names the
            offending shape or value.
    """
    try:
        arr = np.asarray(R, dtype=np.float64)
    except (TypeError, ValueError) as exc:  # ragged nested lists, non-numbers
        raise ValueError(f"accuracy matrix is not a numeric rectangular array: {exc}") from exc
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"accuracy matrix must be square T x T, got shape {arr.shape}")
    if arr.shape[0] < 2:
        raise ValueError(f"accuracy matrix needs T >= 2 tasks, got shape {arr.shape}")
    if np.isnan(arr).any():
        i, j = np.argwhere(np.isnan(arr))[0]
        raise ValueError(f"accuracy matrix contains NaN at R[{i}, {j}]")
    bad = (arr < 0.0) | (arr > 1.0)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(
            f"accuracy matrix entries must lie in [0, 1], got R[{i}, {j}] = {arr[i, j]!r}"
        )
    return arr


def average_accuracy(R: ArrayLike) -> float:
    """Final average accuracy ``ACC = 1/T * sum_{j=0}^{T-1} R[T-1, j]``."""
    arr = validate_accuracy_matrix(R)
    return float(arr[-1].mean())


def backward_transfer(R: ArrayLike) -> float:
    """Backward transfer ``BWT = 1/(T-1) * sum_{i=0}^{T-2} (R[T-1, i] - R[i, i])``.

    Negative values mean forgetting: accuracy on old tasks dropped after
    learning later ones.
    """
    arr = validate_accuracy_matrix(R)
    T = arr.shape[0]
    return float(np.mean(arr[T - 1, : T - 1] - np.diag(arr)[: T - 1]))


def _validate_baseline(baseline: VectorLike, T: int) -> np.ndarray:
    b = np.asarray(baseline, dtype=np.float64)
    if b.shape != (T,):
        raise ValueError(f"baseline must have shape ({T},), got shape {b.shape}")
    if np.isnan(b).any():
        raise ValueError("baseline contains NaN")
    if ((b < 0.0) | (b > 1.0)).any():
        raise ValueError(f"baseline entries must lie in [0, 1], got {b.tolist()}")
    return b


def forward_transfer(R: ArrayLike, baseline: VectorLike) -> float:
    """Forward transfer ``FWT = 1/(T-1) * sum_{i=1}^{T-1} (R[i-1, i] - b[i])``.

    ``R[i-1, i]`` is the accuracy on task ``i`` *before* training on it.
    ``baseline[i]`` (``b[i]``) is the reference accuracy on task ``i``; the
    caller decides what it is: GEM uses a model at random initialisation,
    other works use a model trained from scratch on task ``i``. ``baseline[0]``
    is required for shape consistency but unused.
    """
    arr = validate_accuracy_matrix(R)
    T = arr.shape[0]
    b = _validate_baseline(baseline, T)
    before = np.array([arr[i - 1, i] for i in range(1, T)])
    return float(np.mean(before - b[1:]))


def forgetting(R: ArrayLike) -> np.ndarray:
    """Per-task forgetting ``f_j = max_{l<T-1} R[l, j] - R[T-1, j]`` for ``j < T-1``.

    Returns an array of length ``T-1``. Entries may be negative when the final
    accuracy exceeds every earlier one (e.g. positive backward transfer).
    Note that rows ``l < j`` (before task ``j`` was trained) are included in
    the max, exactly as in the stated definition.
    """
    arr = validate_accuracy_matrix(R)
    T = arr.shape[0]
    best_before_last = arr[: T - 1, : T - 1].max(axis=0)
    return best_before_last - arr[T - 1, : T - 1]


def average_forgetting(R: ArrayLike) -> float:
    """Average forgetting ``F = 1/(T-1) * sum_{j<T-1} f_j`` (see :func:`forgetting`)."""
    return float(np.mean(forgetting(R)))


@dataclass
class ContinualSummary:
    """All continual-learning metrics of one accuracy matrix.

    ``forward_transfer`` is ``None`` when no baseline was supplied.
    """

    average_accuracy: float
    backward_transfer: float
    forward_transfer: float | None
    average_forgetting: float
    forgetting: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, float | None | list[float]]:
        """Plain-python dict (JSON-serialisable)."""
        d = asdict(self)
        d["forgetting"] = [float(v) for v in self.forgetting]
        return d


def summarize(R: ArrayLike, baseline: VectorLike | None = None) -> ContinualSummary:
    """Compute every metric of ``R``; forward transfer only if ``baseline`` is given."""
    arr = validate_accuracy_matrix(R)
    f = forgetting(arr)
    return ContinualSummary(
        average_accuracy=average_accuracy(arr),
        backward_transfer=backward_transfer(arr),
        forward_transfer=None if baseline is None else forward_transfer(arr, baseline),
        average_forgetting=float(np.mean(f)),
        forgetting=[float(v) for v in f],
    )
