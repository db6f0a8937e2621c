"""The uncertainty study: every guide and two non-Bayesian baselines on task A, scored on A's
test digits, on rotated and noisy copies of them, and on digits never seen.

``python -m pyro_bbt.studies uncertainty [--preset quick|paper]``. Per seed:

* every guide of :data:`~pyro_bbt.guides.GUIDES` is fitted on A the way q_A is fitted in the
  transfer experiment (:class:`~pyro_bbt.experiment.ExperimentConfig`'s recipe: uniform KL
  weights, Adam from lr 1e-2 with the widths at ``scale_lr``, minibatches of ``batch_size_a``,
  the stopping rule with its learning-rate drops, at most ``max_epochs`` epochs); the rule's
  verdict is recorded with every row. The flows' own parameters train at ``flow_lr``
  (:func:`~pyro_bbt.guides.guide_parameter_groups` says why), and with ``warm_start="meanfield"``
  (the default) each guide whose family contains the mean-field Gaussian (``lowrank``,
  ``planar``, ``iaf``: :data:`~pyro_bbt.guides.WARM_GUIDES`) starts at the same seed's fitted
  ``meanfield`` posterior (:func:`~pyro_bbt.guides.start_from_posterior`) and goes on at the
  rates that fit ended with until the rule holds (:func:`fit_guide`); its row records that
  start (``started_from``). Fitted afresh by q_A's recipe they stopped far from it: ``lowrank``
  at an ELBO of about -6e5 against the mean-field optimum's -1.0e4 (though it contains it, with
  ``F = 0``), the flows on plateaus at 0.24--0.71 accuracy or at the cap;
* a fit *learnt* A when its accuracy on A's test digits is at least ``learnt_accuracy``: the
  rule's verdict alone cannot tell a plateau from an optimum (an earlier recipe left ``planar``
  at 0.24 accuracy with the rule satisfied), so the table counts both;
* a deterministic MLP and a deep ensemble of ``ensemble_size`` of them (Lakshminarayanan et
  al. 2017: independent initialisations and data orders, averaged softmax), same
  architecture and data, Adam at ``net_lr`` for ``net_epochs`` epochs in minibatches of 128;
* each predictor is scored (:func:`pyro_bbt.uncertainty.score`) on every set of
  :func:`~pyro_bbt.uncertainty.shift_suite`, with ``eval_samples`` posterior samples for
  the guides; AUROC of telling A's test digits from unseen digits by predictive entropy and by
  mutual information; reliability diagrams on A's test set and its 45-degree rotation;
  histograms of entropy and mutual information on A test and unseen digits.

Writes ``uncertainty.json``, ``uncertainty.md`` (mean ± std over seeds), ``uncertainty.png``,
``reliability.png`` and ``shift.png`` into ``--out``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .data import Task, load_task
from .engine import Unit, UnitOutcome, run_study_units
from .executors import Executor
from .runstore import RunStore
from .ewc import MLP, DeterministicTrainConfig, train_deterministic
from .experiment import ExperimentConfig
from .fitting import fit_posterior
from .guides import GUIDES, WARM_GUIDES, posterior_loc_scale, start_from_posterior
from .stats import format_mean_std, sample_std
from .uncertainty import (
    IN_DISTRIBUTION,
    NOISE_STDS,
    ROTATIONS,
    UNSEEN,
    auroc,
    bayesian_log_probs,
    decompose,
    network_log_probs,
    predictive_log_mean,
    reliability,
    score,
    shift_name,
    shift_suite,
)

__all__ = ["UncertaintyConfig", "UNCERTAINTY_PRESETS", "PREDICTORS", "fit_guide", "plan_units", "run_unit", "uncertainty_study", "reused_rows",
           "uncertainty_table", "guide_rows", "plot_uncertainty", "plot_reliability", "plot_shift"]

DETERMINISTIC, ENSEMBLE, NETS = "deterministic", "ensemble", "nets"
TASK_A, TASK_B = Task(digits=(0, 1, 2, 3, 4), name="A"), Task(digits=(5, 6, 7, 8, 9), name="B")
COST_ORDER: tuple[str, ...] = ("iaf", "planar", "lowrank", "meanfield", "normal", "delta")  # slowest first (s / epoch, docs/studies.md)
PREDICTORS: tuple[str, ...] = (*GUIDES, DETERMINISTIC, ENSEMBLE)
RELIABILITY_SETS: tuple[str, ...] = (IN_DISTRIBUTION, shift_name("rotation", 45.0))
HISTOGRAM_BINS = 30
WARM_STARTS: tuple[str, ...] = ("meanfield", "fresh")  # where lowrank's and the flows' fits start: the fitted meanfield posterior, or afresh


@dataclass
class UncertaintyConfig:
    """What the study fits and scores. ``max_epochs`` caps every guide's fit by the stopping
    rule; ``limit_train`` / ``limit_eval`` shrink the data for smoke runs."""

    predictors: tuple[str, ...] = PREDICTORS
    seeds: tuple[int, ...] = (0, 1, 2)
    hidden: tuple[int, ...] = (400, 400)
    max_epochs: int = 300
    min_epochs: int = 5
    ensemble_size: int = 5
    net_epochs: int = 10
    net_lr: float = 1e-3
    eval_samples: int = 32
    rotations: tuple[float, ...] = ROTATIONS
    noise_stds: tuple[float, ...] = NOISE_STDS
    limit_train: int | None = None
    limit_eval: int | None = None
    flow_lr: float = 1e-5
    warm_start: str = "meanfield"
    learnt_accuracy: float = 0.9
    experiment: dict = field(default_factory=dict)  # overrides of ExperimentConfig's fitting recipe

    def __post_init__(self) -> None:
        unknown = [p for p in self.predictors if p not in PREDICTORS]
        if unknown or not self.predictors:
            raise ValueError(f"unknown predictor {', '.join(unknown) or '(none given)'}; allowed: {', '.join(PREDICTORS)}")
        for name in ("max_epochs", "min_epochs", "ensemble_size", "net_epochs", "eval_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.min_epochs > self.max_epochs:
            raise ValueError(f"min-epochs ({self.min_epochs}) must not exceed max-epochs ({self.max_epochs})")
        if self.warm_start not in WARM_STARTS:
            raise ValueError(f"unknown warm-start {self.warm_start!r}; allowed: {', '.join(WARM_STARTS)}")
        if not (isinstance(self.flow_lr, (int, float)) and math.isfinite(self.flow_lr) and self.flow_lr > 0):
            raise ValueError(f"flow-lr must be a finite number > 0, got {self.flow_lr!r}")
        if not (isinstance(self.learnt_accuracy, (int, float)) and 0 <= self.learnt_accuracy <= 1):
            raise ValueError(f"learnt-accuracy must lie in [0, 1], got {self.learnt_accuracy!r}")

    @property
    def warm_guides(self) -> tuple[str, ...]:
        """The guides of :data:`~pyro_bbt.guides.WARM_GUIDES` asked for, which start from the same
        seed's fitted ``meanfield`` posterior (none with ``warm_start="fresh"``)."""
        return tuple(p for p in self.predictors if p in WARM_GUIDES) if self.warm_start == "meanfield" else ()

    def fitting(self, guide: str, seed: int) -> ExperimentConfig:
        """The transfer experiment's recipe for q_A with ``guide``, with this study's cap."""
        return ExperimentConfig(guide=guide, hidden=self.hidden, seeds=(seed,), epochs_a=self.min_epochs, max_epochs_a=self.max_epochs,
                                **self.experiment)


