"""README.md is a contract: its Python example runs, and its command lines parse."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pyro
import pytest

from conftest import load_benchmark
from pyro_bbt import report, studies, transfer
from pyro_bbt.priors import PerSitePrior

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
bench = load_benchmark("bench")
# The command-line tools outside the package, run as ``python <path>`` from the repository's root.
SCRIPTS = {"bench": "benchmarks/bench.py"}


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _command(module: str) -> list[str]:
    """The words that run ``module``: ``python -m pyro_bbt.<module>``, or ``python <path>`` for a
    script outside the package (:data:`SCRIPTS`)."""
    return ["python", SCRIPTS[module]] if module in SCRIPTS else ["python", "-m", f"pyro_bbt.{module}"]


def _commands(module: str) -> list[list[str]]:
    """Arguments of every line that runs ``module`` (:func:`_command`) in the README's bash blocks."""
    prefix = _command(module)
    commands = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words[:len(prefix)] == prefix:
                commands.append(words[len(prefix):])
    return commands


def test_python_api_example_runs(single_torch_thread):
    (example,) = _blocks("python")
    shortened = example.replace("StoppingRule(max_epochs=300,", "StoppingRule(max_epochs=1, min_epochs=1,").replace(
        'kl_schedule="uniform")', 'kl_schedule="uniform", progress=False)').replace(
        "train(model, guide, a.train,", "train(model, guide, a.train.subset(256),")
    assert shortened.count("max_epochs=1") == 1 and "subset(256)" in shortened, "the README example changed its training call; update this test"
    namespace: dict = {}
    pyro.clear_param_store()  # as in a fresh process: earlier tests leave guides of other shapes in Pyro's global store
    exec(compile(shortened, "README.md", "exec"), namespace)
    prior_b, model, guide = namespace["prior_b"], namespace["model"], namespace["guide"]
    assert len(namespace["history"].epochs) == 1
    assert isinstance(prior_b, PerSitePrior)
    assert set(prior_b.sites) == set(model.site_shapes)
    for name, (loc, scale) in {n: guide.get_loc_scale(n) for n in model.site_shapes}.items():
        assert prior_b.loc(name).equal(loc.detach()) and prior_b.scale(name).equal(scale.detach())


@pytest.mark.parametrize(
    "module, parser",
    [("transfer", transfer.build_parser), ("bench", bench.build_parser), ("studies", studies.build_parser), ("report", report.build_parser)],
)
def test_readme_command_lines_parse(module, parser):
    commands = _commands(module)
    assert commands, f"no {' '.join(_command(module))} command in README.md"
    for args in commands:
        parser().parse_args(args)  # argparse exits (SystemExit) on an unknown flag or bad value


def test_readme_names_only_commands_that_exist():
    """Every ``python -m pyro_bbt.<x>`` in README.md (prose or code) names a module of the package, and
    every ``python <path>.py`` a file of the repository: a moved or renamed tool leaves no stale command."""
    modules = set(re.findall(r"python -m (pyro_bbt(?:\.\w+)+)", README))
    scripts = set(re.findall(r"python ([\w./-]+\.py)\b", README))
    assert modules and scripts, "the README names no command; this test reads nothing"
    assert sorted(m for m in modules if importlib.util.find_spec(m) is None) == []
    assert sorted(s for s in scripts if not (ROOT / s).is_file()) == []
