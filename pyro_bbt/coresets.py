"""Coresets for variational continual learning (Nguyen et al. 2018, section 4).

A coreset is a few training points per task kept aside: they are removed from the task's
training data, so the propagated posterior ``q~_t`` is fitted on the rest, and at test time a
*copy* of ``q~_t`` is fitted on the coresets (under ``q~_t`` as its prior) and predicts; the copy
is not propagated. The selection rules are those of the original code
(nvcuong/variational-continual-learning, ``ddm/alg/coreset.py``):

* ``random``: ``size`` points drawn uniformly without replacement;
* ``kcenter``: greedy farthest-point selection in pixel space (Euclidean), starting at the
  split's first image: ``c_0 = 0``, ``c_k = argmax_i min_{j<k} |x_i - x_{c_j}|`` (the first
  maximum on ties).

Both return the coreset and the rest of the split in its original order.
"""

from __future__ import annotations

import torch

from .data import Split

__all__ = ["CORESETS", "select_coreset", "random_coreset", "kcenter_indices"]

CORESETS = ("none", "random", "kcenter")


def _check(split: Split, size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"coreset size must be an integer >= 1, got {size!r}")
    if size >= len(split):
        raise ValueError(f"a coreset of {size} points leaves no training data from a task of {len(split)} images; "
                         "use a smaller --coreset-size or more --limit-train")


def kcenter_indices(x: torch.Tensor, size: int) -> list[int]:
    """The ``size`` indices of greedy k-centre selection over the rows of ``x`` from row 0."""
    x = x.reshape(len(x), -1).double()
    chosen = [0]
    dists = torch.linalg.vector_norm(x - x[0], dim=1)
    for _ in range(1, size):
        current = int(torch.argmax(dists))
        chosen.append(current)
        dists = torch.minimum(dists, torch.linalg.vector_norm(x - x[current], dim=1))
    return chosen


def random_coreset(n: int, size: int, generator: torch.Generator) -> list[int]:
    """``size`` of the indices ``0 .. n-1``, uniformly without replacement."""
    return torch.randperm(n, generator=generator)[:size].tolist()


def select_coreset(split: Split, method: str, size: int, seed: int) -> tuple[Split, Split]:
    """``(coreset, rest)`` of ``split`` by ``method`` (``random``: drawn with a generator
    seeded by ``seed``; ``kcenter``: deterministic). ``ValueError`` for an unknown method or a
    size that is not in ``1 .. len(split) - 1``."""
    if method not in CORESETS[1:]:
        raise ValueError(f"unknown coreset {method!r}; allowed: {', '.join(CORESETS[1:])}")
    _check(split, size)
    if method == "random":
        chosen = random_coreset(len(split), size, torch.Generator().manual_seed(seed))
    else:
        chosen = kcenter_indices(split.x, size)
    device = split.x.device
    keep = torch.ones(len(split), dtype=torch.bool, device=device)
    index = torch.tensor(chosen, dtype=torch.long, device=device)
    keep[index] = False
    return Split(split.x[index], split.y[index]), Split(split.x[keep], split.y[keep])