UNCERTAINTY_PRESETS = {
    # Everything on 4,000 training images, a few epochs, one seed: a smoke run of the study.
    "quick": dict(seeds=(0,), max_epochs=6, ensemble_size=3, net_epochs=3, eval_samples=16, limit_train=4000, limit_eval=1000),
    "paper": dict(),
}


def fit_guide(config: UncertaintyConfig, guide_name: str, train_split, seed: int, kl_schedule: str | None = None,
              start: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
    """``guide_name`` fitted on ``train_split`` by q_A's recipe (:meth:`UncertaintyConfig.fitting`,
    the flows' transforms at ``config.flow_lr``), optionally under another KL schedule; returns
    ``(model, guide, convergence, history)``, the convergence report (with the blank-pixel ratio)
    as a dict.

    With ``start`` (site -> ``(loc, scale)`` of a fitted posterior,
    :func:`~pyro_bbt.guides.start_from_posterior`) the fit goes on from there at the rates the
    recipe ends with, ``lr_a * lr_factor^lr_drops`` for the locations and ``scale_lr *
    lr_factor^lr_drops`` for the widths, and the rule stops it without further drops. A fresh
    Adam at ``lr_a`` would first move every one of the 478k coordinates by about ``lr_a``
    whatever its gradient, and knock the start off its optimum. Measured on seed 0, ``planar``
    started at the fitted ``meanfield`` (ELBO -1.0e4) went to -3.0e4 after one epoch and
    -2.0e6 after eight at q_A's starting rates with its flows at 1e-3, and stayed at -1.0e4
    (0.989 test accuracy, the rule met after 7 epochs) at the final rates with its flows at
    ``flow_lr = 1e-5``."""
    experiment = config.fitting(guide_name, seed)
    if kl_schedule is not None:
        experiment = replace(experiment, kl_schedule=kl_schedule)
    model, guide = experiment.new_posterior(experiment.base_prior(), seed)
    recipe = replace(experiment.recipe_a(), flow_lr=config.flow_lr)
    if start is not None:  # go on where that fit stopped: at its last rates, without further drops
        start_from_posterior(guide, start)
        recipe = recipe.refined(experiment.lr_drops, experiment.lr_factor)
    fit = fit_posterior(model, guide, train_split, recipe, seed)
    return model, guide, fit.convergence, fit.history


def _fit_nets(config: UncertaintyConfig, count: int, train_split, seed: int) -> list[MLP]:
    sizes = (train_split.x.shape[1], *config.hidden, int(train_split.y.max()) + 1)
    steps = config.net_epochs * math.ceil(len(train_split) / 128)
    nets = []
    for member in range(count):
        member_seed = 1000 * seed + member
        torch.manual_seed(member_seed)
        net = MLP(sizes)
        train_deterministic(net, train_split.x, train_split.y, DeterministicTrainConfig(config.net_lr, 128, steps, member_seed))
        nets.append(net.eval())
    return nets


MI_FLOOR = 1e-4  # mutual information is histogrammed on a log axis from here (smaller values, and 0, in the first bin)


def histogram_edges(quantity: str, top: float) -> np.ndarray:
    """Bin edges: linear on ``[0, log C]`` for entropy, logarithmic on ``[1e-4, log C]`` for
    mutual information (most of it is tiny on any input)."""
    if quantity == "entropy":
        return np.linspace(0.0, top, HISTOGRAM_BINS + 1)
    return np.geomspace(MI_FLOOR, top, HISTOGRAM_BINS + 1)


def _histogram(values: torch.Tensor, quantity: str, top: float) -> list[int]:
    edges = histogram_edges(quantity, top)
    return np.histogram(values.double().clamp(float(edges[0]), top).numpy(), bins=edges)[0].tolist()


def _score_predictor(log_probs_of, suite: dict, num_classes: int) -> dict:
    """Scores on every set of ``suite`` of a predictor given as ``x -> (S, N, C)``."""
    sets, detail = {}, {}
    for name, (split, labelled) in suite.items():
        log_probs = log_probs_of(split.x)
        sets[name] = score(log_probs, split.y if labelled else None).to_dict()
        if name in (IN_DISTRIBUTION, UNSEEN) or name in RELIABILITY_SETS:
            detail[name] = (log_probs, split.y)
    (a_lp, _), (u_lp, _) = detail[IN_DISTRIBUTION], detail[UNSEEN]
    a_total, _, a_mi = decompose(a_lp)
    u_total, _, u_mi = decompose(u_lp)
    top = math.log(num_classes)
    return {
        "sets": sets,
        "auroc_entropy": auroc(a_total, u_total),
        "auroc_mutual_information": auroc(a_mi, u_mi),
        "reliability": {name: reliability(predictive_log_mean(detail[name][0]).exp(), detail[name][1]) for name in RELIABILITY_SETS if name in detail},
        "histograms": {"top": top,
                       "entropy": {IN_DISTRIBUTION: _histogram(a_total, "entropy", top), UNSEEN: _histogram(u_total, "entropy", top)},
                       "mutual_information": {IN_DISTRIBUTION: _histogram(a_mi, "mutual_information", top),
                                              UNSEEN: _histogram(u_mi, "mutual_information", top)}},
    }


def _suite(config: UncertaintyConfig) -> dict:
    return shift_suite(TASK_A, TASK_B, config.rotations, config.noise_stds, config.limit_eval)


def _train_split(config: UncertaintyConfig, seed: int):
    return load_task(Task(digits=TASK_A.digits, seed=seed, name="A"), limit_train=config.limit_train).train


def _row(predictor: str, seed: int, fit_seconds: float, convergence: dict | None, scores: dict, seconds_per_epoch: float | None = None,
         learnt_accuracy: float = 0.0, started_from: dict | None = None) -> dict:
    return {"predictor": predictor, "seed": seed, "fit_seconds": fit_seconds, "seconds_per_epoch": seconds_per_epoch, "convergence": convergence,
            "learnt": scores["sets"][IN_DISTRIBUTION]["accuracy"] >= learnt_accuracy, "started_from": started_from, **scores}


def plan_units(config: UncertaintyConfig) -> list[tuple[str, int]]:
    """The study's independent units of work, ``(what, seed)``: one per guide and seed, and one
    ``"nets"`` unit per seed that fits the deterministic net and the ensemble's members (the
    deterministic net is the ensemble's first member). Guides that start from the fitted
    ``meanfield`` posterior (:attr:`UncertaintyConfig.warm_guides`) have no unit of their own:
    the seed's ``"meanfield"`` unit fits them after it (and fits ``meanfield`` for them even when
    its own row is not asked for). Costliest units first, so that a pool of workers ends
    together."""
    order = {guide: rank for rank, guide in enumerate(COST_ORDER)}
    warm = config.warm_guides
    guides = [p for p in config.predictors if p in GUIDES and p not in warm]
    if warm and "meanfield" not in guides:
        guides.append("meanfield")
    guides = sorted(guides, key=lambda g: -1 if (g == "meanfield" and warm) else order.get(g, len(order)))
    units = [(guide, seed) for guide in guides for seed in config.seeds]
    if {DETERMINISTIC, ENSEMBLE} & set(config.predictors):
        units += [(NETS, seed) for seed in config.seeds]
    return units


def run_unit(config: UncertaintyConfig, unit: tuple[str, int], suite: dict | None = None) -> list[dict]:
    """The rows of one unit (see :func:`plan_units`); depends on nothing but ``config`` and
    ``unit``, so units may run in any order and in any process. ``suite``: the scored sets
    (:func:`~pyro_bbt.uncertainty.shift_suite`), if the caller has built them already."""
    what, seed = unit
    suite = _suite(config) if suite is None else suite
    train_split, num_classes = _train_split(config, seed), len(TASK_A.digits)
    if what == NETS:
        count = config.ensemble_size if ENSEMBLE in config.predictors else 1
        start = time.perf_counter()
        nets = _fit_nets(config, count, train_split, seed)
        net_seconds = time.perf_counter() - start
        rows = []
        for predictor in (p for p in config.predictors if p in (DETERMINISTIC, ENSEMBLE)):
            members = nets[:1] if predictor == DETERMINISTIC else nets
            scores = _score_predictor(lambda x, members=members: network_log_probs(members, x), suite, num_classes)
            rows.append(_row(predictor, seed, net_seconds * len(members) / len(nets), None, scores, learnt_accuracy=config.learnt_accuracy))
        return rows
    rows = []

    def fit_and_score(guide_name: str, start: dict | None = None, started_from: dict | None = None):
        begin = time.perf_counter()
        model, guide, convergence, history = fit_guide(config, guide_name, train_split, seed, start=start)
        fit_seconds = time.perf_counter() - begin
        if guide_name in config.predictors:  # a meanfield fitted only to start the others is not scored
            scores = _score_predictor(lambda x: bayesian_log_probs(model, guide, x, config.eval_samples, seed=seed), suite, num_classes)
            per_epoch = float(np.median([e["seconds"] for e in history]))
            rows.append(_row(guide_name, seed, fit_seconds, convergence, scores, per_epoch, config.learnt_accuracy, started_from))
        return model, guide, convergence, fit_seconds

    model, guide, convergence, fit_seconds = fit_and_score(what)
    if what == "meanfield" and config.warm_guides:
        posterior = posterior_loc_scale(guide, model)
        started_from = {"guide": "meanfield", "epochs": convergence["epochs"], "converged": convergence["converged"], "fit_seconds": fit_seconds}
        for richer in config.warm_guides:
            fit_and_score(richer, posterior, started_from)
    return rows


def _log_rows(rows: list[dict], log) -> None:
    for row in rows:
        a, convergence = row["sets"][IN_DISTRIBUTION], row["convergence"]
        verdict = "" if convergence is None else f", {convergence['epochs']} epochs, {'converged' if convergence['converged'] else 'NOT converged'}"
        start = row["started_from"]
        verdict += "" if start is None else f" (from {start['guide']}, {'converged' if start['converged'] else 'NOT converged'})"
        verdict += "" if row["learnt"] else ", did NOT learn A"
        log(f"{row['predictor']:>13} seed {row['seed']}: A acc {a['accuracy']:.4f}, ECE {a['ece']:.4f}, AUROC unseen by entropy "
            f"{row['auroc_entropy']:.3f}, by MI {row['auroc_mutual_information']:.3f}; fit {row['fit_seconds']:.0f} s{verdict}")


def reused_rows(config: UncertaintyConfig, run_dirs: list[Path]) -> tuple[list[dict], dict[str, str]]:
    """The rows of earlier runs of this study (``uncertainty.json`` in each of ``run_dirs``)
    for the predictors of ``config`` they hold for every seed of ``config``, and for each such
    predictor the directory it came from. Their configuration must equal ``config``'s in
    everything but ``predictors`` (the same seeds, recipe, sets and sample counts), else
    ``ValueError`` naming the first difference; a predictor found in two of them is taken from
    the first."""
    wanted = dict(config_to_dict(config))
    wanted.pop("predictors")
    rows: list[dict] = []
    sources: dict[str, str] = {}
    for run_dir in run_dirs:
        path = Path(run_dir) / "uncertainty.json"
        try:
            saved = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"--reuse {run_dir}: no uncertainty.json there (is it a python -m pyro_bbt.studies uncertainty output?)") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"--reuse {run_dir}: {path} is not valid JSON ({error})") from None
        theirs = dict(saved.get("config", {}))
        theirs.pop("predictors", None)
        mine = json.loads(json.dumps(wanted))  # tuples as lists, as they were saved
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key) != theirs.get(key):
                raise ValueError(f"--reuse {run_dir}: its configuration differs in {key!r} ({theirs.get(key)!r} there, {mine.get(key)!r} here)")
        try:  # the rows' wall-clock fields, kept apart since the study runs through the engine
            timing = json.loads((Path(run_dir) / "timing.json").read_text()).get("rows", {})
        except (FileNotFoundError, json.JSONDecodeError, AttributeError):
            timing = {}
        for predictor in config.predictors:
            found = [with_timing(r, timing.get(f"{r['predictor']}-s{r['seed']}")) for r in saved["rows"]
                     if r["predictor"] == predictor and r["seed"] in config.seeds]
            if predictor not in sources and sorted(r["seed"] for r in found) == sorted(config.seeds):
                rows += found
                sources[predictor] = str(run_dir)
    return rows, sources


