"""Figures of a transfer run, from its ``results.json`` content. Mean +- standard deviation over
seeds (the sample standard deviation, ``ddof=1``, as in the tables of ``results.json``; 0 for one seed)."""

from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .files import atomic_write  # noqa: E402
from .stats import sample_std  # noqa: E402

__all__ = ["sample_std", "plot_transfer_results", "plot_forgetting", "plot_final_accuracy", "save_all", "plot_sequence", "plot_split_sequence",
           "plot_learning_curves", "save_figure"]

COLORS = {"scratch": "tab:gray", "transfer": "tab:blue", "finetune": "tab:orange", "ewc": "tab:green", "joint": "tab:purple"}


def save_figure(fig, path: Path) -> None:
    """Lay out ``fig``, write it to ``path`` as a PNG (atomically) and close it."""
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def _methods(results: dict) -> list[str]:
    return list(dict.fromkeys(u["method"] for u in results["units"] if u["status"] == "ok"))


def _fractions(results: dict) -> list[float]:
    return sorted({u["fraction"] for u in results["units"] if u["status"] == "ok"})


def plot_transfer_results(results: dict, path: Path) -> None:
    """B's test accuracy against optimisation steps, per fraction (one panel each), per method."""
    fractions = _fractions(results)
    fig, axes = plt.subplots(1, len(fractions), figsize=(4 * len(fractions), 3.4), squeeze=False)
    for ax, fraction in zip(axes[0], fractions):
        for method in _methods(results):
            curves = [u["curve"] for u in results["units"] if u["method"] == method and u["fraction"] == fraction and u["status"] == "ok"]
            if not curves or not curves[0]:
                continue
            length = min(len(c) for c in curves)
            steps = np.array([p["step"] for p in curves[0][:length]])
            acc = np.array([[p["b_test_accuracy"] for p in c[:length]] for c in curves])
            mean, std = acc.mean(0), sample_std(acc, axis=0)
            ax.plot(steps, mean, marker="o", ms=3, label=method, color=COLORS.get(method))
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2, color=COLORS.get(method))
        ax.set_title(f"B, {fraction:g} of training data")
        ax.set_xlabel("optimisation steps (joint: on A and B)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("B test accuracy")
    axes[0][-1].legend(fontsize=8)
    save_figure(fig, path)


def _grouped(results: dict, key) -> dict:
    table: dict = defaultdict(lambda: defaultdict(list))
    for u in results["units"]:
        if u["status"] == "ok":
            table[u["method"]][u["fraction"]].append(key(u))
    return table


def plot_forgetting(results: dict, path: Path) -> None:
    """A's test accuracy after training on B, per method and fraction, with A's accuracy before B."""
    fractions, methods = _fractions(results), _methods(results)
    table = _grouped(results, lambda u: u["a_test_after"]["accuracy"])
    fig, ax = plt.subplots(figsize=(3.4 + 1.3 * len(fractions) * max(1, len(methods)) / 3, 3.6))  # + room for the legend
    width = 0.8 / max(1, len(methods))
    for k, method in enumerate(methods):
        means = [np.mean(table[method][f]) if table[method][f] else np.nan for f in fractions]
        stds = [sample_std(table[method][f]) if table[method][f] else 0.0 for f in fractions]
        ax.bar(np.arange(len(fractions)) + k * width, means, width, yerr=stds, label=method, color=COLORS.get(method), capsize=2)
    before = [s["a_test"]["accuracy"] for s in results["task_a"] if s["kind"] == "bayesian"]
    if before:
        ax.axhline(np.mean(before), color="black", ls="--", lw=1, label="A before B (Bayesian)")
    ax.axhline(1.0 / len(results["config"]["task_a"]), color="red", ls=":", lw=1, label="chance")
    ax.set_xticks(np.arange(len(fractions)) + 0.4 - width / 2, [f"{f:g}" for f in fractions])
    ax.set_xlabel("fraction of B's training data")
    ax.set_ylabel("A test accuracy after B")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(fig, path)


def plot_final_accuracy(results: dict, path: Path) -> None:
    """B's final test accuracy against the fraction of B's data (log x), per method."""
    fractions, methods = _fractions(results), _methods(results)
    table = _grouped(results, lambda u: u["b_test"]["accuracy"])
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for method in methods:
        means = np.array([np.mean(table[method][f]) for f in fractions])
        stds = np.array([sample_std(table[method][f]) for f in fractions])
        ax.errorbar(fractions, means, yerr=stds, marker="o", capsize=3, label=method, color=COLORS.get(method))
    ax.set_xscale("log")
    ax.set_xlabel("fraction of B's training data")
    ax.set_ylabel("B test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def save_all(results: dict, out_dir: Path) -> list[Path]:
    """Write the transfer figures into ``out_dir``; returns their paths (none if no unit succeeded)."""
    if not _fractions(results):
        return []
    paths = [out_dir / "transfer_results.png", out_dir / "forgetting.png", out_dir / "final_accuracy.png"]
    plot_transfer_results(results, paths[0])
    plot_forgetting(results, paths[1])
    plot_final_accuracy(results, paths[2])
    return paths


def plot_sequence(results: dict, path: Path) -> None:
    """The mean accuracy matrix R[i][j] (accuracy on task j after training task i) per method."""
    methods = list(results["methods"])
    domains = results["domains"]
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.8), squeeze=False)
    for ax, method in zip(axes[0], methods):
        R = np.array(results["methods"][method]["accuracy_matrix_mean"])
        image = ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
        for i in range(R.shape[0]):
            for j in range(R.shape[1]):
                ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", color="white" if R[i, j] < 0.6 else "black", fontsize=8)
        ax.set_xticks(range(len(domains)), domains, rotation=45)
        ax.set_yticks(range(len(domains)), domains)
        ax.set_xlabel("evaluated on task j")
        ax.set_title(method)
    axes[0][0].set_ylabel("after training task i")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="test accuracy")
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png", bbox_inches="tight"))
    plt.close(fig)


