"""Where does a running fit's KL sit, and which part of it does a continuation move?

A mean-field fit under ``N(0, sigma_0^2)`` switches most hidden units off. This bench reads a
B unit's train checkpoint (as ``verdict_draws.py`` does: a unit still running, inside a
continuation) and splits the KL of its posterior by hidden unit: unit ``j`` of hidden layer
``l`` is charged the KL of its incoming weights, its bias and its outgoing weights (the rows of
the unit's head only, for the output layer),

    K_lj = sum_i KL(q(w_lji) || p) + KL(q(b_lj) || p) + sum_k KL(q(w_(l+1)kj) || p),

``p = N(0, sigma_0^2)`` the base prior (the unit's own prior for scratch and finetune). A unit
is *quiet* when ``K_lj < --quiet-below`` nats (10 by default): far below the units that carry
the function (hundreds to thousands of nats), yet not at the prior. Then, with the fixed-noise
evaluator (common random numbers, ``--draws`` antithetic draws, :func:`pyro_bbt.fixed_noise.posterior_elbo`):

* **the continuation, attributed**: ``L(end) - L(start)`` from the continuation's start to the
  checkpoint's posterior, and the part of it that the quiet units' own parameters (incoming
  weights, bias, outgoing weights) account for: ``L(end) - L(end with the quiet units' parameters
  as at the start)``;
* **the gradient's signal**: for the quiet units' incoming weights and for the others', the share
  of the squared full-data gradient that two independent estimates agree on
  (:func:`signal_fraction`);
* **probes** on the checkpoint's posterior (and on the continuation's start), each one change scored against it (the ELBO, the KL,
  and the expected log-likelihood by difference): the quiet first-layer units' incoming widths
  set to ``sigma_0``; their incoming means set to 0; the second layer's weights from quiet units
  into quiet units set to the prior. A probe that raises the ELBO is a move the fit has not
  made; one that lowers it by thousands of nats shows the parameters carry the likelihood.

::

    python benchmarks/kl_census.py runs/cont10-scratch-s1 scratch-f0.1-s1 --out figs/kl-census-b10-s1.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import positive_int  # noqa: E402
from verdict_draws import open_unit, unit_parser  # noqa: E402

from pyro_bbt.elbo_gradient import elbo_gradient, read_posterior  # noqa: E402
from pyro_bbt.files import atomic_write_text  # noqa: E402
from pyro_bbt.fixed_noise import posterior_elbo  # noqa: E402
from pyro_bbt.rejudge import judged_unit  # noqa: E402

Posterior = dict[str, tuple[torch.Tensor, torch.Tensor]]


def kl_to(loc: torch.Tensor, scale: torch.Tensor, prior_std: float) -> torch.Tensor:
    """Elementwise ``KL(N(loc, scale^2) || N(0, prior_std^2))``."""
    ratio = (scale / prior_std) ** 2
    return 0.5 * (ratio + (loc / prior_std) ** 2 - 1.0 - torch.log(ratio))


def _out_rows(model, layer: int) -> slice:
    """The rows of layer ``layer + 1`` that read layer ``layer``'s units: the head's rows for the output layer."""
    last = layer + 1 == len(model.layers) - 1
    return model.output_rows if last and model.output_rows is not None else slice(None)


def total_kl(model, posterior: Posterior, prior_std: float) -> float:
    """The KL of every site, the output layer's rows of the unit's head only."""
    total = 0.0
    last = len(model.layers) - 1
    for name, (loc, scale) in posterior.items():
        if name.startswith(f"layers.{last}.") and model.output_rows is not None:
            loc, scale = loc[model.output_rows], scale[model.output_rows]
        total += float(kl_to(loc, scale, prior_std).sum())
    return total


def unit_kl(model, posterior: Posterior, prior_std: float) -> list[dict[str, torch.Tensor]]:
    """Per hidden layer, each unit's KL in three parts: ``"in"`` (incoming weights), ``"bias"``, ``"out"``."""
    out = []
    for layer in range(len(model.layers) - 1):
        rows = _out_rows(model, layer)
        loc, scale = posterior[f"layers.{layer + 1}.weight"]
        out.append({"in": kl_to(*posterior[f"layers.{layer}.weight"], prior_std).sum(1),
                    "bias": kl_to(*posterior[f"layers.{layer}.bias"], prior_std),
                    "out": kl_to(loc[rows], scale[rows], prior_std).sum(0)})
    return out