TIMING_KEYS = ("fit_seconds", "seconds_per_epoch")  # a row's wall-clock fields (timing.json, not uncertainty.json)


def unit_key(unit: tuple[str, int]) -> str:
    """The engine's key of a unit of :func:`plan_units`: ``"<what>-s<seed>"``."""
    what, seed = unit
    return f"{what}-s{seed}"


def uncertainty_unit(config: UncertaintyConfig, unit: tuple[str, int], checkpoint: dict | None = None, on_checkpoint=None) -> UnitOutcome:
    """:func:`run_unit` as a unit of the study engine (:mod:`pyro_bbt.engine`): its rows in the
    record. Its fits keep no epoch checkpoints: a unit killed mid-fit runs again from its start
    on resume (the units finished before the kill are read back)."""
    return UnitOutcome({"status": "ok", "rows": run_unit(config, tuple(unit))})


def without_timing(row: dict) -> dict:
    """``row`` without its wall-clock fields (:data:`TIMING_KEYS`, also in ``started_from``)."""
    out = {k: v for k, v in row.items() if k not in TIMING_KEYS}
    if out.get("started_from"):
        out["started_from"] = {k: v for k, v in out["started_from"].items() if k not in TIMING_KEYS}
    return out


def row_timing(row: dict) -> dict:
    """The wall-clock fields of ``row`` (:func:`without_timing` leaves them out)."""
    out = {k: row[k] for k in TIMING_KEYS if k in row}
    if row.get("started_from") and "fit_seconds" in row["started_from"]:
        out["started_from_fit_seconds"] = row["started_from"]["fit_seconds"]
    return out