def _draw_split_curves(ax, results: dict) -> None:
    num_tasks = len(results["tasks"])
    for method, entry in results["methods"].items():
        curve = entry["average_accuracy_curve"]
        if curve is None:
            continue
        ax.errorbar(np.arange(1, num_tasks + 1), curve["mean"], yerr=curve["std"], marker="o", capsize=3, label=f"{method} (n={curve['n']})",
                    color=COLORS.get(method))
    ax.set_xticks(range(1, num_tasks + 1))
    ax.set_xlabel("number of tasks seen")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"split MNIST, {results['scenario']} scenario (fit: {results['fit']})", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no line when no seed finished
        ax.legend(fontsize=8, loc="lower left")


def plot_split_sequence(results: dict, path: Path) -> None:
    """Split MNIST: the average test accuracy on the tasks seen so far,
    ``a_t = 1/(t+1) sum_{j<=t} R[t][j]``, against the number of tasks seen, one line per method
    (mean, error bars +- the sample standard deviation over the seeds whose sequence finished)."""
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    _draw_split_curves(ax, results)
    ax.set_ylabel("average accuracy on the tasks seen")
    save_figure(fig, path)


def plot_split_scenarios(runs: list[dict], path: Path) -> None:
    """:func:`plot_split_sequence` for several split runs (one per scenario), side by side."""
    fig, axes = plt.subplots(1, len(runs), figsize=(5.0 * len(runs), 3.8), squeeze=False)
    for ax, results in zip(axes[0], runs):
        _draw_split_curves(ax, results)
    axes[0][0].set_ylabel("average accuracy on the tasks seen")
    save_figure(fig, path)


def regime_colours(n: int) -> list[tuple[float, float, float, float]]:
    """``n`` distinct colours, one per line of :func:`plot_regimes`: matplotlib's ten-colour cycle
    repeats after ten lines, so beyond ten the twenty of ``tab20``, then evenly spaced hues."""
    if n <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(n)]
    return [matplotlib.colormaps["hsv"](i / n) for i in range(n)]


def plot_regimes(runs: list[dict], names: list[str], path: Path) -> None:
    """Several split runs of one scenario (``names``: their labels): the average accuracy on the
    tasks seen after each task (mean +- std over seeds), and the active units of each hidden layer
    after each task (mean over seeds), one line per run and method."""
    layers = max((len(c[0]) for r in runs for e in r["methods"].values() for c in [e.get("active_units_mean")] if c), default=0)
    fig, axes = plt.subplots(1, 1 + layers, figsize=(5.0 * (1 + layers), 3.8), squeeze=False)
    colours = regime_colours(sum(len(r["methods"]) for r in runs))
    lines = ((name, method, entry, len(results["methods"])) for name, results in zip(names, runs) for method, entry in results["methods"].items())
    for colour, (name, method, entry, methods) in zip(colours, lines):
        label = name if methods == 1 else f"{name} {method}"
        curve = entry.get("average_accuracy_curve")
        if curve:
            x = np.arange(1, len(curve["mean"]) + 1)
            axes[0][0].errorbar(x, curve["mean"], yerr=curve["std"], marker="o", capsize=3, label=label, color=colour)
        counts = entry.get("active_units_mean")
        # a run whose network has fewer hidden layers than the deepest is drawn on its own layers only
        for layer in range(len(counts[0]) if counts else 0):
            axes[0][1 + layer].plot(np.arange(1, len(counts) + 1), [c[layer] for c in counts], marker="o", label=label, color=colour)
    axes[0][0].set(xlabel="tasks learnt", ylabel="average accuracy on the tasks seen")
    axes[0][0].legend(fontsize=7)
    for layer in range(layers):
        axes[0][1 + layer].set(xlabel="tasks learnt", ylabel=f"active units, hidden layer {layer + 1}")
    for ax in axes[0]:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    save_figure(fig, path)


