"""A line-by-line PyTorch port of VCL's published split-MNIST run, as a yardstick.

Nguyen et al. 2018's code (nvcuong/variational-continual-learning, ``ddm/run_split.py``,
``ddm/alg/vcl.py``, ``ddm/alg/cla_models_multihead.py``, ``ddm/alg/utils.py``), without coreset:

* data: the five pairs (0/1, 2/3, 4/5, 6/7, 8/9), all 60,000 training images (no validation
  split), pixels ``x / 255``; label 0 for the even digit;
* network 784-256-256, one 2-way head per task, ReLU;
* task 1's means (biases included) from a max-likelihood net (truncated-normal(0.1) init,
  Adam 1e-3, 120 full-batch steps of the mean cross-entropy); log-variances start at -6;
* each task: ``cost = KL(q || p) / N - mean log-likelihood`` with 10 weight samples shared across
  the batch (one ``(K, d_in, d_out)`` draw per layer), 120 full-batch Adam steps at 1e-3 on the
  means and log-variances, Adam new for every task;
* the prior of task ``t`` is ``q_{t-1}``; a new head: means truncated-normal(0.1), log-variance -6,
  prior N(0, 1);
* test: 100 weight samples, softmax averaged, each task through its head.

It does not use pyro_bbt's model, guide or training loop: it is the reference that
``--preset vcl`` is compared with, task by task (docs/split-mnist.md, "VCL's published number").

    python benchmarks/vcl_reference.py --seed 0 --out runs/vcl-reference-s0.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pyro_bbt.data import Task, load_task

PAIRS = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))


def truncnorm(*shape: int) -> torch.Tensor:
    """TensorFlow's ``truncated_normal(stddev=0.1)``: N(0, 0.1^2) redrawn beyond 2 sd."""
    return torch.nn.init.trunc_normal_(torch.empty(shape), std=0.1, a=-0.2, b=0.2)


def load(pair: tuple[int, int], limit: int | None) -> tuple[torch.Tensor, ...]:
    data = load_task(Task(digits=pair, scaling="unit", val_fraction=0.0))
    train, test = data.train, data.test
    if limit is not None:
        train, test = train.subset(limit), test.subset(limit)
    return train.x.reshape(len(train), -1), train.y, test.x.reshape(len(test), -1), test.y


