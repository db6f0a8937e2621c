"""Does the ReLU network's rescaling symmetry speed a mean-field fit's approach to its optimum?

For a hidden ReLU unit ``j`` of layer ``l``, multiplying the means and widths of its incoming
weights and bias by ``c > 0`` and those of its outgoing weights (column ``j`` of layer
``l + 1``) by ``1 / c`` leaves the distribution of the network's output unchanged: under local
reparameterisation the unit's pre-activation becomes ``c a`` with the same noise, ``relu(c a) =
c relu(a)``, and the next layer reads ``c relu(a) / c``. The expected log-likelihood is
therefore exactly invariant and only ``KL(q || p)`` moves. Under a ``N(0, s^2)`` prior the KL
of the unit's ``n_in`` incoming and ``n_out`` outgoing weights is, up to a constant,
``f(u) = (u S_in + S_out / u) / 2 + (n_out - n_in) log(u) / 2`` with ``u = c^2``,
``S = sum (mu^2 + sigma^2) / s^2``, which is convex in ``log u`` and least at::

    u* = ((n_in - n_out) + sqrt((n_in - n_out)^2 + 4 S_in S_out)) / (2 S_in)

:func:`rescale` sets every hidden unit to its ``u*``, layer by layer (the units of one layer
touch disjoint parameters, so they move together), for ``sweeps`` sweeps: an exact ascent step
of the ELBO along directions that Adam sees only through the KL's small gradient.

The bench fits the same posterior twice from the same seed, at fixed rates and no verdict
(``--lr`` for the means, three times that for the widths, the uniform KL schedule), one arm
plain and one with :func:`rescale` after every epoch, and scores both every ``--every`` epochs
with ``converge.py``'s evaluator (fixed-noise ELBO, common random numbers, off the clock).
Problems: ``small`` (task A's first 2,000 images, 784-32-5, minibatches of 200) and ``b1`` (the
first 265 training images of task B, 1 % of it, 784-400-400-5, one full batch)::

    python benchmarks/rescaling.py --problem small --epochs 1000 --lr 3e-3 --out figs/rescaling-small.json
    python benchmarks/rescaling.py --problem b1 --epochs 2000 --lr 1e-2 --out figs/rescaling-b1.json

``--checkpoint PATH`` instead reports what one :func:`rescale` gains on a stored fit (a train
checkpoint of ``python -m pyro_bbt.transfer``, its current posterior and the start of its
running continuation), under the N(0, 1) prior.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import positive_int  # noqa: E402
from converge import PROBLEMS, Evaluator, load_problem  # noqa: E402

from pyro_bbt.data import Task, load_task  # noqa: E402
from pyro_bbt.files import atomic_write_text  # noqa: E402
from pyro_bbt.fitting import new_posterior  # noqa: E402
from pyro_bbt.inference import TrainConfig, train  # noqa: E402
from pyro_bbt.priors import GaussianPrior  # noqa: E402


def _softplus_inverse(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


def _unconstrained(params: dict[str, torch.Tensor], site: str) -> tuple[torch.Tensor, torch.Tensor]:
    return params[f"locs.{site}_unconstrained"], params[f"scales.{site}_unconstrained"]


@torch.no_grad()
def rescale(guide, num_layers: int, prior_scale: float = 1.0, sweeps: int = 3) -> float:
    """Move every hidden unit of the ``meanfield`` guide (widths stored through softplus) to the
    rescaling ``u*`` of the module docstring under a ``N(0, prior_scale^2)`` prior, ``sweeps``
    times over the layers; return the KL it removed (nats)."""
    params = {name: p.data for name, p in guide.named_parameters()}
    variance = prior_scale**2
    removed = 0.0
    for _ in range(sweeps):
        for layer in range(num_layers - 1):
            loc_w, raw_w = _unconstrained(params, f"layers.{layer}.weight")
            loc_b, raw_b = _unconstrained(params, f"layers.{layer}.bias")
            loc_next, raw_next = _unconstrained(params, f"layers.{layer + 1}.weight")
            sd_w, sd_b, sd_next = F.softplus(raw_w), F.softplus(raw_b), F.softplus(raw_next)
            s_in = ((loc_w**2 + sd_w**2).sum(1) + loc_b**2 + sd_b**2) / variance
            s_out = (loc_next**2 + sd_next**2).sum(0) / variance
            n_in, n_out = loc_w.shape[1] + 1, loc_next.shape[0]
            u = ((n_in - n_out) + torch.sqrt((n_in - n_out) ** 2 + 4 * s_in * s_out)) / (2 * s_in)
            removed += float((0.5 * (s_in + s_out) - 0.5 * (u * s_in + s_out / u) + 0.5 * (n_in - n_out) * torch.log(u)).sum())
            c = u.sqrt()
            loc_w.mul_(c[:, None])
            loc_b.mul_(c)
            raw_w.copy_(_softplus_inverse(sd_w * c[:, None]))
            raw_b.copy_(_softplus_inverse(sd_b * c))
            loc_next.div_(c[None, :])
            raw_next.copy_(_softplus_inverse(sd_next / c[None, :]))
    return removed


def _problem(name: str):
    """``(train split, hidden sizes, minibatch)`` of ``small`` or ``b1``."""
    if name == "small":
        return load_problem(PROBLEMS["small"], preset="paper-v5").train, (32,), 200
    split = load_task(Task(digits=(5, 6, 7, 8, 9), name="B")).train.subset(265)
    return split, (400, 400), 265


def run_arm(name: str, rescaled: bool, seed: int, epochs: int, lr: float, every: int) -> dict:
    """One arm: the fit at fixed rates, :func:`rescale` after each epoch where ``rescaled``, the
    evaluator's ELBO and KL every ``every`` epochs."""
    split, hidden, batch = _problem(name)
    pyro.clear_param_store()
    model, guide = new_posterior((split.x.shape[1], *hidden, 5), GaussianPrior(1.0), "meanfield", init_scale=0.01, seed=seed)
    evaluator, points, removed, clock = Evaluator(8, 0), [], 0.0, time.perf_counter()

    def on_epoch(diagnostics) -> None:
        nonlocal removed
        if rescaled:
            removed += rescale(guide, len(model.layers))
        if diagnostics.epoch % every == 0:
            score = evaluator.score(model, guide, split)
            points.append({"epoch": diagnostics.epoch, "elbo": score.elbo, "kl": score.kl, "kl_removed": removed,
                           "seconds": time.perf_counter() - clock})

    config = TrainConfig(epochs=epochs, batch_size=batch, lr=lr, scale_lr=3 * lr, kl_schedule="uniform", seed=seed, eval_samples=0,
                         progress=False, verdict=None, warn_unconverged=False)
    train(model, guide, split, config, on_epoch=on_epoch)
    return {"arm": "rescaled" if rescaled else "plain", "points": points}


