"""Speed and memory benchmark of pyro_bbt's training against plain-PyTorch references.

Run ``python -m pyro_bbt.bench`` (``--help`` for the flags). Every configuration trains on
task A of split MNIST (digits 0-4, :func:`pyro_bbt.data.load_task`, its ``train`` split,
minibatches of 128, Adam with lr 1e-3) for ``--epochs`` epochs, and the wall-clock seconds
of every epoch are recorded.

What is measured
----------------
Plain-PyTorch references, with their training loops written here:

* ``torch-deterministic``: the deterministic MLP 784-400-400-5 (:class:`pyro_bbt.ewc.MLP`),
  cross-entropy -- the cost floor of one pass over the data;
* ``torch-bbb-16``: Bayes by Backprop (Blundell et al. 2015) written by hand: mean-field
  Gaussian weights ``N(mu, softplus(rho)^2)``, 16 independent weight samples per step drawn
  at once and pushed through the net with ``torch.baddbmm``, closed-form
  ``KL(q || N(0, 1))`` weighted ``1/M`` (M minibatches per epoch);
* ``torch-lrt``: the same posterior trained with local reparameterisation (one sample of
  the pre-activations per example).

pyro_bbt, through :func:`pyro_bbt.inference.train` with ``eval_samples=0`` (the epoch
seconds come from its history; epoch 1 includes the guide's setup, hence medians; other
settings are :class:`~pyro_bbt.inference.TrainConfig`'s defaults, e.g. the ``blundell`` KL
schedule, which changes the KL's weight but not the cost of a step):

* ``meanfield-local-1``: the default training (``meanfield`` guide, ``local`` estimator);
* ``meanfield-weights-16`` / ``meanfield-weights-1``: weight sampling with 16 / 1 particles;
* ``normal-weights-16``: Pyro's AutoNormal with 16 weight-sampling particles.

Each configuration runs in its own freshly spawned child process (one after the other,
never concurrently), so configurations do not share caches, allocator state or RSS. Its
peak memory is the child's peak resident set size: ``VmHWM`` from ``/proc/self/status``
on Linux. ``getrusage(RUSAGE_SELF).ru_maxrss`` is *not* used there: Linux carries the
parent's peak RSS over into a spawned child (fork + exec), so it would report the
parent's peak. Elsewhere ``ru_maxrss`` is the fallback. The peak includes the Python
interpreter, torch, pyro and the loaded task (``rss_before_training_mib`` shows that base).

How to read the ratios
----------------------
``median_epoch_seconds`` is the median over epochs. ``ratio_to_deterministic`` is that
median divided by ``torch-deterministic``'s: the price of being Bayesian at all.
``ratio_to_bbb16`` divides by ``torch-bbb-16``'s: for the 16-particle configurations it is
the library's overhead over a hand-written implementation of the same computation (1.0 =
as fast as plain PyTorch); for 1-sample configurations it is below 1 by construction.
``ratio_to_lrt`` divides by ``torch-lrt``'s: the same comparison for ``meanfield-local-1``. A
ratio is ``null`` when its reference was not among ``--configs``. The machine's load adds
noise to every number (each result records the 1-minute load average before and after it);
compare wall-clock runs only on an otherwise idle machine. On a machine shared with other
jobs, torch's multi-threaded kernels can slow down many times over (threads waiting for
descheduled peers), so there prefer ``--threads 1`` and the CPU-time columns.

Each epoch's process CPU time (``time.process_time``, all threads of the child) is recorded
too, with its own medians and ratios (``cpu_ratio_*``). On a machine shared with other jobs
the wall-clock time of a configuration depends on what else ran meanwhile, while with
``--threads 1`` its CPU time mostly does not, so the CPU ratios are the steadier comparison
there (with several threads, threads spinning while they wait for descheduled peers add
CPU time too). They are not the same quantity as the wall ratios even on an idle machine:
with several torch threads the parallel kernels add CPU time from every thread while
Python overhead is serial, so ``--threads 1`` makes the two agree most closely. The
targets are judged on wall time.

The JSON report (``--out``) is rewritten after every configuration, so a run that is
interrupted keeps what it measured; ``meta.complete`` says whether every selected
configuration finished.

Two other modes: ``--profile CONFIG`` runs one configuration in-process under cProfile and
prints where its time goes (profile before optimising); ``--compare BEFORE AFTER`` prints a
before/after table of two JSON reports (speed-up of each configuration's median, and each
report's own ratios to the references).

The targets (from the issue) are printed after the table: local reparameterisation at most
1.5x the deterministic MLP, ``meanfield-weights-16`` at most 1.25x ``torch-bbb-16``, and
the peak memory of the default training (``meanfield-local-1``) at most 2 GiB.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F
from torch import Tensor

from .data import Split, Task, load_task
from .ewc import MLP
from .files import atomic_write_json
from .guides import GuideConfig, make_guide
from .inference import TrainConfig, train
from .model import BayesianMLP

__all__ = ["BenchConfig", "CONFIGS", "TARGETS", "run_config", "summarize", "evaluate_targets", "build_report", "main"]

TASK_DIGITS: tuple[int, ...] = (0, 1, 2, 3, 4)
SIZES: tuple[int, ...] = (784, 400, 400, 5)
BATCH_SIZE = 128
LR = 1e-3
INIT_SCALE = 0.01
DEFAULT_EPOCHS = 3
QUICK_EPOCHS = 2
QUICK_TRAIN_SIZE = 2048
DETERMINISTIC = "torch-deterministic"
BBB16 = "torch-bbb-16"
LRT = "torch-lrt"
MIB = 1024 * 1024


@dataclass(frozen=True)
class BenchConfig:
    """One benchmarked training setup.

    :param name: the name used by ``--configs`` and in the output.
    :param kind: ``"torch"`` (a reference written in this module) or ``"pyro"`` (pyro_bbt).
    :param description: one line for the reader.
    :param guide: pyro_bbt guide name (``kind == "pyro"``).
    :param estimator: pyro_bbt estimator name (``kind == "pyro"``).
    :param num_particles: Monte Carlo samples per step.
    """

    name: str
    kind: str
    description: str
    guide: str | None = None
    estimator: str | None = None
    num_particles: int = 1


CONFIGS: dict[str, BenchConfig] = {
    c.name: c
    for c in (
        BenchConfig(DETERMINISTIC, "torch", "plain PyTorch deterministic MLP (ewc.MLP), Adam, cross-entropy"),
        BenchConfig(BBB16, "torch", "plain PyTorch Bayes by Backprop, 16 weight samples via baddbmm", num_particles=16),
        BenchConfig(LRT, "torch", "plain PyTorch local reparameterisation, 1 sample"),
        BenchConfig("meanfield-local-1", "pyro", "pyro_bbt meanfield guide, local estimator", "meanfield", "local", 1),
        BenchConfig("meanfield-weights-16", "pyro", "pyro_bbt meanfield guide, weights estimator, 16 particles", "meanfield", "weights", 16),
        BenchConfig("normal-weights-16", "pyro", "pyro_bbt AutoNormal guide, weights estimator, 16 particles", "normal", "weights", 16),
        BenchConfig("meanfield-weights-1", "pyro", "pyro_bbt meanfield guide, weights estimator, 1 particle", "meanfield", "weights", 1),
    )
}


@dataclass(frozen=True)
class Target:
    """A requirement from the issue: ``metric`` of ``config`` must be ``<= threshold``."""

    name: str
    config: str
    metric: str
    threshold: float
    unit: str
    description: str


TARGETS: tuple[Target, ...] = (
    Target("local_vs_deterministic", "meanfield-local-1", "ratio_to_deterministic", 1.5, "x",
           "local reparameterisation (meanfield local) <= 1.5x the deterministic MLP"),
    Target("weights16_vs_bbb16", "meanfield-weights-16", "ratio_to_bbb16", 1.25, "x",
           "16-particle weight sampling (meanfield weights 16) <= 1.25x torch-bbb-16"),
    Target("default_peak_memory", "meanfield-local-1", "peak_rss_mib", 2048.0, "MiB",
           "peak memory of default training (meanfield local) <= 2 GiB"),
)


# ----------------------------------------------------------------------------- memory


def _proc_status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (Linux), or ``None``."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def peak_rss_mib() -> tuple[float, str]:
    """This process's peak resident set size in MiB and where it was read from."""
    hwm = _proc_status_kib("VmHWM")
    if hwm is not None:
        return hwm / 1024, "VmHWM"
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return maxrss * scale / MIB, "ru_maxrss"


