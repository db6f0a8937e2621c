"""README.md is a contract: its Python example runs, and its command lines parse."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pyro
import pytest

from pyro_bbt import bench, report, studies, transfer
from pyro_bbt.priors import PerSitePrior

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _commands(module: str) -> list[list[str]]:
    """Arguments of every ``python -m pyro_bbt.<module>`` line in the README's bash blocks."""
    commands = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words[:3] == ["python", "-m", f"pyro_bbt.{module}"]:
                commands.append(words[3:])
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
    assert commands, f"no python -m pyro_bbt.{module} command in README.md"
    for args in commands:
        parser().parse_args(args)  # argparse exits (SystemExit) on an unknown flag or bad value
