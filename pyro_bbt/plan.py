"""The plan of a transfer run: every unit of work and what it needs, as plain data.

For every seed: the task-A stages the methods need (``A-bayesian-sSEED``, q_A, for
``transfer`` and ``finetune``; ``A-ewc-sSEED``, the deterministic net and its Fisher, for
``ewc``), then for every fraction and method the B unit ``METHOD-fFRACTION-sSEED``, which names
the stage it needs (``None`` for ``scratch`` and ``joint``). The order is the order of the
records in ``results.json``; executors may run independent units in any order.

Building a plan trains nothing; it reads the data only to count the training images on which
the step budgets (:func:`~pyro_bbt.units.steps_for`) depend.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ExperimentConfig
from .units import load_task_pair, steps_for, unit_key

__all__ = ["StageSpec", "UnitSpec", "Plan", "build_plan", "stage_key", "STAGE_NEEDED"]

STAGE_KINDS = ("bayesian", "deterministic")
STAGE_NEEDED = {"transfer": "bayesian", "finetune": "bayesian", "ewc": "deterministic"}  # the task-A stage a B method needs


def stage_key(kind: str, seed: int) -> str:
    """The store key of a task-A stage: ``A-bayesian-sSEED`` (q_A) or ``A-ewc-sSEED`` (EWC's net)."""
    return f"A-{'bayesian' if kind == 'bayesian' else 'ewc'}-s{seed}"


@dataclass(frozen=True)
class StageSpec:
    """A task-A stage of one seed: ``kind`` ``bayesian`` (q_A) or ``deterministic`` (EWC's net,
    trained for ``steps`` steps; a Bayesian stage's steps follow from its stopping rule)."""

    seed: int
    kind: str
    steps: int

    @property
    def key(self) -> str:
        return stage_key(self.kind, self.seed)


@dataclass(frozen=True)
class UnitSpec:
    """One B unit: ``method`` on the ``fraction`` of B's data with ``seed`` for ``steps`` steps,
    after the stage ``needs`` (a :class:`StageSpec` key, or ``None``)."""

    method: str
    fraction: float
    seed: int
    steps: int
    needs: str | None

    @property
    def key(self) -> str:
        return unit_key(self.method, self.fraction, self.seed)


@dataclass(frozen=True)
class Plan:
    """The stages and units of a run, in the order of ``results.json``."""

    stages: tuple[StageSpec, ...]
    units: tuple[UnitSpec, ...]

    @property
    def order(self) -> tuple[StageSpec | UnitSpec, ...]:
        """Stages and units interleaved per seed (a seed's stages first): the order in which a
        serial executor runs them."""
        out: list[StageSpec | UnitSpec] = []
        for seed in dict.fromkeys(s.seed for s in (*self.stages, *self.units)):
            out += [s for s in self.stages if s.seed == seed] + [u for u in self.units if u.seed == seed]
        return tuple(out)

    def __len__(self) -> int:
        return len(self.stages) + len(self.units)


def build_plan(config: ExperimentConfig) -> Plan:
    """The plan of ``config``'s grid: stages per seed for the methods that need them, then a
    unit per fraction and method with its step budget (``joint``: A's and B's budgets in whole
    passes over their union)."""
    stages: list[StageSpec] = []
    units: list[UnitSpec] = []
    for seed in config.seeds:
        full = load_task_pair(config, 1.0, seed)
        steps_a = steps_for(len(full.a.train), config.epochs_a, config.batch_size)
        if any(m in config.methods for m in ("transfer", "finetune")):
            stages.append(StageSpec(seed, "bayesian", 0))
        if "ewc" in config.methods:
            stages.append(StageSpec(seed, "deterministic", steps_a))
        for fraction in config.fractions:
            n_b = len(full.b.train) if fraction == 1.0 else len(load_task_pair(config, fraction, seed).b.train)
            steps_b = steps_for(n_b, config.epochs, config.batch_size, config.min_steps)
            for method in config.methods:
                steps = steps_b
                if method == "joint":
                    steps = steps_for(len(full.a.train) + n_b, 1, config.batch_size, steps_a + steps_b)
                needs = STAGE_NEEDED.get(method)
                units.append(UnitSpec(method, fraction, seed, steps, None if needs is None else stage_key(needs, seed)))
    return Plan(tuple(stages), tuple(units))
