"""Deterministic baseline: Elastic Weight Consolidation (Kirkpatrick et al., 2017).

After training task A to parameters ``θ*``, EWC trains task B on

    L_B(θ) + (λ/2) Σ_k F_k (θ_k − θ*_k)²,

where ``F`` is the diagonal of the Fisher information of the task-A model,

    F_k = E_x E_{ŷ ~ p(·|x, θ*)} [ (∂/∂θ_k log p(ŷ | x, θ*))² ],

estimated with the data inputs ``x`` of task A and labels ``ŷ`` *sampled from
the model's own predictive distribution* (the "true" Fisher, not the empirical
Fisher that plugs in the observed labels).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = [
    "MLP",
    "DeterministicTrainConfig",
    "EarlyStopping",
    "EWCPenalty",
    "EWCPenaltySum",
    "accuracy",
    "fisher_diagonal",
    "sample_model_labels",
    "train_deterministic",
]


class MLP(nn.Module):
    """Plain deterministic MLP ``sizes[0] -> ... -> sizes[-1]`` returning logits.

    ReLU between hidden layers, no activation on the output. Inputs with more
    than two dimensions (e.g. ``(N, 1, 28, 28)`` images) are flattened to
    ``(N, -1)``. Parameters are named ``layers.{i}.weight`` / ``layers.{i}.bias``.
    """

    def __init__(self, sizes: Sequence[int]) -> None:
        super().__init__()
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or any(s < 1 for s in sizes):
            raise ValueError(f"sizes must hold >= 2 positive layer widths, got {sizes}")
        self.sizes: tuple[int, ...] = tuple(sizes)
        self.layers = nn.ModuleList(
            nn.Linear(n_in, n_out) for n_in, n_out in zip(sizes[:-1], sizes[1:])
        )

    def forward(self, x: Tensor) -> Tensor:
        h = x.flatten(1) if x.dim() > 2 else x
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = torch.relu(h)
        return h


# --------------------------------------------------------------------------- #
# Fisher information
# --------------------------------------------------------------------------- #


@torch.no_grad()
def _predict_logits(net: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    return torch.cat([net(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def sample_model_labels(
    net: nn.Module,
    x: Tensor,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
) -> Tensor:
    """Draw ``ŷ_n ~ Categorical(logits=net(x_n))`` for every row of ``x``.

    All labels are drawn with a single ``torch.multinomial`` call, so the result
    depends only on ``net``, ``x`` and the generator state (not on
    ``batch_size``). This is the exact draw :func:`fisher_diagonal` makes,
    which lets callers reproduce its labels with an identically seeded
    generator. Sampling happens on the generator's device (CPU if ``None``).
    """
    probs = torch.softmax(_predict_logits(net, x, batch_size).float(), dim=-1)
    device = generator.device if generator is not None else torch.device("cpu")
    labels = torch.multinomial(probs.to(device), 1, generator=generator).squeeze(1)
    return labels.to(x.device)


def _validate_batch_size(batch_size: int) -> None:
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def fisher_diagonal(
    net: nn.Module,
    x: Tensor,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Diagonal Fisher information of ``net`` at its current parameters.

    ``F_k = 1/N Σ_n (∂/∂θ_k log p(ŷ_n | x_n, θ))²`` with ``ŷ_n`` sampled from
    the model's predictive ``Categorical(logits=net(x_n))`` (see
    :func:`sample_model_labels`; the true labels are never used). Per-example
    gradients are computed with ``torch.func`` (``functional_call`` + ``vmap``
    + ``grad``) in chunks of ``batch_size`` examples.

    Returns a dict keyed like ``net.named_parameters()`` (trainable parameters
    only) with detached tensors of the parameters' shapes.
    """
    _validate_batch_size(batch_size)
    n = x.shape[0]
    if n == 0:
        raise ValueError("fisher_diagonal needs at least one example, got x with 0 rows")
    labels = sample_model_labels(net, x, generator, batch_size)

    params = {k: p.detach() for k, p in net.named_parameters() if p.requires_grad}
    buffers = {k: b.detach() for k, b in net.named_buffers()}

    def log_lik(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        logits = functional_call(net, (p, buffers), (xi.unsqueeze(0),))
        log_probs = torch.log_softmax(logits, dim=-1)[0]
        return log_probs.gather(0, yi.reshape(1)).squeeze(0)

    per_example_grad = vmap(grad(log_lik), in_dims=(None, 0, 0))
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    for start in range(0, n, batch_size):
        grads = per_example_grad(params, x[start : start + batch_size], labels[start : start + batch_size])
        for k, g in grads.items():
            fisher[k] += g.pow(2).sum(dim=0)
    return {k: f / n for k, f in fisher.items()}


# --------------------------------------------------------------------------- #
# EWC penalty
# --------------------------------------------------------------------------- #


class EWCPenalty:
    """Quadratic EWC penalty ``(λ/2) Σ_k F_k (θ_k − θ*_k)²``.

    The anchors ``θ*`` are detached copies of ``net``'s parameters at
    construction time (i.e. after task A); ``fisher`` is typically
    :func:`fisher_diagonal` evaluated there.

    Raises:
        ValueError: if ``ewc_lambda`` is not finite and ``>= 0``, if the Fisher
            keys differ from the net's trainable parameter names (the
            difference is listed), or if a Fisher shape mismatches.
    """

    def __init__(self, net: nn.Module, fisher: Mapping[str, Tensor], ewc_lambda: float) -> None:
        lam = float(ewc_lambda)
        if not math.isfinite(lam) or lam < 0.0:
            raise ValueError(f"ewc_lambda must be finite and >= 0, got {ewc_lambda!r}")
        params = {k: p for k, p in net.named_parameters() if p.requires_grad}
        _check_keys(set(params), set(fisher))
        for k, p in params.items():
            if tuple(fisher[k].shape) != tuple(p.shape):
                raise ValueError(
                    f"fisher[{k!r}] has shape {tuple(fisher[k].shape)}, parameter has {tuple(p.shape)}"
                )
        self.ewc_lambda = lam
        self.anchors: dict[str, Tensor] = {k: p.detach().clone() for k, p in params.items()}
        self.fisher: dict[str, Tensor] = {
            k: fisher[k].detach().clone().to(p.device, p.dtype) for k, p in params.items()
        }

    def distance(self, net: nn.Module) -> Tensor:
        """Fisher-weighted squared distance ``Σ_k F_k (θ_k − θ*_k)²`` (differentiable)."""
        params = dict(net.named_parameters())
        _check_keys(set(k for k, p in params.items() if p.requires_grad), set(self.fisher))
        terms = [(self.fisher[k] * (params[k] - self.anchors[k]).pow(2)).sum() for k in self.fisher]
        return torch.stack(terms).sum()

    def __call__(self, net: nn.Module) -> Tensor:
        """Penalty ``(λ/2) Σ_k F_k (θ_k − θ*_k)²`` at ``net``'s current parameters."""
        return 0.5 * self.ewc_lambda * self.distance(net)


class EWCPenaltySum:
    """The penalties of several earlier tasks together (Kirkpatrick et al.'s form for a
    sequence): ``sum_s (λ_s/2) Σ_k F_{s,k} (θ_k − θ*_{s,k})²``, one :class:`EWCPenalty` per task
    ``s``, each with its own anchors and Fisher."""

    def __init__(self, penalties: Sequence[EWCPenalty]) -> None:
        if not penalties:
            raise ValueError("EWCPenaltySum needs at least one penalty")
        self.penalties = list(penalties)

    def __call__(self, net: nn.Module) -> Tensor:
        """The summed penalty at ``net``'s current parameters (differentiable)."""
        return torch.stack([penalty(net) for penalty in self.penalties]).sum()


def _check_keys(param_names: set[str], fisher_names: set[str]) -> None:
    if param_names != fisher_names:
        missing = sorted(param_names - fisher_names)
        extra = sorted(fisher_names - param_names)
        raise ValueError(
            "fisher keys must match the net's parameter names; "
            f"missing from fisher: {missing}, not parameters of net: {extra}"
        )


# --------------------------------------------------------------------------- #
# Training / evaluation
# --------------------------------------------------------------------------- #


@dataclass
class DeterministicTrainConfig:
    """Adam training settings; ``seed`` seeds only the minibatch shuffling. With ``patience``,
    ``steps`` is a cap and training stops early (see :func:`train_deterministic`)."""

    lr: float = 1e-3
    batch_size: int = 128
    steps: int = 1000
    seed: int = 0
    patience: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be finite and > 0, got {self.lr!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps!r}")
        if self.patience is not None and (isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1):
            raise ValueError(f"patience must be an integer >= 1 or None, got {self.patience!r}")


@dataclass
class EarlyStopping:
    """What early stopping did (:func:`train_deterministic` with ``val``): the epochs run, the
    best epoch (1-based; its weights are the net's) and its validation accuracy, and why it
    stopped: ``"patience"`` (that many epochs without a better one) or ``"cap"`` (``steps``)."""

    epochs: int
    best_epoch: int
    best_val_accuracy: float
    stopped_by: str

    def to_dict(self) -> dict:
        return asdict(self)


def _minibatches(n: int, batch_size: int, generator: torch.Generator):
    """Endless stream of ``(epoch, index_tensor, is_last_of_epoch)``.

    Each pass over the data uses a fresh permutation from ``generator``; the
    last minibatch of a pass may be smaller than ``batch_size``.
    """
    epoch = 0
    while True:
        perm = torch.randperm(n, generator=generator)
        starts = range(0, n, batch_size)
        for j, s in enumerate(starts):
            yield epoch, perm[s : s + batch_size], j == len(starts) - 1
        epoch += 1


def train_deterministic(
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    config: DeterministicTrainConfig,
    penalty: EWCPenalty | EWCPenaltySum | None = None,
    on_epoch: Callable[[int, nn.Module], None] | None = None,
    val: tuple[Tensor, Tensor] | None = None,
    stopping: list[EarlyStopping] | None = None,
) -> list[float]:
    """Train ``net`` with Adam on ``CE(net(x_b), y_b) [+ penalty(net)]``.

    Runs exactly ``config.steps`` optimisation steps on minibatches drawn
    without replacement from a ``torch.Generator`` seeded with ``config.seed``
    (reshuffled at every pass over the data). ``on_epoch(epoch, net)`` is called
    after every completed pass (``epoch`` = 0-based pass index) and once more at
    the end if training stops mid-pass (with the index of that partial pass).

    Early stopping, with ``config.patience`` and ``val = (x_val, y_val)``: after every pass the
    accuracy on ``val`` is measured; training stops once ``patience`` passes in a row bring no
    better one (or at ``config.steps``), and the net is given back the weights of its best pass
    (the first best on ties). What happened is appended to ``stopping`` (an
    :class:`EarlyStopping`).

    Returns the per-step total loss (cross-entropy plus penalty), one float per
    step run. The net is left in train mode.
    """
    if (config.patience is None) != (val is None):
        raise ValueError("early stopping needs both config.patience and val (or neither)")
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"x and y disagree on the number of examples: {n} vs {y.shape[0]}")
    if n == 0 and config.steps > 0:
        raise ValueError("cannot train on an empty data set")
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    epoch, end_of_epoch = 0, True
    batches = _minibatches(n, config.batch_size, gen)
    best: tuple[float, int, dict] | None = None  # (accuracy, 1-based epoch, weights) of the best pass so far
    stopped_by = "cap"
    for _ in range(config.steps):
        epoch, idx, end_of_epoch = next(batches)
        idx = idx.to(x.device)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        if penalty is not None:
            loss = loss + penalty(net)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if end_of_epoch and on_epoch is not None:
            on_epoch(epoch, net)
        if end_of_epoch and val is not None:
            val_accuracy = accuracy(net, *val)
            if best is None or val_accuracy > best[0]:
                best = (val_accuracy, epoch + 1, {k: v.detach().clone() for k, v in net.state_dict().items()})
            elif epoch + 1 - best[1] >= config.patience:
                stopped_by = "patience"
                break
    if config.steps > 0 and not end_of_epoch and on_epoch is not None:
        on_epoch(epoch, net)
    if val is not None and best is not None:
        net.load_state_dict(best[2])
        if stopping is not None:
            stopping.append(EarlyStopping(epochs=epoch + 1, best_epoch=best[1], best_val_accuracy=best[0], stopped_by=stopped_by))
    return losses



@torch.no_grad()
def accuracy(net: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy ``1/N Σ_n [argmax net(x_n) = y_n]`` in eval mode, without gradients.

    The net's previous train/eval mode is restored afterwards.
    """
    _validate_batch_size(batch_size)
    if x.shape[0] == 0:
        raise ValueError("accuracy needs at least one example")
    was_training = net.training
    net.eval()
    try:
        pred = _predict_logits(net, x, batch_size).argmax(dim=-1)
    finally:
        net.train(was_training)
    return float((pred == y.to(pred.device)).float().mean())
