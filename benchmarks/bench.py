"""Speed and memory benchmark of pyro_bbt's training against plain-PyTorch references.

Run ``python benchmarks/bench.py`` from the repository's root (``--help`` for the flags). This
script is not part of the installed package: it imports ``pyro_bbt`` like any user's code, and
the peers it compares against come with ``pip install -e ".[bench]"``. Every configuration trains on
task A of split MNIST (digits 0-4, :func:`pyro_bbt.data.load_task`, its ``train`` split,
minibatches of 128, Adam with lr 1e-3) for ``--epochs`` epochs, and the wall-clock seconds
of every epoch are recorded. After the timed epochs (outside the timing and after the peak
memory is read) each configuration's ``test_accuracy`` on task A's ``test`` split is
recorded, so that a configuration that is fast because it is broken shows: the argmax of
the predictive mean ``(1/8) sum_s softmax(f(x; w_s))`` over 8 weight samples for the
Bayesian ones (:func:`pyro_bbt.evaluation.evaluate` with ``num_samples=8`` for pyro_bbt's
and ``pyro-autonormal-svi``), of one forward pass for ``torch-deterministic``.

What is measured
----------------
Plain-PyTorch references, with their training loops written here:

* ``torch-deterministic``: the deterministic MLP 784-400-400-5 (:class:`pyro_bbt.ewc.MLP`),
  cross-entropy -- the cost floor of one pass over the data;
* ``torch-bbb-16``: Bayes by Backprop (Blundell et al. 2015) written by hand: mean-field
  Gaussian weights ``N(mu, softplus(rho)^2)``, 16 independent weight samples per step drawn
  at once and pushed through the net with ``torch.baddbmm``, closed-form
  ``KL(q || N(0, 1))`` with weight 1 on every step (the minibatch's likelihood is scaled by
  ``N/B``: each step's loss is an unbiased estimate of the full-data negative ELBO, as in
  Pyro's ``Trace_ELBO``);
* ``torch-lrt``: the same posterior trained with local reparameterisation (one sample of
  the pre-activations per example).

pyro_bbt, through :func:`pyro_bbt.inference.train` with ``eval_samples=0`` (the epoch
seconds come from its history; epoch 1 includes the guide's setup, hence medians; other
settings are :class:`~pyro_bbt.inference.TrainConfig`'s defaults, e.g. the ``blundell`` KL
schedule, which changes the KL's weight per step but not the cost of a step):

* ``meanfield-local-1``: the default training (``meanfield`` guide, ``local`` estimator);
* ``meanfield-local-1-plain``: the same through the plain Pyro path (``fast=False``: the guide
  traced every step, autograd's KL, Adam's ``foreach`` kernel), the library before the fast path;
* ``meanfield-local-1-compiled``: the default with ``TrainConfig(compile=True)``: the step as one
  function under ``torch.compile``; it is compiled (for both minibatch shapes of an epoch) on
  a throwaway guide before the timed epochs, and that time is reported as ``compile_seconds``;
* ``meanfield-weights-16`` / ``meanfield-weights-1``: weight sampling with 16 / 1 particles;
* ``normal-weights-16``: Pyro's AutoNormal with 16 weight-sampling particles.

Peers: the implementations a user would pick instead of pyro_bbt, each the MLP
784-400-400-5 with ReLU, trained in the references' loop (same minibatch order, one weight
sample per step, Adam lr 1e-3). A peer whose package is not installed is skipped with one
line naming it (``pip install -e ".[bench]"`` installs them); naming it in ``--configs`` is
an error.

* ``bayes-torch-reparam``: bayesian-torch's ``LinearReparameterization`` layers (one weight
  sample per minibatch, shared by its examples), prior ``N(0, 1)`` (``prior_mean=0``,
  ``prior_variance=1``; the library uses that value as the prior's standard deviation),
  ``posterior_rho_init = softplus^{-1}(0.01)``, ``posterior_mu_init=0`` (the default). The
  library draws ``rho ~ N(posterior_rho_init, 0.1)`` and ``mu ~ N(posterior_mu_init, 0.1)``
  for weights and biases alike, so ``sigma = log1p(exp(rho))`` has median 0.01 (95% within
  [0.0082, 0.0122]) where the references' is exactly 0.01, and the means have standard
  deviation 0.1 where the references draw weight means like ``nn.Linear`` (uniform, at most
  1/sqrt(fan-in) = 0.036 / 0.05) and start bias means at 0. Loss: the references'
  ``(N/B) sum_n CE + KL(q || N(0, 1))`` with the closed-form KL summed over every weight
  and bias. The layers' own KL (``kl_div``, also what ``get_kl_loss`` sums) is the *mean* over
  a tensor's elements, so the benchmark calls the layers with ``dnn_to_bnn_flag`` set (no KL
  in ``forward``) and sums ``kl_div(...) * numel`` per tensor, once per step.
* ``bayes-torch-flipout``: the same with ``LinearFlipout`` (Wen et al. 2018: one weight
  perturbation per minibatch, decorrelated per example by random signs; two matmuls per
  layer), same initialisation and loss.
* ``blitz``: blitz's ``BayesianLinear`` layers, prior ``prior_dist=Normal(0, 1)`` (a single
  Gaussian: the same as ``prior_pi=1, prior_sigma_1=1`` without evaluating the unused second
  component of its scale mixture), ``posterior_rho_init = softplus^{-1}(0.01)`` (blitz's
  ``sigma = log1p(exp(rho))``), ``posterior_mu_init=0``, drawn with standard deviation 0.1
  as in bayesian-torch. Loss ``(N/B) sum_n CE + KL`` where ``KL`` is
  ``blitz.losses.kl_divergence_from_nn``: ``log q(w) - log p(w)`` at the step's weight sample,
  a one-sample Monte Carlo estimate of ``KL(q || N(0, 1))`` (unbiased but noisier than the
  closed form; blitz adds 1e-6 to the prior density before its log).
* ``pyro-autonormal-svi``: Pyro written the obvious way: :class:`pyro_bbt.model.BayesianMLP`
  (``PyroSample`` weights with the ``N(0, 1)`` prior), ``AutoNormal(model, init_scale=0.01)``
  (its default ``init_to_feasible`` starts every mean at 0), ``SVI(model, guide,
  pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())`` and one ``svi.step(x, y, N)`` per minibatch
  (its first epoch includes AutoNormal's setup at the first step).
  Its loss is the plain negative-ELBO estimate ``(N/B) sum_n CE + log q(w) - log p(w)`` (the
  data plate scales the likelihood by N/B; one-sample Monte Carlo KL), the same objective as
  the references' with a Monte Carlo KL; its zero initial means show in the accuracy column.

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
ratio is ``null`` when its reference was not among ``--configs``. ``ratio_to_fastest_peer``
(``x fastest peer``) divides by the smallest median among the peers that ran (``null`` when
none did): below 1, a configuration is faster than every installed alternative. The
accuracies are from a few epochs at most and carry the objectives' differences above (the
KL's weight, the initialisation); read them as a sanity check, not a ranking. The machine's
load adds noise to every number (each result records the 1-minute load average before and after it);
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
prints where its time goes (profile before optimising; the test accuracy is not computed);
``--compare BEFORE AFTER`` prints a before/after table of two JSON reports (speed-up of each
configuration's median, and each report's own ratios to the references).

The targets (issue #11) are printed after the table: the default training
(``meanfield-local-1``) at most 1.0x bayesian-torch's ``LinearReparameterization`` and 1.1x
the hand-written ``torch-lrt``, and, the stretch, 2.5x the deterministic MLP; its prediction
(32 weight samples over task A's 5,139 test images, ``predict_seconds``: the median over rounds of one call
of :func:`pyro_bbt.evaluation.evaluate`, against bayesian-torch's loop of 32 forward passes) at
most 1.0x bayesian-torch's; ``meanfield-weights-16`` at most 1.0x ``torch-bbb-16``; the
default training's peak memory at most 2 GiB.

Rounds: ``--rounds R`` (default 3) runs every configuration once per round, in turn, so that
a slow spell of the machine falls on every configuration alike; a configuration's median is
the median over rounds of each round's median epoch.
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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from torch import Tensor, nn

from bench_common import INSTALL_HINT, bayes_torch_net, load_average, missing_package, name_list, positive_int, select_available
from pyro_bbt.data import Split, Task, load_task
from pyro_bbt.evaluation import evaluate
from pyro_bbt.ewc import MLP
from pyro_bbt.files import atomic_write_json
from pyro_bbt.guides import GuideConfig, make_guide
from pyro_bbt.inference import TrainConfig, train
from pyro_bbt.model import BayesianMLP

__all__ = [
    "BenchConfig",
    "CONFIGS",
    "TARGETS",
    "missing_package",
    "select_configs",
    "predictive_accuracy",
    "run_config",
    "summarize",
    "evaluate_targets",
    "build_report",
    "main",
]

TASK_DIGITS: tuple[int, ...] = (0, 1, 2, 3, 4)
SIZES: tuple[int, ...] = (784, 400, 400, 5)
BATCH_SIZE = 128
LR = 1e-3
INIT_SCALE = 0.01
DEFAULT_EPOCHS = 3
DEFAULT_ROUNDS = 3
QUICK_EPOCHS = 2
QUICK_TRAIN_SIZE = 2048
DETERMINISTIC = "torch-deterministic"
BBB16 = "torch-bbb-16"
LRT = "torch-lrt"
BAYES_TORCH_REPARAM = "bayes-torch-reparam"
PEER = "peer"
EVAL_SAMPLES = 8
PREDICT_SAMPLES = 32  # prediction timing: the predictive mean over 32 weight samples of task A's test set
PREDICT_REPEATS = 1  # per round; the report takes the median over rounds
MIB = 1024 * 1024


@dataclass(frozen=True)
class BenchConfig:
    """One benchmarked training setup.

    :param name: the name used by ``--configs`` and in the output.
    :param kind: ``"torch"`` (a reference written in this module), ``"pyro"`` (pyro_bbt) or
        ``"peer"`` (another library, trained in this module's loop).
    :param description: one line for the reader.
    :param guide: pyro_bbt guide name (``kind == "pyro"``).
    :param estimator: pyro_bbt estimator name (``kind == "pyro"``).
    :param num_particles: Monte Carlo samples per step.
    :param module: the module a peer imports (``None``: nothing beyond pyro_bbt's dependencies).
    :param package: the pip distribution that provides ``module``.
    :param fast: pyro_bbt's fast path (:class:`~pyro_bbt.inference.TrainConfig` ``fast``); ``False``
        is the plain Pyro path, the library before :mod:`pyro_bbt.fused`.
    """

    name: str
    kind: str
    description: str
    guide: str | None = None
    estimator: str | None = None
    num_particles: int = 1
    module: str | None = None
    package: str | None = None
    fast: bool = True
    compile: bool = False


CONFIGS: dict[str, BenchConfig] = {
    c.name: c
    for c in (
        BenchConfig(DETERMINISTIC, "torch", "plain PyTorch deterministic MLP (ewc.MLP), Adam, cross-entropy"),
        BenchConfig(BBB16, "torch", "plain PyTorch Bayes by Backprop, 16 weight samples via baddbmm", num_particles=16),
        BenchConfig(LRT, "torch", "plain PyTorch local reparameterisation, 1 sample"),
        BenchConfig("meanfield-local-1", "pyro", "pyro_bbt meanfield guide, local estimator", "meanfield", "local", 1),
        BenchConfig("meanfield-local-1-plain", "pyro", "pyro_bbt meanfield guide, local estimator, plain path (fast=False)", "meanfield",
                    "local", 1, fast=False),
        BenchConfig("meanfield-local-1-compiled", "pyro", "pyro_bbt meanfield guide, local estimator, step under torch.compile "
                    "(TrainConfig(compile=True); compiled before the timed epochs)", "meanfield", "local", 1, compile=True),
        BenchConfig("meanfield-weights-16", "pyro", "pyro_bbt meanfield guide, weights estimator, 16 particles", "meanfield", "weights", 16),
        BenchConfig("normal-weights-16", "pyro", "pyro_bbt AutoNormal guide, weights estimator, 16 particles", "normal", "weights", 16),
        BenchConfig("meanfield-weights-1", "pyro", "pyro_bbt meanfield guide, weights estimator, 1 particle", "meanfield", "weights", 1),
        BenchConfig("bayes-torch-reparam", PEER, "bayesian-torch LinearReparameterization MLP, 1 sample",
                    module="bayesian_torch", package="bayesian-torch"),
        BenchConfig("bayes-torch-flipout", PEER, "bayesian-torch LinearFlipout MLP, 1 sample",
                    module="bayesian_torch", package="bayesian-torch"),
        BenchConfig("blitz", PEER, "blitz BayesianLinear MLP, 1 sample, Monte Carlo KL",
                    module="blitz", package="blitz-bayesian-pytorch"),
        BenchConfig("pyro-autonormal-svi", PEER, "plain Pyro: BayesianMLP + AutoNormal + SVI(Trace_ELBO), 1 sample"),
    )
}


def select_configs(names: Sequence[str] | None, configs: Mapping[str, BenchConfig] = CONFIGS) -> tuple[list[str], list[str]]:
    """The configurations to run, and one line for each one skipped
    (:func:`bench_common.select_available`): ``names=None`` (no ``--configs``) selects every
    configuration, skipping those whose package is missing; naming such a one raises."""
    return select_available(names, configs)


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
    Target("local_vs_bayes_torch", "meanfield-local-1", "ratio_to_bayes_torch_reparam", 1.0, "x",
           "default training (meanfield local) <= 1.0x bayesian-torch LinearReparameterization"),
    Target("local_vs_lrt", "meanfield-local-1", "ratio_to_lrt", 1.1, "x",
           "default training (meanfield local) <= 1.1x hand-written local reparameterisation (torch-lrt)"),
    Target("local_vs_deterministic", "meanfield-local-1", "ratio_to_deterministic", 2.5, "x",
           "stretch: default training (meanfield local) <= 2.5x the deterministic MLP"),
    Target("compiled_vs_deterministic", "meanfield-local-1-compiled", "ratio_to_deterministic", 2.5, "x",
           "stretch, opt-in: meanfield local with compile=True <= 2.5x the deterministic MLP"),
    Target("predict_vs_bayes_torch", "meanfield-local-1", "predict_ratio_to_bayes_torch_reparam", 1.0, "x",
           "prediction, 32 weight samples over A's 5,139 test images (evaluate) <= 1.0x bayesian-torch's loop"),
    Target("weights16_vs_bbb16", "meanfield-weights-16", "ratio_to_bbb16", 1.0, "x",
           "16-particle weight sampling (meanfield weights 16) <= 1.0x torch-bbb-16"),
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
"""One optimisation step on a minibatch ``(x, y)``; returns the loss."""

SampleLogits = Callable[[Tensor, int], Tensor]
"""Inputs ``(B, D)`` and ``S`` -> logits ``(S, B, C)`` under ``S`` weight samples (``(B, C)``: one network)."""


@dataclass(frozen=True)
class Trainer:
    """A configuration trained by this module's loop: its step, and its accuracy on a split with a
    number of weight samples."""

    step: StepFn
    accuracy: Callable[[Split, int], float]


@torch.no_grad()
def predictive_accuracy(sample_logits: SampleLogits, split: Split, num_samples: int = 8, batch_size: int = 1000) -> float:
    """Accuracy of the argmax of the predictive mean ``(1/S) sum_s softmax(logits_s)`` on ``split``
    with ``S = num_samples``, in batches of ``batch_size`` inputs."""
    correct = 0
    for x, y in split.batches(batch_size, shuffle=False):
        logits = sample_logits(x, num_samples)
        probs = logits.softmax(-1) if logits.dim() == 2 else logits.softmax(-1).mean(0)
        correct += int((probs.argmax(-1) == y).sum())
    return correct / len(split)


def _minibatch_loss(nll: Tensor, kl: Tensor, batch_size: int, num_data: int) -> Tensor:
    """``nll * (N / B) + KL``: the per-step loss of the Bayesian references and of the peers with
    a loop written here (``nll`` summed over the ``B`` examples), an unbiased estimate of the
    full-data negative ELBO as in Pyro's ``Trace_ELBO`` (the KL's weight is 1 on every step)."""
    return nll * (num_data / batch_size) + kl


def _adam_step(parameters: Iterable[Tensor], loss_fn: Callable[[Tensor, Tensor], Tensor]) -> StepFn:
    """A step of ``torch.optim.Adam`` (lr ``LR``) on ``loss_fn(x, y)``."""
    optimizer = torch.optim.Adam(parameters, lr=LR)

    def step(x: Tensor, y: Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(x, y)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def _deterministic_trainer(num_data: int) -> Trainer:
    net = MLP(SIZES)
    step = _adam_step(net.parameters(), lambda x, y: F.cross_entropy(net(x), y))
    return Trainer(step, partial(predictive_accuracy, lambda x, _: net(x)))


def _bayesian_trainer(num_data: int, num_samples: int | None) -> Trainer:
    """BBB with ``num_samples`` weight samples per step, or local reparameterisation for ``None``.

    Loss: ``(N/B) * mean_s sum_n CE(logits_{s,n}, y_n) + KL(q || N(0, 1))``.
    """
    posterior = MeanFieldMLP(SIZES, INIT_SCALE)

    def loss(x: Tensor, y: Tensor) -> Tensor:
        q = posterior.loc_scale()
        if num_samples is None:
            nll = F.cross_entropy(MeanFieldMLP.local_reparameterized_logits(q, x), y, reduction="sum")
        else:
            logits = MeanFieldMLP.sampled_logits(q, x, num_samples)
            nll = F.cross_entropy(logits.flatten(0, 1), y.repeat(num_samples), reduction="sum") / num_samples
        return _minibatch_loss(nll, MeanFieldMLP.kl_to_standard_normal(q), x.shape[0], num_data)

    def sample_logits(x: Tensor, num_samples: int) -> Tensor:
        return MeanFieldMLP.sampled_logits(posterior.loc_scale(), x, num_samples)

    return Trainer(_adam_step(posterior.parameters(), loss), partial(predictive_accuracy, sample_logits))


# --------------------------------------------------------------------------- peers


def _sequential_mlp(make_layer: Callable[[int, int], nn.Module]) -> nn.Sequential:
    """The MLP ``SIZES`` with ReLU between the layers that ``make_layer(d_in, d_out)`` builds."""
    modules: list[nn.Module] = []
    for index, (d_in, d_out) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        if index:
            modules.append(nn.ReLU())
        modules.append(make_layer(d_in, d_out))
    return nn.Sequential(*modules)


def bayes_torch_mlp(layer: str) -> nn.Sequential:
    """bayesian-torch's ``layer`` (``"LinearReparameterization"`` or ``"LinearFlipout"``) MLP ``SIZES``
    with a ``N(0, 1)`` prior and ``sigma = log1p(exp(rho))`` initialised around ``INIT_SCALE``
    (:func:`bench_common.bayes_torch_net`, as ``converge.py``'s row builds it).

    Every layer has ``dnn_to_bnn_flag`` set, so that it returns its output only; the KL comes
    from :func:`bayes_torch_kl`.
    """
    return bayes_torch_net(SIZES, 1.0, INIT_SCALE, layer)


def bayes_torch_kl(net: nn.Module) -> Tensor:
    """Closed-form ``KL(q || prior)`` of bayesian-torch layers, summed over every weight and bias:
    each tensor's ``kl_div`` (the library's mean over its elements) times its element count."""
    from bayesian_torch.layers.base_variational_layer import BaseVariationalLayer_

    total = torch.zeros(())
    for layer in net.modules():
        if isinstance(layer, BaseVariationalLayer_):
            for mu, rho, prior_mu, prior_sigma in (
                (layer.mu_weight, layer.rho_weight, layer.prior_weight_mu, layer.prior_weight_sigma),
                (layer.mu_bias, layer.rho_bias, layer.prior_bias_mu, layer.prior_bias_sigma),
            ):
                total = total + layer.kl_div(mu, torch.log1p(torch.exp(rho)), prior_mu, prior_sigma) * mu.numel()
    return total


def blitz_mlp() -> nn.Sequential:
    """blitz's ``BayesianLinear`` MLP with a ``N(0, 1)`` prior and ``sigma = log1p(exp(rho))``
    initialised around ``INIT_SCALE``."""
    from blitz.modules import BayesianLinear

    return _sequential_mlp(lambda d_in, d_out: BayesianLinear(
        d_in, d_out, prior_dist=torch.distributions.Normal(0.0, 1.0), posterior_rho_init=_softplus_inverse(INIT_SCALE)
    ))


def blitz_kl(net: nn.Module) -> Tensor:
    """blitz's one-sample Monte Carlo KL, ``log q(w) - log p(w)`` at the weights of ``net``'s last call."""
    from blitz.losses import kl_divergence_from_nn

    return kl_divergence_from_nn(net)


def _module_trainer(
    build: Callable[[], nn.Module], kl: Callable[[nn.Module], Tensor], num_data: int
) -> Trainer:
    """A peer whose module (``build()``) draws fresh weights at every call: one sample per step, the
    predictive mean over ``S`` calls (bayesian-torch's and blitz's own way to predict). ``kl(net)`` is evaluated after the step's forward pass."""
    net = build()

    def loss(x: Tensor, y: Tensor) -> Tensor:
        nll = F.cross_entropy(net(x), y, reduction="sum")
        return _minibatch_loss(nll, kl(net), x.shape[0], num_data)

    def sample_logits(x: Tensor, num_samples: int) -> Tensor:
        return torch.stack([net(x) for _ in range(num_samples)])

    return Trainer(_adam_step(net.parameters(), loss), partial(predictive_accuracy, sample_logits))


def _pyro_accuracy(model: BayesianMLP, guide) -> Callable[[Split, int], float]:
    """Accuracy of a Pyro guide's predictive mean over ``S`` weight samples, by
    :func:`pyro_bbt.evaluation.evaluate` (which computes all its metrics, as a user's call does)."""
    return lambda split, num_samples: evaluate(model, guide, split.x, split.y, num_samples=num_samples).accuracy


def autonormal_svi() -> tuple[BayesianMLP, AutoNormal, SVI]:
    """Pyro written the obvious way, on an empty param store: ``BayesianMLP`` (``N(0, 1)`` prior),
    ``AutoNormal(model, init_scale=INIT_SCALE)`` and ``SVI`` with ``Trace_ELBO`` and Adam."""
    pyro.clear_param_store()
    model = BayesianMLP(SIZES)
    guide = AutoNormal(model, init_scale=INIT_SCALE)
    return model, guide, SVI(model, guide, pyro.optim.Adam({"lr": LR}), Trace_ELBO())


def _autonormal_svi_trainer(num_data: int) -> Trainer:
    model, guide, svi = autonormal_svi()
    return Trainer(lambda x, y: svi.step(x, y, num_data), _pyro_accuracy(model, guide))


TrainerFactory = Callable[[int], Trainer]
"""``num_data -> Trainer``: builds a configuration's network, optimiser and step."""

TRAINERS: dict[str, TrainerFactory] = {
    DETERMINISTIC: _deterministic_trainer,
    BBB16: partial(_bayesian_trainer, num_samples=CONFIGS[BBB16].num_particles),
    LRT: partial(_bayesian_trainer, num_samples=None),
    "bayes-torch-reparam": partial(_module_trainer, partial(bayes_torch_mlp, "LinearReparameterization"), bayes_torch_kl),
    "bayes-torch-flipout": partial(_module_trainer, partial(bayes_torch_mlp, "LinearFlipout"), bayes_torch_kl),
    "blitz": partial(_module_trainer, blitz_mlp, blitz_kl),
    "pyro-autonormal-svi": _autonormal_svi_trainer,
}
"""The configurations trained by this module's loop (references and peers)."""


# ------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    """Wall-clock and process-CPU seconds of each epoch, the trained configuration's accuracy,
    and (``compile=True``) the seconds its untimed compilation took."""

    seconds: list[float]
    cpu_seconds: list[float]
    accuracy: Callable[[Split, int], float]
    compile_seconds: float | None = None


def _time_step_epochs(config: BenchConfig, split: Split, epochs: int, seed: int) -> Timing:
    """Time the epochs of a configuration in :data:`TRAINERS` (a reference or a peer)."""
    torch.manual_seed(seed)
    num_data = len(split)
    trainer = TRAINERS[config.name](num_data)
    order = torch.Generator().manual_seed(seed)
    seconds, cpu_seconds = [], []
    for _ in range(epochs):
        start, cpu_start = time.perf_counter(), time.process_time()
        for x, y in split.batches(BATCH_SIZE, shuffle=True, generator=order):
            loss = trainer.step(x, y)
            if not math.isfinite(loss):
                raise FloatingPointError(f"{config.name}: loss is {loss}")
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
    return Timing(seconds, cpu_seconds, trainer.accuracy)


# ----------------------------------------------------------------------- pyro_bbt


def _time_pyro_epochs(config: BenchConfig, split: Split, epochs: int, seed: int) -> Timing:
    """Wall-clock seconds of each epoch of :func:`pyro_bbt.inference.train` (from its history)
    and process-CPU seconds (between its ``on_epoch`` calls, the first from the call of ``train``)."""
    train_config = TrainConfig(
        epochs=epochs,
        batch_size=BATCH_SIZE,
        lr=LR,
        num_particles=config.num_particles,
        estimator=config.estimator,
        seed=seed,
        eval_samples=0,
        progress=False,
        fast=config.fast,
        compile=config.compile,
    )
    compile_seconds = None
    if config.compile:  # compile for both batch shapes of an epoch on a throwaway guide, untimed
        start = time.perf_counter()
        pyro.clear_param_store()
        warm_model = BayesianMLP(SIZES)
        warm_size = BATCH_SIZE + (len(split) % BATCH_SIZE)
        train(warm_model, make_guide(config.guide, warm_model, GuideConfig(init_scale=INIT_SCALE)), split.subset(warm_size),
              replace(train_config, epochs=1))
        compile_seconds = time.perf_counter() - start
    pyro.clear_param_store()
    model = BayesianMLP(SIZES)
    guide = make_guide(config.guide, model, GuideConfig(init_scale=INIT_SCALE))
    cpu_marks = [time.process_time()]
    history = train(model, guide, split, train_config, on_epoch=lambda _: cpu_marks.append(time.process_time()))
    cpu_seconds = [b - a for a, b in zip(cpu_marks[:-1], cpu_marks[1:])]
    return Timing([e.seconds for e in history.epochs], cpu_seconds, _pyro_accuracy(model, guide), compile_seconds)


# ------------------------------------------------------------------ one configuration


def _load_splits(train_size: int | None, test_size: int | None = None) -> tuple[Split, Split]:
    """Task A's ``train`` split (its first ``train_size`` images) and its ``test`` split (its
    first ``test_size`` images; ``None``: all 5,139)."""
    task = load_task(Task(digits=TASK_DIGITS))
    return ((task.train if train_size is None else task.train.subset(train_size)),
            (task.test if test_size is None else task.test.subset(test_size)))


def run_config(
    name: str, epochs: int, train_size: int | None = None, threads: int | None = None, seed: int = 0, test: bool = True,
    test_size: int | None = None,
) -> dict:
    """Train configuration ``name`` for ``epochs`` epochs in this process; its raw measurements.

    Meant to run in a fresh process (see :func:`run_isolated`): the peak RSS is the process's,
    read before the test accuracy is computed (``test=False``: not computed, ``None``) on the
    first ``test_size`` test images (``None``: all; the prediction timing too).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    config = CONFIGS[name]
    split, test_split = _load_splits(train_size, test_size)
    rss_before = current_rss_mib()
    load_before = load_average()
    timer = _time_pyro_epochs if config.kind == "pyro" else _time_step_epochs
    timing = timer(config, split, epochs, seed)
    peak, source = peak_rss_mib()
    load_after = load_average()
    predict_seconds = None
    if test:
        predict = []
        for _ in range(PREDICT_REPEATS):
            start = time.perf_counter()
            timing.accuracy(test_split, PREDICT_SAMPLES)
            predict.append(time.perf_counter() - start)
        predict_seconds = statistics.median(predict)
    return {
        "name": name,
        "epoch_seconds": timing.seconds,
        "epoch_cpu_seconds": timing.cpu_seconds,
        "train_size": len(split),
        "test_size": len(test_split),
        "steps_per_epoch": math.ceil(len(split) / BATCH_SIZE),
        "test_accuracy": timing.accuracy(test_split, EVAL_SAMPLES) if test else None,
        "predict_seconds": predict_seconds,
        "compile_seconds": timing.compile_seconds,
        "peak_rss_mib": peak,
        "peak_rss_source": source,
        "rss_before_training_mib": rss_before,
        "num_threads": torch.get_num_threads(),
        "load_average": [load_before, load_after],
    }