def load_average() -> float | None:
    """The 1-minute load average of the machine (``None`` where unavailable)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def current_rss_mib() -> float | None:
    """This process's current resident set size in MiB (Linux only)."""
    rss = _proc_status_kib("VmRSS")
    return None if rss is None else rss / 1024


# ------------------------------------------------------------------ torch references


def _softplus_inverse(value: float) -> float:
    return math.log(math.expm1(value))


Posterior = Sequence[tuple[Tensor, Tensor, Tensor, Tensor]]
"""Per layer ``(w_mu, w_sigma, b_mu, b_sigma)``."""


class MeanFieldMLP:
    """Mean-field Gaussian posterior over an MLP's weights, in plain PyTorch.

    Per layer: ``W ~ N(w_mu, softplus(w_rho)^2)``, ``b ~ N(b_mu, softplus(b_rho)^2)``; ``w_mu``
    starts as ``nn.Linear`` draws it, ``b_mu`` at 0, every scale at ``init_scale``.
    """

    def __init__(self, sizes: Sequence[int], init_scale: float) -> None:
        rho = _softplus_inverse(init_scale)
        self.layers: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        for d_in, d_out in zip(sizes[:-1], sizes[1:]):
            bound = 1.0 / math.sqrt(d_in)
            w_mu = torch.empty(d_out, d_in).uniform_(-bound, bound).requires_grad_()
            w_rho = torch.full((d_out, d_in), rho, requires_grad=True)
            b_mu = torch.zeros(d_out, requires_grad=True)
            b_rho = torch.full((d_out,), rho, requires_grad=True)
            self.layers.append((w_mu, w_rho, b_mu, b_rho))

    def parameters(self) -> list[Tensor]:
        return [p for layer in self.layers for p in layer]

    def loc_scale(self) -> Posterior:
        """Per layer ``(w_mu, w_sigma, b_mu, b_sigma)``; compute once per step and share."""
        return [(w_mu, F.softplus(w_rho), b_mu, F.softplus(b_rho)) for w_mu, w_rho, b_mu, b_rho in self.layers]

    @staticmethod
    def kl_to_standard_normal(posterior: Posterior) -> Tensor:
        """``KL(q || N(0, I))`` in closed form, summed over every weight and bias."""
        total = torch.zeros(())
        for layer in posterior:
            for mu, sigma in (layer[:2], layer[2:]):
                total = total + (0.5 * (sigma * sigma + mu * mu - 1.0) - sigma.log()).sum()
        return total

    @staticmethod
    def sampled_logits(posterior: Posterior, x: Tensor, num_samples: int) -> Tensor:
        """Logits ``(S, B, C)`` under ``S`` independent weight samples (batched matmul)."""
        h = x.expand(num_samples, *x.shape)
        last = len(posterior) - 1
        for index, (w_mu, w_sigma, b_mu, b_sigma) in enumerate(posterior):
            w = torch.addcmul(w_mu, w_sigma, torch.randn(num_samples, *w_mu.shape))
            b = torch.addcmul(b_mu, b_sigma, torch.randn(num_samples, 1, *b_mu.shape))
            h = torch.baddbmm(b, h, w.transpose(-1, -2))
            if index < last:
                h = F.relu(h)
        return h

    @staticmethod
    def local_reparameterized_logits(posterior: Posterior, x: Tensor) -> Tensor:
        """Logits ``(B, C)`` with each example's pre-activations sampled (Kingma et al. 2015)."""
        h = x
        last = len(posterior) - 1
        for index, (w_mu, w_sigma, b_mu, b_sigma) in enumerate(posterior):
            mean = F.linear(h, w_mu, b_mu)
            var = F.linear(h * h, w_sigma * w_sigma, b_sigma * b_sigma)
            h = mean + var.sqrt() * torch.randn_like(mean)
            if index < last:
                h = F.relu(h)
        return h