def quiet_units(parts: list[dict[str, torch.Tensor]], below: float) -> list[torch.Tensor]:
    """Per hidden layer, the mask of units whose whole KL is below ``below`` nats."""
    return [(p["in"] + p["bias"] + p["out"]) < below for p in parts]


def _copy(posterior: Posterior) -> Posterior:
    return {name: (loc.clone(), scale.clone()) for name, (loc, scale) in posterior.items()}


def with_units_from(posterior: Posterior, source: Posterior, masks: list[torch.Tensor]) -> Posterior:
    """``posterior`` with the masked units' incoming weights, biases and outgoing weights taken from ``source``."""
    out = _copy(posterior)
    for layer, mask in enumerate(masks):
        for name in (f"layers.{layer}.weight", f"layers.{layer}.bias"):
            for i in range(2):
                out[name][i][mask] = source[name][i][mask]
        for i in range(2):
            out[f"layers.{layer + 1}.weight"][i][:, mask] = source[f"layers.{layer + 1}.weight"][i][:, mask]
    return out


def probes(posterior: Posterior, masks: list[torch.Tensor], prior_std: float) -> dict[str, Posterior]:
    """The probes of the module docstring (the third only for a network with two hidden layers)."""
    quiet0 = masks[0]
    widths, means = _copy(posterior), _copy(posterior)
    widths["layers.0.weight"][1][quiet0] = prior_std
    means["layers.0.weight"][0][quiet0] = 0.0
    out = {"quiet first-layer units: incoming widths to the prior's": widths,
           "quiet first-layer units: incoming means to 0": means}
    if len(masks) > 1:
        between = _copy(posterior)
        cells = masks[1][:, None] & quiet0[None, :]
        between["layers.1.weight"][0][cells] = 0.0
        between["layers.1.weight"][1][cells] = prior_std
        out["second layer: weights from quiet into quiet units to the prior"] = between
    return out


def signal_fraction(first, second, masks: list[torch.Tensor]) -> list[dict[str, float]]:
    """Per hidden layer, for the quiet units' incoming weights and the other units', the share of
    the squared full-data gradient that is signal: ``sum g g' / (1/2 sum (g^2 + g'^2))`` over two
    independent estimates ``g``, ``g'`` (:func:`pyro_bbt.elbo_gradient.elbo_gradient`; the expectation of
    ``g g'`` is the squared mean gradient, of ``g^2`` that plus the noise's variance), locations and
    widths together. Near 1: the gradient is its mean; near 0 (or below): noise."""
    out = []
    for layer, mask in enumerate(masks):
        row = {}
        for group, rows in (("quiet", mask), ("other", ~mask)):
            cross = power = 0.0
            for i in range(2):
                g, h = first.grads[f"layers.{layer}.weight"][i][rows], second.grads[f"layers.{layer}.weight"][i][rows]
                cross += float((g * h).sum())
                power += 0.5 * float((g * g).sum() + (h * h).sum())
            row[group] = cross / power if power > 0 else float("nan")
        out.append(row)
    return out


def census(model, posterior: Posterior, prior_std: float, below: float) -> tuple[list[dict], list[torch.Tensor]]:
    """One row per hidden layer (units, quiet units, the KL of each part for quiet and other units) and the masks."""
    parts = unit_kl(model, posterior, prior_std)
    masks = quiet_units(parts, below)
    rows = []
    for layer, (p, mask) in enumerate(zip(parts, masks)):
        rows.append({"layer": layer, "units": int(mask.numel()), "quiet": int(mask.sum()),
                     "quiet_kl": {k: float(v[mask].sum()) for k, v in p.items()},
                     "other_kl": {k: float(v[~mask].sum()) for k, v in p.items()}})
    return rows, masks


