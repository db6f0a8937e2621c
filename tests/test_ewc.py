"""Tests for the deterministic EWC baseline (tiny nets, synthetic data)."""

import math

import pytest
import torch
import torch.nn.functional as F

from pyro_bbt.ewc import (
    MLP,
    DeterministicTrainConfig,
    EarlyStopping,
    EWCPenalty,
    accuracy,
    fisher_diagonal,
    sample_model_labels,
    train_deterministic,
)

SIZES = (20, 16, 3)


def _linear_task(seed: int, n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Linearly separable 3-class problem: y = argmax(x @ W) for a random W."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, SIZES[0], generator=g)
    w = torch.randn(SIZES[0], SIZES[-1], generator=g)
    return x, (x @ w).argmax(dim=1)


def _net(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(SIZES)


def _trained_task_a() -> tuple[MLP, torch.Tensor, torch.Tensor]:
    x, y = _linear_task(seed=1)
    net = _net()
    train_deterministic(net, x, y, DeterministicTrainConfig(lr=1e-2, batch_size=64, steps=150))
    return net, x, y


@pytest.fixture(scope="module")
def task_a():
    return _trained_task_a()


def _unit_fisher(net: MLP) -> dict[str, torch.Tensor]:
    return {k: torch.ones_like(p) for k, p in net.named_parameters()}


# --------------------------------------------------------------------------- #
# MLP
# --------------------------------------------------------------------------- #


def test_mlp_shapes_and_flattening() -> None:
    net = _net()
    assert net(torch.randn(7, 20)).shape == (7, 3)
    assert net(torch.randn(7, 4, 5)).shape == (7, 3)  # flattened to 20
    assert [k for k, _ in net.named_parameters()] == [
        "layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias",
    ]
    with pytest.raises(ValueError):
        MLP([20])


# --------------------------------------------------------------------------- #
# EWC penalty
# --------------------------------------------------------------------------- #


def test_penalty_zero_at_anchor_positive_away() -> None:
    net = _net()
    pen = EWCPenalty(net, _unit_fisher(net), ewc_lambda=3.0)
    assert pen(net).item() == 0.0
    with torch.no_grad():
        net.layers[0].weight[0, 0] += 0.5
    # (λ/2) * F * δ² = 1.5 * 1 * 0.25
    assert pen(net).item() == pytest.approx(0.375)
    assert pen.distance(net).item() == pytest.approx(0.25)


def test_penalty_linear_in_lambda() -> None:
    net = _net()
    fisher = {k: torch.rand_like(p) for k, p in net.named_parameters()}
    pens = {lam: EWCPenalty(net, fisher, lam) for lam in (0.0, 1.0, 2.5, 10.0)}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    base = pens[1.0](net).item()
    assert base > 0
    assert pens[0.0](net).item() == 0.0
    assert pens[2.5](net).item() == pytest.approx(2.5 * base, rel=1e-5)
    assert pens[10.0](net).item() == pytest.approx(10.0 * base, rel=1e-5)


def test_penalty_anchors_are_detached_copies() -> None:
    net = _net()
    pen = EWCPenalty(net, _unit_fisher(net), 1.0)
    with torch.no_grad():
        net.layers[1].bias.add_(1.0)
    assert pen(net).item() == pytest.approx(0.5 * 3)  # 3 bias entries moved by 1
    assert not pen.anchors["layers.1.bias"].requires_grad


@pytest.mark.parametrize("lam", [-1.0, math.nan, math.inf])
def test_penalty_rejects_bad_lambda(lam: float) -> None:
    net = _net()
    with pytest.raises(ValueError, match="ewc_lambda"):
        EWCPenalty(net, _unit_fisher(net), lam)


def test_penalty_rejects_mismatched_fisher_keys() -> None:
    net = _net()
    fisher = _unit_fisher(net)
    del fisher["layers.1.bias"]
    fisher["bogus"] = torch.ones(1)
    with pytest.raises(ValueError, match=r"layers\.1\.bias.*bogus"):
        EWCPenalty(net, fisher, 1.0)
    bad_shape = _unit_fisher(net)
    bad_shape["layers.0.bias"] = torch.ones(3)
    with pytest.raises(ValueError, match="shape"):
        EWCPenalty(net, bad_shape, 1.0)


# --------------------------------------------------------------------------- #
# Fisher
# --------------------------------------------------------------------------- #


def _slow_fisher(net: MLP, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reference: explicit per-example backward passes, F = mean of squared grads."""
    out = {k: torch.zeros_like(p) for k, p in net.named_parameters()}
    for i in range(x.shape[0]):
        net.zero_grad()
        F.log_softmax(net(x[i : i + 1]), dim=-1)[0, labels[i]].backward()
        for k, p in net.named_parameters():
            out[k] += p.grad.pow(2)
    return {k: v / x.shape[0] for k, v in out.items()}


def test_fisher_matches_per_example_loop() -> None:
    net = _net(3)
    x = torch.randn(5, 20, generator=torch.Generator().manual_seed(7))
    fast = fisher_diagonal(net, x, batch_size=2, generator=torch.Generator().manual_seed(11))
    labels = sample_model_labels(net, x, generator=torch.Generator().manual_seed(11))
    slow = _slow_fisher(net, x, labels)
    assert set(fast) == {k for k, _ in net.named_parameters()}
    for k, p in net.named_parameters():
        assert fast[k].shape == p.shape
        assert not fast[k].requires_grad
        assert (fast[k] >= 0).all()
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-5, atol=1e-7)


def test_fisher_reproducible_and_uses_sampled_labels() -> None:
    net = _net(3)
    x = torch.randn(64, 20, generator=torch.Generator().manual_seed(7))
    f1 = fisher_diagonal(net, x, generator=torch.Generator().manual_seed(0))
    f2 = fisher_diagonal(net, x, batch_size=5, generator=torch.Generator().manual_seed(0))
    for k in f1:
        torch.testing.assert_close(f1[k], f2[k])
    # an untrained net predicts ~uniformly, so sampled labels vary across classes
    labels = sample_model_labels(net, x, generator=torch.Generator().manual_seed(0))
    assert labels.unique().numel() == 3


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #


def test_training_beats_chance(task_a) -> None:
    net, x, y = task_a
    assert accuracy(net, x, y) > 0.85  # chance is ~1/3


def test_train_step_count_epochs_and_determinism() -> None:
    x, y = _linear_task(seed=2, n=50)
    epochs: list[int] = []
    cfg = DeterministicTrainConfig(lr=1e-2, batch_size=16, steps=10, seed=5)
    # 50 examples / 16 -> 4 batches per pass: passes end at steps 4 and 8, then stop mid-pass
    losses = train_deterministic(_net(), x, y, cfg, on_epoch=lambda e, n: epochs.append(e))
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses)
    assert epochs == [0, 1, 2]
    assert train_deterministic(_net(), x, y, cfg) == losses
    with pytest.raises(ValueError, match="steps"):
        DeterministicTrainConfig(steps=-1)


def test_early_stopping_keeps_the_best_epoch_and_stops_after_patience_epochs_without_a_better_one() -> None:
    """Labels that flip between train and validation: the validation accuracy peaks early, so a
    patience of 2 stops 2 epochs after the best, with the best epoch's weights; the accuracy per
    epoch, measured by hand along the same run, says which epoch that is."""
    x, y = _linear_task(seed=3, n=120)
    xv, yv = _linear_task(seed=4, n=60)
    yv = (yv + 1) % SIZES[-1]  # a validation set the training moves away from
    cfg = DeterministicTrainConfig(lr=5e-2, batch_size=40, steps=40 * 3, seed=1, patience=2)
    seen: list[float] = []
    stopping: list[EarlyStopping] = []
    net = _net()
    losses = train_deterministic(net, x, y, cfg, on_epoch=lambda e, n: seen.append(accuracy(n, xv, yv)), val=(xv, yv), stopping=stopping)
    (report,) = stopping
    best = max(range(len(seen)), key=lambda e: (seen[e], -e)) + 1  # the first best, 1-based
    assert report.stopped_by == "patience" and report.best_epoch == best and report.epochs == best + 2 == len(seen)
    assert len(losses) == 3 * report.epochs  # 120 / 40: three steps per epoch
    assert report.best_val_accuracy == seen[best - 1] == accuracy(net, xv, yv)  # the best epoch's weights are back
    capped: list[EarlyStopping] = []
    train_deterministic(_net(), x, y, DeterministicTrainConfig(lr=5e-2, batch_size=40, steps=6, seed=1, patience=50), val=(xv, yv), stopping=capped)
    assert capped[0].stopped_by == "cap" and capped[0].epochs == 2
    with pytest.raises(ValueError, match="early stopping needs both config.patience and val"):
        train_deterministic(_net(), x, y, cfg)
    with pytest.raises(ValueError, match="patience must be an integer >= 1 or None, got 0"):
        DeterministicTrainConfig(patience=0)


def test_accuracy_restores_mode() -> None:
    net = _net()
    net.train()
    x, y = _linear_task(seed=2, n=10)
    acc = accuracy(net, x, y, batch_size=3)
    assert 0.0 <= acc <= 1.0 and net.training


def _train_task_b(task_a, lam: float) -> tuple[MLP, EWCPenalty]:
    net_a, xa, _ = task_a
    fisher = fisher_diagonal(net_a, xa, generator=torch.Generator().manual_seed(0))
    net = MLP(SIZES)
    net.load_state_dict(net_a.state_dict())
    penalty = EWCPenalty(net, fisher, lam)
    xb, yb = _linear_task(seed=2)  # same input distribution, conflicting labels
    train_deterministic(
        net, xb, yb, DeterministicTrainConfig(lr=1e-2, batch_size=64, steps=150, seed=1), penalty
    )
    return net, penalty


def test_ewc_reduces_forgetting(task_a) -> None:
    _, xa, ya = task_a
    net_free, pen_free = _train_task_b(task_a, 0.0)
    net_ewc, pen_ewc = _train_task_b(task_a, 1000.0)
    d_free = pen_free.distance(net_free).item()
    d_ewc = pen_ewc.distance(net_ewc).item()
    acc_free = accuracy(net_free, xa, ya)
    acc_ewc = accuracy(net_ewc, xa, ya)
    assert d_ewc < d_free
    assert acc_ewc > acc_free + 0.3, (acc_ewc, acc_free)