def checkpoint_gain(path: Path) -> dict:
    """What one :func:`rescale` removes from the KL of a stored fit's current posterior and of
    its running continuation's start."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    state = payload["data"]["train_state"]
    result = {"epoch": state["epoch"]}
    for key, guide_state in (("current", state["guide_state"]), ("continuation_start", (state.get("continuation") or {}).get("guide_state"))):
        if guide_state is None:
            continue
        sizes = [guide_state["locs.layers.0.weight_unconstrained"].shape[1]]
        layer = 0
        while f"locs.layers.{layer}.weight_unconstrained" in guide_state:
            sizes.append(guide_state[f"locs.layers.{layer}.weight_unconstrained"].shape[0])
            layer += 1
        model, guide = new_posterior(tuple(sizes), GaussianPrior(1.0), "meanfield", init_scale=0.01, seed=0)
        guide.load_state_dict(guide_state)
        result[key] = {"epoch": state["continuation"]["start_epoch"] if key == "continuation_start" else state["epoch"],
                       "kl_removed": rescale(guide, len(model.layers))}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", choices=("small", "b1"), default="small")
    parser.add_argument("--epochs", type=positive_int, default=1000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--every", type=positive_int, help="score every N epochs (default: epochs / 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, help="report what one rescaling removes from a stored fit instead")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.checkpoint is not None:
        record = checkpoint_gain(args.checkpoint)
    else:
        every = args.every or max(1, args.epochs // 20)
        arms = [run_arm(args.problem, rescaled, args.seed, args.epochs, args.lr, every) for rescaled in (False, True)]
        record = {"problem": args.problem, "epochs": args.epochs, "lr": args.lr, "seed": args.seed, "arms": arms}
        for a, b in zip(arms[0]["points"], arms[1]["points"]):
            print(f"epoch {a['epoch']:>6}: ELBO plain {a['elbo']:>12,.1f}  rescaled {b['elbo']:>12,.1f}   KL {a['kl']:>10,.1f} / {b['kl']:>10,.1f}")
    print(json.dumps({k: v for k, v in record.items() if k != "arms"}))
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