def main(argv: list[str] | None = None) -> int:
    parser = unit_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--quiet-below", type=float, default=10.0, help="nats: a unit whose whole KL is below this is quiet")
    parser.add_argument("--draws", type=positive_int, default=16)
    args = parser.parse_args(argv)
    if not args.quiet_below > 0:
        parser.error(f"--quiet-below must be a positive number of nats, got {args.quiet_below}")
    torch.set_num_threads(1)
    unit = open_unit("kl_census", args.run_dir, args.key)
    if unit is None:
        return 2
    model, guide, start, split, _tol, (start_epoch, epoch) = unit
    prior_std = judged_unit(args.run_dir, args.key)[0].base_prior_std
    end = read_posterior(guide)
    rows, masks = census(model, end, prior_std, args.quiet_below)
    base = posterior_elbo(model, end, split, num_draws=args.draws, seed=args.seed)
    kl_end = total_kl(model, end, prior_std)
    record: dict = {"run": str(args.run_dir), "key": args.key, "epoch": epoch, "num_data": len(split), "prior_std": prior_std,
                    "quiet_below": args.quiet_below, "draws": args.draws, "elbo": base, "kl": kl_end, "layers": rows}
    print(f"{args.key} at epoch {epoch}: N = {len(split)}, ELBO {base:.1f}, KL {kl_end:.1f} (prior N(0, {prior_std:g}^2))")
    for row in rows:
        q, o = row["quiet_kl"], row["other_kl"]
        print(f"hidden layer {row['layer']}: {row['quiet']} of {row['units']} units quiet; their KL in/bias/out "
              f"{q['in']:.0f}/{q['bias']:.0f}/{q['out']:.0f}, the other units' {o['in']:.0f}/{o['bias']:.0f}/{o['out']:.0f}")
    first, second = (elbo_gradient(model, guide, split, seed=args.seed + k) for k in (1, 2))
    record["gradient_signal"] = signal_fraction(first, second, masks)
    for layer, row in enumerate(record["gradient_signal"]):
        print(f"hidden layer {layer}, incoming weights: signal share of the full-data gradient {row['quiet']:.3f} (quiet units), "
              f"{row['other']:.3f} (the others)")
    if start is not None:
        at_start = posterior_elbo(model, start, split, num_draws=args.draws, seed=args.seed)
        hybrid = posterior_elbo(model, with_units_from(end, start, masks), split, num_draws=args.draws, seed=args.seed)
        start_rows, _ = census(model, start, prior_std, args.quiet_below)
        record["continuation"] = {"start_epoch": start_epoch, "elbo_start": at_start, "kl_start": total_kl(model, start, prior_std),
                                  "quiet_units_share": base - hybrid, "rest": hybrid - at_start,
                                  "quiet_kl_start": [sum(r["quiet_kl"].values()) for r in start_rows]}
        print(f"continuation {start_epoch}-{epoch}: ELBO {at_start:.1f} -> {base:.1f} ({base - at_start:+.1f}); "
              f"the quiet units' parameters account for {base - hybrid:+.1f}, the rest {hybrid - at_start:+.1f}")
    record["probes"] = []
    points = [("checkpoint", end, base, kl_end)]
    if start is not None:
        points.append(("continuation's start", start, record["continuation"]["elbo_start"], record["continuation"]["kl_start"]))
    for where, posterior, elbo_at, kl_at in points:
        for name, probe in probes(posterior, quiet_units(unit_kl(model, posterior, prior_std), args.quiet_below), prior_std).items():
            elbo = posterior_elbo(model, probe, split, num_draws=args.draws, seed=args.seed)
            kl = total_kl(model, probe, prior_std)
            record["probes"].append({"at": where, "probe": name, "elbo_change": elbo - elbo_at, "kl_change": kl - kl_at,
                                     "log_lik_change": (elbo - elbo_at) + (kl - kl_at)})
            print(f"at the {where}, {name}: ELBO {elbo - elbo_at:+.1f}, KL {kl - kl_at:+.1f}, "
                  f"expected log-likelihood {elbo - elbo_at + kl - kl_at:+.1f}")
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