def with_timing(row: dict, timing: dict | None) -> dict:
    """``row`` with the wall-clock fields ``timing`` (:func:`row_timing`) put back (``None``:
    ``row`` as it is)."""
    if not timing:
        return row
    out = {**row, **{k: timing[k] for k in TIMING_KEYS if k in timing}}
    if out.get("started_from") and "started_from_fit_seconds" in timing:
        out["started_from"] = {**out["started_from"], "fit_seconds": timing["started_from_fit_seconds"]}
    return out


def uncertainty_study(config: UncertaintyConfig, log=print, workers: int = 1, reuse: list[dict] | None = None,
                      executor: Executor | None = None, store: RunStore | None = None, progress: bool = False) -> list[dict]:
    """One row per predictor and seed (see the module docstring), seeds outer, predictors in
    ``config.predictors``' order. The units of :func:`plan_units` run through the study engine
    (:func:`~pyro_bbt.engine.run_study_units`) on ``executor`` (default: ``workers`` worker processes,
    or this process when 1; one torch thread per unit either way, so the rows do not depend on
    the executor); with ``store`` every finished unit is kept and a rerun on it resumes.
    ``reuse``: rows of earlier runs of the same configuration (:func:`reused_rows`); their
    predictors are not fitted again."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    reuse = list(reuse or [])
    done = {r["predictor"] for r in reuse}
    missing = tuple(p for p in config.predictors if p not in done)
    plan = plan_units(replace(config, predictors=missing)) if missing else []
    units = [Unit(unit_key(unit), uncertainty_unit, (replace(config, predictors=missing), unit)) for unit in plan]
    outcomes = run_study_units(units, "uncertainty study", executor, workers, store, progress=progress,
                               on_finish=lambda unit, outcome: _log_rows(outcome.record.get("rows", []), log))
    rows = reuse + [row for unit in units for row in outcomes[unit.key].record["rows"]]
    rank = {p: i for i, p in enumerate(config.predictors)}
    return sorted(rows, key=lambda r: (config.seeds.index(r["seed"]), rank[r["predictor"]]))


def fit_converged(row: dict) -> bool:
    """The rule's verdict on a guide's row; a fit started from another posterior
    (``started_from``) counts as converged only when that posterior's fit did too."""
    start = row["started_from"]
    return row["convergence"]["converged"] and (start is None or start["converged"])


