"""Per-minibatch weights ``pi_i`` on the KL term of the ELBO.

Blundell et al. (2015) give minibatch ``i`` (1-based, of ``M`` per epoch) the loss
``pi_i KL(q || p) - sum_{n in batch} log p(y_n | x_n, w)``; with ``sum_i pi_i = 1`` an epoch's
losses add up to the full-data negative ELBO. :func:`pyro_bbt.inference.train` uses Pyro's
scaling of the likelihood instead (the data plate multiplies a minibatch's by ``N/B = M``), so
it minimises ``M`` times Blundell's loss,
``-(N/B) sum_{n in batch} log p(y_n | x_n, w) + M pi_i KL(q || p)``: the KL weight ``M pi_i``
averages to 1 over an epoch, and the ``uniform`` schedule is Pyro's ``Trace_ELBO``.

* ``blundell``: ``pi_i = 2^(M-i) / (2^M - 1)`` (Blundell et al. 2015): heavy KL weight on the first
  minibatches, vanishing later. Computed as ``2^-i / (1 - 2^-M)`` so that it stays finite for
  ``M`` in the thousands (``2^M`` itself overflows a double at ``M = 1024``).
* ``uniform``: ``pi_i = 1/M`` (a KL weight of 1 on every step).
* ``warmup``: ``pi_i = beta / M`` with ``beta`` rising linearly from 0 to 1 over ``warmup_epochs``
  (Sonderby et al. 2016), then 1.
* ``none``: ``pi_i = 0`` (maximum expected likelihood; the posterior is not pulled to the prior).
"""

from __future__ import annotations

import math

__all__ = ["KL_SCHEDULES", "kl_weight", "validate_schedule"]

KL_SCHEDULES = ("blundell", "uniform", "warmup", "none")


def validate_schedule(schedule: str) -> str:
    if schedule not in KL_SCHEDULES:
        raise ValueError(f"unknown KL schedule {schedule!r}; allowed: {', '.join(KL_SCHEDULES)}")
    return schedule


def kl_weight(schedule: str, batch_index: int, num_batches: int, epoch: int = 0, warmup_epochs: float = 5.0) -> float:
    """The KL weight ``pi_i`` for minibatch ``batch_index`` (1-based) of ``num_batches`` in ``epoch`` (0-based)."""
    validate_schedule(schedule)
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches!r}")
    if not 1 <= batch_index <= num_batches:
        raise ValueError(f"batch_index must lie in 1..{num_batches}, got {batch_index!r}")
    if schedule == "blundell":
        # 2^(M-i) / (2^M - 1) = 2^-i / (1 - 2^-M); ldexp underflows gracefully to 0.0.
        return math.ldexp(1.0, -batch_index) / -math.expm1(-num_batches * math.log(2.0))
    if schedule == "uniform":
        return 1.0 / num_batches
    if schedule == "warmup":
        if not warmup_epochs > 0:
            raise ValueError(f"warmup_epochs must be > 0, got {warmup_epochs!r}")
        progress = (epoch + (batch_index - 1) / num_batches) / warmup_epochs
        return min(1.0, progress) / num_batches
    return 0.0