StepFn = Callable[[Tensor, Tensor], float]


def _deterministic_step(num_data: int, num_batches: int) -> StepFn:
    net = MLP(SIZES)
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)

    def step(x: Tensor, y: Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def _bayesian_step(num_data: int, num_batches: int, num_samples: int | None) -> StepFn:
    """A BBB step with ``num_samples`` weight samples, or local reparameterisation for ``None``.

    Loss: ``(N/B) * mean_s sum_n CE(logits_{s,n}, y_n) + KL(q || N(0, 1)) / M``.
    """
    posterior = MeanFieldMLP(SIZES, INIT_SCALE)
    optimizer = torch.optim.Adam(posterior.parameters(), lr=LR)

    def step(x: Tensor, y: Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        q = posterior.loc_scale()
        if num_samples is None:
            nll = F.cross_entropy(MeanFieldMLP.local_reparameterized_logits(q, x), y, reduction="sum")
        else:
            logits = MeanFieldMLP.sampled_logits(q, x, num_samples)
            nll = F.cross_entropy(logits.flatten(0, 1), y.repeat(num_samples), reduction="sum") / num_samples
        loss = nll * (num_data / x.shape[0]) + MeanFieldMLP.kl_to_standard_normal(q) / num_batches
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def _torch_step(name: str, num_data: int, num_batches: int) -> StepFn:
    if name == DETERMINISTIC:
        return _deterministic_step(num_data, num_batches)
    if name == BBB16:
        return _bayesian_step(num_data, num_batches, CONFIGS[name].num_particles)
    if name == "torch-lrt":
        return _bayesian_step(num_data, num_batches, None)
    raise ValueError(f"no torch reference called {name!r}")


def _time_torch_epochs(config: BenchConfig, split: Split, epochs: int, seed: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process-CPU seconds of each epoch of a plain-PyTorch reference."""
    torch.manual_seed(seed)
    num_data = len(split)
    num_batches = math.ceil(num_data / BATCH_SIZE)
    step = _torch_step(config.name, num_data, num_batches)
    order = torch.Generator().manual_seed(seed)
    seconds, cpu_seconds = [], []
    for _ in range(epochs):
        start, cpu_start = time.perf_counter(), time.process_time()
        for x, y in split.batches(BATCH_SIZE, shuffle=True, generator=order):
            loss = step(x, y)
            if not math.isfinite(loss):
                raise FloatingPointError(f"{config.name}: loss is {loss}")
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
    return seconds, cpu_seconds


# ----------------------------------------------------------------------- pyro_bbt


def _time_pyro_epochs(config: BenchConfig, split: Split, epochs: int, seed: int) -> tuple[list[float], list[float]]:
    """Wall-clock seconds of each epoch of :func:`pyro_bbt.inference.train` (from its history)
    and process-CPU seconds (between its ``on_epoch`` calls, the first from the call of ``train``)."""
    pyro.clear_param_store()
    model = BayesianMLP(SIZES)
    guide = make_guide(config.guide, model, GuideConfig(init_scale=INIT_SCALE))
    train_config = TrainConfig(
        epochs=epochs,
        batch_size=BATCH_SIZE,
        lr=LR,
        num_particles=config.num_particles,
        estimator=config.estimator,
        seed=seed,
        eval_samples=0,
        progress=False,
    )
    cpu_marks = [time.process_time()]
    history = train(model, guide, split, train_config, on_epoch=lambda _: cpu_marks.append(time.process_time()))
    cpu_seconds = [b - a for a, b in zip(cpu_marks[:-1], cpu_marks[1:])]
    return [e.seconds for e in history.epochs], cpu_seconds


# ------------------------------------------------------------------ one configuration


def _load_train_split(train_size: int | None) -> Split:
    split = load_task(Task(digits=TASK_DIGITS)).train
    return split if train_size is None else split.subset(train_size)


def run_config(name: str, epochs: int, train_size: int | None = None, threads: int | None = None, seed: int = 0) -> dict:
    """Train configuration ``name`` for ``epochs`` epochs in this process; its raw measurements.

    Meant to run in a fresh process (see :func:`run_isolated`): the peak RSS is the process's.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    config = CONFIGS[name]
    split = _load_train_split(train_size)
    rss_before = current_rss_mib()
    load_before = load_average()
    timer = _time_torch_epochs if config.kind == "torch" else _time_pyro_epochs
    seconds, cpu_seconds = timer(config, split, epochs, seed)
    peak, source = peak_rss_mib()
    return {
        "name": name,
        "epoch_seconds": seconds,
        "epoch_cpu_seconds": cpu_seconds,
        "train_size": len(split),
        "steps_per_epoch": math.ceil(len(split) / BATCH_SIZE),
        "peak_rss_mib": peak,
        "peak_rss_source": source,
        "rss_before_training_mib": rss_before,
        "num_threads": torch.get_num_threads(),
        "load_average": [load_before, load_average()],
    }


def run_isolated(name: str, epochs: int, train_size: int | None, threads: int | None, seed: int) -> dict:
    """:func:`run_config` in a freshly spawned child process (isolates timing and peak RSS)."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes=1, maxtasksperchild=1) as pool:
        return pool.apply(run_config, (name, epochs, train_size, threads, seed))


# ------------------------------------------------------------------------- summary


def _ratio(value: float, reference: float | None) -> float | None:
    return None if reference is None else value / reference


def summarize(raw: Sequence[dict]) -> list[dict]:
    """Add to each raw result its median epoch seconds and the ratios to the references."""
    medians = {r["name"]: statistics.median(r["epoch_seconds"]) for r in raw}
    cpu_medians = {r["name"]: statistics.median(r["epoch_cpu_seconds"]) for r in raw}
    results = []
    for r in raw:
        median, cpu_median = medians[r["name"]], cpu_medians[r["name"]]
        results.append(
            {
                **r,
                "description": CONFIGS[r["name"]].description,
                "epochs": len(r["epoch_seconds"]),
                "median_epoch_seconds": median,
                "median_step_ms": 1000.0 * median / r["steps_per_epoch"],
                "ratio_to_deterministic": _ratio(median, medians.get(DETERMINISTIC)),
                "ratio_to_bbb16": _ratio(median, medians.get(BBB16)),
                "ratio_to_lrt": _ratio(median, medians.get(LRT)),
                "median_epoch_cpu_seconds": cpu_median,
                "cpu_ratio_to_deterministic": _ratio(cpu_median, cpu_medians.get(DETERMINISTIC)),
                "cpu_ratio_to_bbb16": _ratio(cpu_median, cpu_medians.get(BBB16)),
            }
        )
    return results


def evaluate_targets(results: Sequence[dict]) -> list[dict]:
    """Each target with its measured value and whether it is met (``None``: not measured)."""
    by_name = {r["name"]: r for r in results}
    out = []
    for target in TARGETS:
        value = by_name.get(target.config, {}).get(target.metric)
        out.append({**asdict(target), "value": value, "met": None if value is None else bool(value <= target.threshold)})
    return out


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(results: Sequence[dict]) -> str:
    lines = [
        "| config | median s/epoch | epochs | ms/step | x deterministic | x torch-bbb-16 | peak RSS (MiB) "
        "| median CPU s/epoch | CPU x det. | CPU x bbb-16 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['median_epoch_seconds']:.2f} | {r['epochs']} | {r['median_step_ms']:.1f} "
            f"| {_fmt(r['ratio_to_deterministic'], '.2f', 'x')} | {_fmt(r['ratio_to_bbb16'], '.2f', 'x')} "
            f"| {r['peak_rss_mib']:.0f} | {r['median_epoch_cpu_seconds']:.2f} "
            f"| {_fmt(r['cpu_ratio_to_deterministic'], '.2f', 'x')} | {_fmt(r['cpu_ratio_to_bbb16'], '.2f', 'x')} |"
        )
    return "\n".join(lines)


def comparison_table(before: dict, after: dict) -> str:
    """Markdown: each configuration's median seconds per epoch in two reports (for example
    before and after a change), the speed-up, and each report's own ratios to the references
    (ratios are only ever taken within one run)."""
    old = {r["name"]: r for r in before["results"]}

    def ratios(report: dict, name: str) -> list[float | None]:
        medians = {r["name"]: r["median_epoch_seconds"] for r in report["results"]}
        return [_ratio(medians[name], medians.get(reference)) for reference in (DETERMINISTIC, BBB16, LRT)]

    lines = [
        "| config | before s/epoch | after s/epoch | speed-up | before x det. | after x det. "
        "| before x bbb-16 | after x bbb-16 | before x lrt | after x lrt |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in after["results"]:
        b = old.get(r["name"])
        if b is None:
            continue
        cells = [f"{b['median_epoch_seconds']:.2f}", f"{r['median_epoch_seconds']:.2f}",
                 f"{b['median_epoch_seconds'] / r['median_epoch_seconds']:.2f}x"]
        for ratio_before, ratio_after in zip(ratios(before, r["name"]), ratios(after, r["name"])):
            cells += [_fmt(ratio_before, ".2f", "x"), _fmt(ratio_after, ".2f", "x")]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_table(targets: Sequence[dict]) -> str:
    lines = ["| target | measured | threshold | met |", "|---|---:|---:|---|"]
    for t in targets:
        spec = ".0f" if t["unit"] == "MiB" else ".2f"
        measured = _fmt(t["value"], spec, t["unit"] if t["unit"] == "x" else " MiB")
        threshold = f"{t['threshold']:{spec}}{t['unit'] if t['unit'] == 'x' else ' MiB'}"
        met = "not measured" if t["met"] is None else ("yes" if t["met"] else "NO")
        lines.append(f"| {t['description']} | {measured} | <= {threshold} | {met} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- output


def _meta(args: argparse.Namespace, raw: Sequence[dict]) -> dict:
    return {
        "task_digits": list(TASK_DIGITS),
        "sizes": list(SIZES),
        "batch_size": BATCH_SIZE,
        "lr": LR,
        "init_scale": INIT_SCALE,
        "epochs": args.epochs,
        "train_size": raw[0]["train_size"] if raw else None,
        "quick": args.quick,
        "seed": args.seed,
        "threads_requested": args.threads,
        "num_threads": raw[0]["num_threads"] if raw else None,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "platform": platform.platform(),
        "cpu_load_note": "load_average per result: 1-min load average before and after its training",
        "isolation": "each configuration in its own spawned child process, run sequentially",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ------------------------------------------------------------------------------- CLI


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _config_list(text: str) -> list[str]:
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in CONFIGS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown or empty configs {unknown or text!r}; allowed: {', '.join(CONFIGS)}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pyro_bbt.bench",
        description="Time epochs of pyro_bbt training against plain-PyTorch references on split-MNIST task A.",
    )
    parser.add_argument("--quick", action="store_true",
                        help=f"first {QUICK_TRAIN_SIZE} training images and {QUICK_EPOCHS} epochs (unless given)")
    parser.add_argument("--epochs", type=_positive_int, default=None,
                        help=f"epochs per configuration (default {DEFAULT_EPOCHS}; {QUICK_EPOCHS} with --quick)")
    parser.add_argument("--train-size", type=_positive_int, default=None,
                        help="use only the first N training images (default: all; "
                             f"{QUICK_TRAIN_SIZE} with --quick)")
    parser.add_argument("--configs", type=_config_list, default=list(CONFIGS),
                        help=f"comma-separated subset of: {', '.join(CONFIGS)}")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="torch.set_num_threads in every configuration (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the minibatch order")
    parser.add_argument("--out", type=Path, default=Path("bench.json"), help="JSON output (default bench.json)")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--compare", type=Path, nargs=2, metavar=("BEFORE", "AFTER"), default=None,
                       help="instead of timing: print a before/after table of two JSON reports of this command")
    modes.add_argument("--profile", choices=list(CONFIGS), default=None, metavar="CONFIG",
                        help="instead of timing: run CONFIG in this process under cProfile and print the "
                             "functions with the most own time (where a step's time goes)")
    return parser


def _resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    if args.epochs is None:
        args.epochs = QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS
    if args.train_size is None and args.quick:
        args.train_size = QUICK_TRAIN_SIZE
    return args


def _run_all(args: argparse.Namespace) -> Iterator[dict]:
    for name in args.configs:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        result = run_isolated(name, args.epochs, args.train_size, args.threads, args.seed)
        seconds = ", ".join(f"{s:.2f}" for s in result["epoch_seconds"])
        cpu = ", ".join(f"{s:.2f}" for s in result["epoch_cpu_seconds"])
        print(f"[bench] {name}: epochs [{seconds}] s wall, [{cpu}] s CPU, peak {result['peak_rss_mib']:.0f} MiB",
              file=sys.stderr, flush=True)
        yield result


def build_report(args: argparse.Namespace, raw: Sequence[dict]) -> dict:
    """The JSON report: ``meta``, per-configuration ``results`` and the ``targets``."""
    results = summarize(raw)
    meta = _meta(args, raw)
    meta["complete"] = len(raw) == len(args.configs)
    return {"meta": meta, "results": results, "targets": evaluate_targets(results)}


def print_report(report: dict) -> None:
    meta = report["meta"]
    print(f"\nTask A (digits 0-4), {meta['train_size']} training images, batch {BATCH_SIZE}, "
          f"{meta['epochs']} epoch(s) per config, {meta['num_threads']} torch thread(s); medians over epochs.\n")
    print(markdown_table(report["results"]))
    print("\nTargets:\n")
    print(targets_table(report["targets"]))


def profile_config(name: str, epochs: int, train_size: int | None, threads: int | None, seed: int, top: int = 20) -> str:
    """:func:`run_config` under :mod:`cProfile`: the ``top`` functions by own time, and the
    number of optimisation steps, so that a reader can turn totals into milliseconds per step."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    result = run_config(name, epochs, train_size, threads, seed)
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(top)
    steps = result["steps_per_epoch"] * epochs
    return f"{name}: {epochs} epoch(s), {steps} steps, data loading included\n{stream.getvalue()}"


def _read_report(path: Path) -> dict:
    """A JSON report written by ``--out``; ``ValueError`` naming the file if it is not one."""
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read the benchmark report {path}: {error}") from None
    if not isinstance(report, dict) or not isinstance(report.get("results"), list):
        raise ValueError(f"{path} is not a report of python -m pyro_bbt.bench (it has no 'results' list)")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = _resolve_defaults(parser.parse_args(argv))
    if args.compare is not None:
        try:
            before, after = (_read_report(path) for path in args.compare)
        except ValueError as error:
            parser.error(str(error))
        print(comparison_table(before, after))
        return 0
    if args.profile is not None:
        print(profile_config(args.profile, args.epochs, args.train_size, args.threads, args.seed))
        return 0
    raw: list[dict] = []
    for result in _run_all(args):
        raw.append(result)
        report = build_report(args, raw)
        atomic_write_json(args.out, report)  # after every configuration, so a killed run keeps its results
    print_report(report)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