def _mean_std(values: list[float | None]) -> str:
    return format_mean_std(values, digits=3)


def guide_rows(rows: list[dict]) -> list[dict]:
    """The guides' rows of the study in :func:`pyro_bbt.studies.guides_table`'s form: A's test
    accuracy, NLL and ECE, median seconds per epoch, epochs and the stopping rule's verdict."""
    out = []
    for row in rows:
        if row["convergence"] is None:
            continue
        a = row["sets"][IN_DISTRIBUTION]
        out.append({"guide": row["predictor"], "seed": row["seed"], "accuracy": a["accuracy"], "nll": a["nll"], "ece": a["ece"],
                    "seconds_per_epoch": row["seconds_per_epoch"], "fit_seconds": row["fit_seconds"], "epochs": row["convergence"]["epochs"],
                    "converged": fit_converged(row)})
    return out


def uncertainty_table(rows: list[dict]) -> str:
    """Markdown: per predictor, mean ± std over seeds of A's test accuracy and ECE, the AUROCs
    against unseen digits, accuracy and ECE at 45 and 90 degrees and at the largest noise, how
    many of its fits the stopping rule called converged and how many learnt A (``learnt``)."""
    predictors = list(dict.fromkeys(r["predictor"] for r in rows))
    sets = list(rows[0]["sets"])
    rot45, rot90 = shift_name("rotation", 45.0), shift_name("rotation", 90.0)
    noise = [s for s in sets if s.startswith("noise")]
    columns = [(f"{IN_DISTRIBUTION}: accuracy", IN_DISTRIBUTION, "accuracy"), (f"{IN_DISTRIBUTION}: ECE", IN_DISTRIBUTION, "ece")]
    for name in (rot45, rot90, *(noise[-1:])):
        if name in sets:
            columns += [(f"{name}: accuracy", name, "accuracy"), (f"{name}: ECE", name, "ece")]
    lines = ["| predictor | " + " | ".join(c[0] for c in columns) + " | AUROC unseen, entropy | AUROC unseen, MI | converged fits | fits that learnt A | seeds |",
             "|---|" + "---|" * (len(columns) + 5)]
    for predictor in predictors:
        group = [r for r in rows if r["predictor"] == predictor]
        cells = [_mean_std([r["sets"][s][k] for r in group]) for _, s, k in columns]
        verdicts = [fit_converged(r) for r in group if r["convergence"] is not None]
        converged = f"{sum(verdicts)}/{len(verdicts)}" if verdicts else "—"
        lines.append(f"| {predictor} | " + " | ".join(cells) + f" | {_mean_std([r['auroc_entropy'] for r in group])} | "
                     f"{_mean_std([r['auroc_mutual_information'] for r in group])} | {converged} | {sum(r['learnt'] for r in group)}/{len(group)} | {len(group)} |")
    return "\n".join(lines) + "\n"