def ml_net(x: torch.Tensor, y: torch.Tensor, hidden: list[int], epochs: int, lr: float) -> list[torch.Tensor]:
    """VCL's ``Vanilla_NN`` on task 1: ``[W_0, b_0, ..., W_head, b_head]`` after ``epochs``
    full-batch Adam steps on the mean cross-entropy."""
    sizes = [x.shape[1], *hidden, 2]
    params = []
    for din, dout in zip(sizes[:-1], sizes[1:]):
        params += [truncnorm(din, dout).requires_grad_(), truncnorm(dout).requires_grad_()]
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(epochs):
        h = x
        for i in range(0, len(params) - 2, 2):
            h = torch.relu(h @ params[i] + params[i + 1])
        loss = F.cross_entropy(h @ params[-2] + params[-1], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [p.detach() for p in params]


class MFVI:
    """Means ``m`` and log-variances ``v`` of the shared layers ``[W_0, b_0, W_1, b_1]`` and of
    every head ``[W, b]``, and the prior ``(m0, var0)`` of each."""

    def __init__(self, shared_m, shared_v, heads_m, heads_v, prior_shared, prior_heads):
        self.shared_m = [t.clone().requires_grad_() for t in shared_m]
        self.shared_v = [t.clone().requires_grad_() for t in shared_v]
        self.heads_m = [[t.clone().requires_grad_() for t in h] for h in heads_m]
        self.heads_v = [[t.clone().requires_grad_() for t in h] for h in heads_v]
        self.prior_shared = prior_shared  # [(m0, var0)] per shared tensor
        self.prior_heads = prior_heads  # [[(m0, var0), (m0, var0)]] per head

    def parameters(self):
        yield from self.shared_m + self.shared_v
        for h in self.heads_m + self.heads_v:
            yield from h

    def logits(self, x: torch.Tensor, head: int, samples: int) -> torch.Tensor:
        """``(K, N, 2)``: one weight draw per layer and sample, shared across the batch."""
        act = x.expand(samples, *x.shape)
        layers = [(self.shared_m[i], self.shared_v[i], self.shared_m[i + 1], self.shared_v[i + 1]) for i in range(0, len(self.shared_m), 2)]
        layers.append((self.heads_m[head][0], self.heads_v[head][0], self.heads_m[head][1], self.heads_v[head][1]))
        for index, (wm, wv, bm, bv) in enumerate(layers):
            w = wm + torch.randn(samples, *wm.shape) * torch.exp(0.5 * wv)
            b = bm + torch.randn(samples, 1, bm.shape[0]) * torch.exp(0.5 * bv)
            act = torch.baddbmm(b, act, w)
            if index < len(layers) - 1:
                act = torch.relu(act)
        return act

    def kl(self) -> torch.Tensor:
        pairs = list(zip(self.shared_m, self.shared_v, self.prior_shared))
        for hm, hv, hp in zip(self.heads_m, self.heads_v, self.prior_heads):
            pairs += list(zip(hm, hv, hp))
        total = torch.zeros(())
        for m, v, (m0, var0) in pairs:
            total = total + (-0.5 * m.numel() + 0.5 * (torch.log(var0) - v).sum() + 0.5 * ((torch.exp(v) + (m0 - m) ** 2) / var0).sum())
        return total

    def train(self, x, y, head: int, epochs: int, lr: float, samples: int) -> None:
        optimizer = torch.optim.Adam(list(self.parameters()), lr=lr)
        for _ in range(epochs):
            logits = self.logits(x, head, samples)
            nll = F.cross_entropy(logits.reshape(-1, 2), y.repeat(samples))
            loss = self.kl() / len(x) + nll
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def accuracy(self, x, y, head: int, samples: int) -> float:
        probs = torch.softmax(self.logits(x, head, samples), -1).mean(0)
        return (probs.argmax(-1) == y).float().mean().item()

    def posterior(self):
        detach = lambda ts: [t.detach().clone() for t in ts]  # noqa: E731
        return detach(self.shared_m), detach(self.shared_v), [detach(h) for h in self.heads_m], [detach(h) for h in self.heads_v]


def run(seed: int, hidden: list[int], epochs: int, lr: float, train_samples: int, test_samples: int, init_logvar: float,
        limit: int | None) -> dict:
    torch.manual_seed(seed)
    data = [load(pair, limit) for pair in PAIRS]
    R, sigmas, seconds = [], [], []
    for t, (x, y, _, _) in enumerate(data):
        start = time.perf_counter()
        if t == 0:
            ml = ml_net(x, y, hidden, epochs, lr)
            shared_m, heads_m = ml[:-2], [ml[-2:]]
            shared_v = [torch.full_like(p, init_logvar) for p in shared_m]
            heads_v = [[torch.full_like(p, init_logvar) for p in heads_m[0]]]
            prior_shared = [(torch.zeros(()), torch.ones(())) for _ in shared_m]
            prior_heads = [[(torch.zeros(()), torch.ones(()))] * 2]
        else:
            shared_m, shared_v, heads_m, heads_v = q.posterior()
            prior_shared = [(m, torch.exp(v)) for m, v in zip(shared_m, shared_v)]
            prior_heads = [[(m, torch.exp(v)) for m, v in zip(hm, hv)] for hm, hv in zip(heads_m, heads_v)] + [[(torch.zeros(()), torch.ones(()))] * 2]
            heads_m = heads_m + [[truncnorm(hidden[-1], 2), truncnorm(2)]]
            heads_v = heads_v + [[torch.full((hidden[-1], 2), init_logvar), torch.full((2,), init_logvar)]]
        q = MFVI(shared_m, shared_v, heads_m, heads_v, prior_shared, prior_heads)
        q.train(x, y, t, epochs, lr, train_samples)
        row = [q.accuracy(xt, yt, j, test_samples) for j, (_, _, xt, yt) in enumerate(data[: t + 1])]
        R.append(row)
        sigmas.append([float(torch.exp(0.5 * v).median()) for v in q.posterior()[1][0::2]])
        seconds.append(time.perf_counter() - start)
        print(f"task {t}: {' '.join(f'{a:.4f}' for a in row)}  mean {sum(row) / len(row):.4f}  median sigma {sigmas[-1]}  {seconds[-1]:.0f} s", flush=True)
    return {"seed": seed, "R": R, "acc": sum(R[-1]) / len(R[-1]), "median_sigma": sigmas, "seconds": seconds,
            "settings": {"hidden": hidden, "epochs": epochs, "lr": lr, "train_samples": train_samples, "test_samples": test_samples,
                         "init_logvar": init_logvar, "limit": limit, "threads": torch.get_num_threads()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=lambda s: [int(t) for t in s.split(",")], default=[256, 256])
    p.add_argument("--epochs", type=int, default=120)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-samples", type=int, default=10)
    p.add_argument("--test-samples", type=int, default=100)
    p.add_argument("--init-logvar", type=float, default=-6.0)
    p.add_argument("--limit", type=int, help="images per task (smoke runs)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    result = run(args.seed, args.hidden, args.epochs, args.lr, args.train_samples, args.test_samples, args.init_logvar, args.limit)
    print(f"ACC {result['acc']:.4f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
