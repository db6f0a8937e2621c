"""Which term of the ELBO a long fit is still gaining: its history split into segments.

A fit under the paper preset's verdict runs a fit phase (Adam under the stopping rule) and then,
after each pass, a continuation as long as the fit so far at 0.3 and 0.1 times its first rates,
scored with fixed noise; a continuation that still gains more than the tolerance doubles the fit.
Where the continuations keep gaining for thousands of epochs, this bench says which term does:
each epoch's history holds the per-epoch (minibatch, KL weight 1 in total) estimates

    ELBO = E_q[log p(D | w)] - KL(q || p),

and over a segment (the fit phase, then each continuation: from its start epoch for its length,
as the verdict recorded it; the last one as far as the file goes) this reports the means of the
ELBO, the expected log-likelihood and the KL over the segment's last ``--tail`` fraction of epochs
(all at the segment's last rate factor where it ends at 0.1, so two segments compare at one noise
level), and the verdict's own score of the continuation (its fixed-noise gain, nats and per datum).

It reads the history a file keeps: a unit's train checkpoint (``checkpoints/KEY.pt`` of a run in
progress: a finished unit of the trade-off study keeps no history) or a stage file
(``stages/*-A-bayesian-s*.pt``), with ``weights_only=True``::

    python benchmarks/trajectory.py runs/snap-multihead-transfer-tau10-f0.1-s2.pt --out figs/trajectory-tau10-s2.json --figure figs/trajectory-tau10-s2.png

(``runs/snap-*.pt``: copies of a trade-off unit's checkpoint taken while it ran, since the store
drops a unit's checkpoint when it finishes.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pyro_bbt.files import atomic_write_text
from pyro_bbt.plots import plt, save_figure

__all__ = ["read_history", "segments", "plot_trajectory", "main"]


def read_history(path: Path) -> list[dict]:
    """The per-epoch history a train checkpoint (``data.train_state.history``) or a stage file
    (``data.history``) keeps; ``ValueError`` naming the file where it holds none."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a pyro_bbt checkpoint or stage file (no 'data')")
    history = (data.get("train_state") or {}).get("history") if "train_state" in data else data.get("history")
    if not history or not all(k in history[0] for k in ("epoch", "elbo", "expected_log_lik", "weighted_kl", "phase")):
        raise ValueError(f"{path}: holds no per-epoch history with the ELBO's terms")
    return history


def _tail_means(entries: list[dict], tail: float) -> dict:
    last = entries[-max(1, round(len(entries) * tail)):]
    mean = lambda key: sum(e[key] for e in last) / len(last)  # noqa: E731
    return {"tail_epochs": [last[0]["epoch"], last[-1]["epoch"]], "elbo": mean("elbo"), "expected_log_lik": mean("expected_log_lik"),
            "kl": mean("weighted_kl"), "lr_scale": last[-1]["lr_scale"]}


def segments(history: list[dict], tail: float = 0.25) -> list[dict]:
    """The fit phase, then each continuation (its start epoch and length from the verdict's
    record of it; one still running goes to the history's end), each with the means of the ELBO,
    its expected log-likelihood and KL over the segment's last ``tail`` of epochs, and, for a scored
    continuation, the verdict's gain (``nats``, ``per_datum``) and its upper bound per datum."""
    if not 0.0 < tail <= 1.0:
        raise ValueError(f"tail must be in (0, 1], got {tail}")
    by_epoch = {e["epoch"]: e for e in history}
    fit = [e for e in history if e["phase"] == "fit"]
    out = [{"segment": "fit", "epochs": [fit[0]["epoch"], fit[-1]["epoch"]], **_tail_means(fit, tail)}] if fit else []
    scored = sorted((c for e in history if (c := (e["verdict"] or {}).get("continuation"))), key=lambda c: c["start_epoch"])
    scored_end = max((c["start_epoch"] + c["epochs"] for c in scored), default=fit[-1]["epoch"] if fit else 0)
    last_epoch = history[-1]["epoch"]
    if history[-1]["phase"] == "continuation" and last_epoch > scored_end:  # a continuation not scored yet
        scored.append({"start_epoch": scored_end, "epochs": last_epoch - scored_end, "running": True})
    for c in scored:
        entries = [by_epoch[k] for k in range(c["start_epoch"] + 1, c["start_epoch"] + c["epochs"] + 1) if k in by_epoch]
        if not entries:
            continue
        row = {"segment": "continuation", "epochs": [entries[0]["epoch"], entries[-1]["epoch"]], **_tail_means(entries, tail)}
        if c.get("running"):
            row["running"] = True
        else:
            row |= {"nats": c.get("nats"), "per_datum": c.get("per_datum"), "upper_per_datum": c.get("upper_per_datum")}
        out.append(row)
    return out


def plot_trajectory(history: list[dict], rows: list[dict], path: Path, window: int = 50) -> None:
    """The ELBO, E_q[log p(D | w)] and KL against the epoch (log scale), as running means over
    ``window`` epochs, with each segment's tail means marked (green: the fit phase; red: the
    continuations); each panel's scale is that of the epochs from the fit phase's tail on."""
    epochs = [e["epoch"] for e in history]
    first_tail = rows[0]["tail_epochs"][0] if rows else epochs[0]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    terms = (("elbo", "elbo", "ELBO"), ("expected_log_lik", "expected_log_lik", "E_q[log p(D | w)]"), ("weighted_kl", "kl", "KL(q || p)"))
    for ax, (key, row_key, label) in zip(axes, terms):
        values = [e[key] for e in history]
        smooth = [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]
        ax.plot(epochs, smooth, lw=1)
        for row in rows:
            ax.plot([row["tail_epochs"][1]], [row[row_key]], "o", ms=4,
                    color="C3" if row["segment"] == "continuation" else "C2")
        ax.set_xscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(f"{label} (running mean of {window})", fontsize=9)
        after = [v for v, e in zip(smooth, epochs) if e >= first_tail] or smooth  # the scale of the segments, not of the start
        low, high = min(after), max(after)
        ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/trajectory.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", type=Path, help="a train checkpoint (checkpoints/KEY.pt) or a stage file (stages/*.pt)")
    parser.add_argument("--tail", type=float, default=0.25, help="the fraction of each segment's last epochs to average (default 0.25)")
    parser.add_argument("--out", type=Path, help="write the segments as JSON here")
    parser.add_argument("--figure", type=Path, help="draw the three terms against the epoch here (PNG)")
    args = parser.parse_args(argv)
    try:
        history = read_history(args.file)
        rows = segments(history, args.tail)
    except (OSError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    for row in rows:
        gain = "" if row["segment"] == "fit" else (" running" if row.get("running") else f"  gain {row['nats']:.1f} nats ({row['per_datum']:.4f}/datum)")
        print(f"{row['segment']:12s} epochs {row['epochs'][0]:6d}-{row['epochs'][1]:6d}  lr x{row['lr_scale']:g}  ELBO {row['elbo']:10.1f}"
              f"  E[log lik] {row['expected_log_lik']:9.1f}  KL {row['kl']:9.1f}{gain}")
    if args.out is not None:
        atomic_write_text(args.out, json.dumps({"file": str(args.file), "epochs": history[-1]["epoch"], "tail": args.tail, "segments": rows}, indent=1) + "\n")
    if args.figure is not None:
        plot_trajectory(history, rows, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