def _by_predictor(rows: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["predictor"], []).append(row)
    return grouped


def plot_uncertainty(rows: list[dict], path: Path) -> None:
    """Per predictor: histograms (summed over seeds) of predictive entropy (top row) and mutual
    information (bottom row, log axis; a deterministic net's is 0) on A's test digits and on
    unseen digits."""
    from .plots import save_figure, plt

    grouped = _by_predictor(rows)
    fig, axes = plt.subplots(2, len(grouped), figsize=(2.6 * len(grouped), 5), squeeze=False)
    for col, (predictor, group) in enumerate(grouped.items()):
        top = group[0]["histograms"]["top"]
        for row_index, quantity in enumerate(("entropy", "mutual_information")):
            ax = axes[row_index][col]
            edges = histogram_edges(quantity, top)
            for name, colour in ((IN_DISTRIBUTION, "tab:blue"), (UNSEEN, "tab:red")):
                counts = np.sum([r["histograms"][quantity][name] for r in group], axis=0)
                ax.stairs(counts / max(counts.sum(), 1), edges, fill=True, alpha=0.5, color=colour, label=name)
            ax.set_yscale("log")
            if quantity == "mutual_information":
                ax.set_xscale("log")
            ax.set_title(predictor if row_index == 0 else "", fontsize=9)
            ax.set_xlabel("entropy (nats)" if quantity == "entropy" else "mutual information (nats)", fontsize=8)
    axes[0][0].set_ylabel("fraction of inputs")
    axes[1][0].set_ylabel("fraction of inputs")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