def _curve_xy(points: list[dict], timing: dict[str, float], prefix: str, x: str) -> tuple[np.ndarray, np.ndarray]:
    """One unit's curve: ``x`` (``"step"``, or ``"seconds"`` read from ``timing`` under
    ``PREFIX/curve/I``) against B's test accuracy."""
    if x == "step":
        xs = [p["step"] for p in points]
    else:
        xs = [timing.get(f"{prefix}/curve/{i}", np.nan) for i in range(len(points))]
    return np.asarray(xs, dtype=float), np.asarray([p["b_test_accuracy"] for p in points], dtype=float)


def _held(xs: np.ndarray, ys: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """``ys`` on ``grid``: the last value recorded at or before each grid point (NaN before the
    first), held after the fit ended, since a converged fit is finished."""
    index = np.searchsorted(xs, grid, side="right") - 1
    return np.where(index >= 0, ys[np.clip(index, 0, None)], np.nan)


def plot_learning_curves(runs: dict[str, tuple[dict, dict]], path: Path, fractions: tuple[float, ...] | None = None) -> None:
    """B's test accuracy against optimisation steps and against fit wall time, per head (``runs``:
    head -> (results.json, timing.json) of a transfer run), one column per fraction of B; mean
    +- std over seeds on a common log-spaced axis, each seed's curve held at its last point after
    its fit ended (marked with a dot: where the fit converged or hit its cap). ``fractions``:
    default every fraction the runs hold."""
    heads = list(runs)
    fractions = fractions or tuple(sorted({f for results, _ in runs.values() for f in _fractions(results)}))
    fig, axes = plt.subplots(2 * len(heads), len(fractions), figsize=(4.2 * len(fractions), 3.0 * 2 * len(heads)), squeeze=False)
    for h, head in enumerate(heads):
        results, timing = runs[head]
        for row, x in enumerate(("step", "seconds")):
            for col, fraction in enumerate(fractions):
                ax = axes[2 * h + row][col]
                for method in _methods(results):
                    picked = [(i, u) for i, u in enumerate(results["units"])
                              if u["method"] == method and u["fraction"] == fraction and u["status"] == "ok" and u["curve"]]
                    curves = [_curve_xy(u["curve"], timing, f"units/{i}", x) for i, u in picked]
                    curves = [(xs, ys) for xs, ys in curves if len(xs) and np.isfinite(xs).all()]
                    if not curves:
                        continue
                    low = max(min(xs[0] for xs, _ in curves), 1e-3)
                    grid = np.geomspace(low, max(xs[-1] for xs, _ in curves), 60)
                    values = np.array([_held(xs, ys, grid) for xs, ys in curves])
                    with np.errstate(invalid="ignore"), warnings.catch_warnings():  # grid points before a seed's first point are NaN
                        warnings.simplefilter("ignore", RuntimeWarning)
                        mean = np.nanmean(values, 0)
                        std = np.nanstd(values, 0, ddof=1) if len(values) > 1 else np.zeros_like(mean)
                    color = COLORS.get(method)
                    ax.plot(grid, mean, label=method, color=color)
                    ax.fill_between(grid, mean - std, mean + std, alpha=0.15, color=color)
                    ax.plot([xs[-1] for xs, _ in curves], [ys[-1] for _, ys in curves], "o", ms=3, color=color)
                ax.set_xscale("log")
                ax.grid(alpha=0.3)
                ax.set_title(f"{head} head, {fraction:g} of B", fontsize=9)
                ax.set_xlabel("optimisation steps" if x == "step" else "fit wall time (s)", fontsize=8)
            axes[2 * h + row][0].set_ylabel("B test accuracy")
    labelled = {label: handle for ax in axes.flat for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(labelled.values(), labelled.keys(), loc="upper center", ncol=len(labelled), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