def run_isolated(
    name: str, epochs: int, train_size: int | None, threads: int | None, seed: int, test_size: int | None = None
) -> dict:
    """:func:`run_config` in a freshly spawned child process (isolates timing and peak RSS)."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes=1, maxtasksperchild=1) as pool:
        return pool.apply(run_config, (name, epochs, train_size, threads, seed, True, test_size))


# ------------------------------------------------------------------------- summary


def _ratio(value: float, reference: float | None) -> float | None:
    return None if reference is None else value / reference


def merge_rounds(raw: Sequence[dict]) -> list[dict]:
    """One entry per configuration (in order of first appearance) from the results of every
    round: the epochs of all rounds, ``round_medians`` (each round's median epoch seconds, wall
    and CPU), the largest peak RSS, the last round's test accuracy."""
    groups: dict[str, list[dict]] = {}
    for r in raw:
        groups.setdefault(r["name"], []).append(r)
    merged = []
    for name, group in groups.items():
        last = group[-1]
        merged.append({
            **last,
            "epoch_seconds": [s for r in group for s in r["epoch_seconds"]],
            "epoch_cpu_seconds": [s for r in group for s in r["epoch_cpu_seconds"]],
            "round_medians": [statistics.median(r["epoch_seconds"]) for r in group],
            "round_cpu_medians": [statistics.median(r["epoch_cpu_seconds"]) for r in group],
            "predict_seconds": statistics.median(seconds) if (seconds := [r["predict_seconds"] for r in group if r.get("predict_seconds") is not None])
            else None,
            "rounds": len(group),
            "peak_rss_mib": max((r["peak_rss_mib"] for r in group if r.get("peak_rss_mib") is not None), default=last.get("peak_rss_mib")),
            "load_average": [r.get("load_average") for r in group],
        })
    return merged