def plot_reliability(rows: list[dict], path: Path) -> None:
    """Per predictor, the reliability diagram (pooled over seeds) on A's test set and on its
    45-degree rotation: accuracy against confidence per bin, the diagonal is calibrated."""
    from .plots import save_figure, plt

    grouped = _by_predictor(rows)
    fig, axes = plt.subplots(1, len(grouped), figsize=(2.6 * len(grouped), 2.9), squeeze=False)
    for ax, (predictor, group) in zip(axes[0], grouped.items()):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        for name, marker in zip(RELIABILITY_SETS, ("o", "s")):
            bins: dict[int, list] = {}
            for row in group:
                for b in row["reliability"].get(name, []):
                    bins.setdefault(b["bin"], []).append(b)
            conf = [np.average([b["confidence"] for b in v], weights=[b["count"] for b in v]) for v in bins.values()]
            acc = [np.average([b["accuracy"] for b in v], weights=[b["count"] for b in v]) for v in bins.values()]
            ax.plot(conf, acc, marker=marker, ms=3, lw=1, label=name)
        ax.set(title=predictor, xlabel="confidence", xlim=(0, 1), ylim=(0, 1))
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


def plot_shift(rows: list[dict], path: Path) -> None:
    """Accuracy and ECE (mean ± std over seeds) against rotation angle and noise level."""
    from .plots import save_figure, plt

    grouped = _by_predictor(rows)
    sets = list(rows[0]["sets"])
    axes_of = {"rotation": [0.0] + [float(s.split()[1]) for s in sets if s.startswith("rotate")],
               "noise": [0.0] + [float(s.split()[1]) for s in sets if s.startswith("noise")]}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for col, (kind, levels) in enumerate(axes_of.items()):
        names = [IN_DISTRIBUTION] + [shift_name(kind, v) for v in levels[1:]]
        for predictor, group in grouped.items():
            for row_index, metric in enumerate(("accuracy", "ece")):
                values = np.array([[r["sets"][n][metric] for n in names] for r in group])
                std = [sample_std(list(values[:, i])) for i in range(values.shape[1])]
                axes[row_index][col].errorbar(levels, values.mean(0), yerr=std, marker="o", ms=3, capsize=2, label=predictor)
        axes[0][col].set(title=f"A's test digits under {kind}", ylabel="accuracy")
        axes[1][col].set(xlabel="degrees" if kind == "rotation" else "noise std (scaled pixels)", ylabel="ECE (15 bins)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=7)
    save_figure(fig, path)


def config_to_dict(config: UncertaintyConfig) -> dict:
    """The study's configuration with the fitting recipe it implies (for ``uncertainty.json``)."""
    fitting = asdict(config.fitting("meanfield", config.seeds[0]))
    for name in ("guide", "seeds"):
        fitting.pop(name)
    return asdict(config) | {"fitting": fitting}