def summarize(raw: Sequence[dict]) -> list[dict]:
    """Merge the rounds (:func:`merge_rounds`), and add to each configuration its median epoch
    seconds -- the median over rounds of each round's median, so that a round disturbed by
    other load counts once -- and the ratios to the references and to the fastest peer."""
    merged = merge_rounds(raw)
    medians = {r["name"]: statistics.median(r["round_medians"]) for r in merged}
    cpu_medians = {r["name"]: statistics.median(r["round_cpu_medians"]) for r in merged}
    fastest_peer = min((medians[name] for name in medians if CONFIGS[name].kind == PEER), default=None)
    predict = {r["name"]: r["predict_seconds"] for r in merged if r.get("predict_seconds") is not None}
    results = []
    for r in merged:
        median, cpu_median = medians[r["name"]], cpu_medians[r["name"]]
        results.append(
            {
                **r,
                "description": CONFIGS[r["name"]].description,
                "epochs": len(r["epoch_seconds"]) // r["rounds"],
                "median_epoch_seconds": median,
                "median_step_ms": 1000.0 * median / r["steps_per_epoch"],
                "ratio_to_deterministic": _ratio(median, medians.get(DETERMINISTIC)),
                "ratio_to_bbb16": _ratio(median, medians.get(BBB16)),
                "ratio_to_lrt": _ratio(median, medians.get(LRT)),
                "ratio_to_bayes_torch_reparam": _ratio(median, medians.get(BAYES_TORCH_REPARAM)),
                "ratio_to_fastest_peer": _ratio(median, fastest_peer),
                "predict_ratio_to_bayes_torch_reparam": _ratio(r["predict_seconds"], predict.get(BAYES_TORCH_REPARAM))
                if r.get("predict_seconds") is not None else None,
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
        "| config | median s/epoch | rounds x epochs | ms/step | x deterministic | x torch-lrt | x torch-bbb-16 | x fastest peer "
        "| test accuracy | predict s (32 samples) | peak RSS (MiB) | median CPU s/epoch | CPU x det. | CPU x bbb-16 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['median_epoch_seconds']:.2f} | {r.get('rounds', 1)} x {r['epochs']} | {r['median_step_ms']:.1f} "
            f"| {_fmt(r['ratio_to_deterministic'], '.2f', 'x')} | {_fmt(r.get('ratio_to_lrt'), '.2f', 'x')} | {_fmt(r['ratio_to_bbb16'], '.2f', 'x')} "
            f"| {_fmt(r.get('ratio_to_fastest_peer'), '.2f', 'x')} | {_fmt(r.get('test_accuracy'), '.3f')} | {_fmt(r.get('predict_seconds'), '.2f')} "
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


def _package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """The installed version of each peer package among configurations ``names``."""
    packages = {CONFIGS[name].package for name in names} - {None}
    versions: dict[str, str | None] = {}
    for package in sorted(packages):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions


def _meta(args: argparse.Namespace, raw: Sequence[dict]) -> dict:
    return {
        "task_digits": list(TASK_DIGITS),
        "sizes": list(SIZES),
        "batch_size": BATCH_SIZE,
        "lr": LR,
        "init_scale": INIT_SCALE,
        "eval_samples": EVAL_SAMPLES,
        "epochs": args.epochs,
        "rounds": args.rounds,
        "train_size": raw[0]["train_size"] if raw else None,
        "test_size": raw[0].get("test_size") if raw else None,
        "quick": args.quick,
        "seed": args.seed,
        "threads_requested": args.threads,
        "num_threads": raw[0]["num_threads"] if raw else None,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "peer_packages": _package_versions(args.configs),
        "skipped": list(getattr(args, "skipped", [])),
        "platform": platform.platform(),
        "cpu_load_note": "load_average per result: 1-min load average before and after its training",
        "isolation": "each configuration in its own spawned child process, run sequentially; the configurations take turns, once per round",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ------------------------------------------------------------------------------- CLI


def _config_list(text: str) -> list[str]:
    return name_list(text, list(CONFIGS), "configs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/bench.py",
        description="Time epochs of pyro_bbt training against plain-PyTorch references and peer libraries on "
                    "split-MNIST task A.",
    )
    parser.add_argument("--quick", action="store_true",
                        help=f"first {QUICK_TRAIN_SIZE} training images and {QUICK_EPOCHS} epochs (unless given)")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help=f"epochs per configuration (default {DEFAULT_EPOCHS}; {QUICK_EPOCHS} with --quick)")
    parser.add_argument("--train-size", type=positive_int, default=None,
                        help="use only the first N training images (default: all; "
                             f"{QUICK_TRAIN_SIZE} with --quick)")
    parser.add_argument("--test-size", type=positive_int, default=None,
                        help="score the test accuracy and time the prediction on only the first N of task A's 5,139 test "
                             "images (default: all; the predict target is stated for all)")
    parser.add_argument("--configs", type=_config_list, default=None,
                        help=f"comma-separated subset of: {', '.join(CONFIGS)} (default: all, skipping the "
                             f"peers whose package is not installed: {INSTALL_HINT})")
    parser.add_argument("--rounds", type=positive_int, default=None,
                        help=f"interleaved rounds: every configuration runs once per round, in turn, and its median is the median "
                             f"over rounds (default {DEFAULT_ROUNDS}; 1 with --quick)")
    parser.add_argument("--threads", type=positive_int, default=None,
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
    """Fill in the epochs and training size that depend on ``--quick``, and select the
    configurations: ``args.configs`` becomes the runnable ones, ``args.skipped`` one line per
    peer left out. ``ValueError`` if ``--configs`` or ``--profile`` names a peer whose package
    is missing."""
    if args.epochs is None:
        args.epochs = QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS
    if args.rounds is None:
        args.rounds = 1 if args.quick else DEFAULT_ROUNDS
    if args.train_size is None and args.quick:
        args.train_size = QUICK_TRAIN_SIZE
    if args.profile is not None:
        select_configs([args.profile])
    args.configs, args.skipped = select_configs(args.configs)
    return args


def _run_all(args: argparse.Namespace) -> Iterator[dict]:
    for line in args.skipped:
        print(f"[bench] {line}", file=sys.stderr, flush=True)
    for round_index in range(args.rounds):
        for name in args.configs:
            print(f"[bench] round {round_index + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
            result = run_isolated(name, args.epochs, args.train_size, args.threads, args.seed, args.test_size) | {"round": round_index + 1}
            seconds = ", ".join(f"{s:.2f}" for s in result["epoch_seconds"])
            cpu = ", ".join(f"{s:.2f}" for s in result["epoch_cpu_seconds"])
            print(f"[bench] {name}: epochs [{seconds}] s wall, [{cpu}] s CPU, peak {result['peak_rss_mib']:.0f} MiB, "
                  f"test accuracy {result['test_accuracy']:.3f}", file=sys.stderr, flush=True)
            yield result


def build_report(args: argparse.Namespace, raw: Sequence[dict]) -> dict:
    """The JSON report: ``meta``, per-configuration ``results`` and the ``targets``."""
    results = summarize(raw)
    meta = _meta(args, raw)
    meta["complete"] = len(raw) == len(args.configs) * args.rounds
    return {"meta": meta, "results": results, "targets": evaluate_targets(results)}


def print_report(report: dict) -> None:
    meta = report["meta"]
    print(f"\nTask A (digits 0-4), {meta['train_size']} training images, batch {BATCH_SIZE}, "
          f"{meta.get('rounds', 1)} interleaved round(s) of {meta['epochs']} epoch(s) per config, {meta['num_threads']} torch thread(s); "
          f"median over rounds of each round's median epoch; "
          f"test accuracy on {'all' if meta.get('test_size') is None else 'the first ' + str(meta['test_size']) + ' of'} "
          f"task A's test images ({EVAL_SAMPLES} weight samples).\n")
    print(markdown_table(report["results"]))
    if meta.get("skipped"):
        print("\nSkipped:\n\n" + "\n".join(f"- {line}" for line in meta["skipped"]))
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
    result = run_config(name, epochs, train_size, threads, seed, test=False)
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
        raise ValueError(f"{path} is not a report of python benchmarks/bench.py (it has no 'results' list)")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args = _resolve_defaults(args)
    except ValueError as error:
        parser.error(str(error))
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
