"""README.md and docs/*.md are a contract: README's Python example runs, every command line in them
parses and names a tool that exists, README stays short, and every relative link resolves."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
from pathlib import Path

import pyro
import pytest

from conftest import load_benchmark
from pyro_bbt import rejudge, report, studies, transfer
from pyro_bbt.convergence import StoppingRule
from pyro_bbt.priors import PerSitePrior

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# README.md and the pages under docs/ that the bulk of it moved to: their commands are checked alike.
PAGES = {path.relative_to(ROOT).as_posix(): path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
README_MAX_LINES = 300
bench = load_benchmark("bench")
converge = load_benchmark("converge")
# The command-line tools outside the package, run as ``python <path>`` from the repository's root.
SCRIPTS = {"bench": "benchmarks/bench.py", "converge": "benchmarks/converge.py"}


def _blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _command(module: str) -> list[str]:
    """The words that run ``module``: ``python -m pyro_bbt.<module>``, or ``python <path>`` for a
    script outside the package (:data:`SCRIPTS`)."""
    return ["python", SCRIPTS[module]] if module in SCRIPTS else ["python", "-m", f"pyro_bbt.{module}"]


def _commands(module: str) -> list[tuple[str, list[str]]]:
    """(page, arguments) of every line that runs ``module`` (:func:`_command`) in the bash blocks of
    README.md and docs/*.md (:data:`PAGES`)."""
    prefix = _command(module)
    commands = []
    for page, text in PAGES.items():
        for block in _blocks("bash", text):
            for line in block.splitlines():
                words = shlex.split(line, comments=True)
                if words[:len(prefix)] == prefix:
                    commands.append((page, words[len(prefix):]))
    return commands


def test_python_api_example_runs(single_torch_thread):
    (example,) = _blocks("python")
    shortened = example.replace("TrainConfig.converged()", "TrainConfig.converged(stopping=StoppingRule(max_epochs=1, min_epochs=1), progress=False)").replace(
        "train(model, guide, a.train,", "train(model, guide, a.train.subset(256),")
    assert shortened.count("max_epochs=1") == 1 and "subset(256)" in shortened, "the README example changed its training call; update this test"
    namespace: dict = {"StoppingRule": StoppingRule}
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
    [("transfer", transfer.build_parser), ("bench", bench.build_parser), ("converge", converge.build_parser), ("studies", studies.build_parser),
     ("report", report.build_parser), ("rejudge", rejudge.build_parser)],
)
def test_readme_command_lines_parse(module, parser):
    commands = _commands(module)
    assert commands, f"no {' '.join(_command(module))} command in README.md or docs/*.md"
    for page, args in commands:
        try:
            parser().parse_args(args)  # argparse exits (SystemExit) on an unknown flag or bad value
        except SystemExit:
            pytest.fail(f"{page}: {' '.join(_command(module) + args)} does not parse")


def test_readme_names_only_commands_that_exist():
    """Every ``python -m pyro_bbt.<x>`` in README.md and docs/*.md (prose or code) names a module of the
    package, and every ``python <path>.py`` a file of the repository: a moved or renamed tool leaves no
    stale command."""
    modules = {(page, m) for page, text in PAGES.items() for m in re.findall(r"python -m (pyro_bbt(?:\.\w+)+)", text)}
    scripts = {(page, s) for page, text in PAGES.items() for s in re.findall(r"python ([\w./-]+\.py)\b", text)}
    assert modules and scripts, "README.md and docs/*.md name no command; this test reads nothing"
    assert sorted((page, m) for page, m in modules if importlib.util.find_spec(m) is None) == []
    assert sorted((page, s) for page, s in scripts if not (ROOT / s).is_file()) == []


def test_readme_is_short():
    """README.md says what the project is, how to start and what it found; the rest lives in docs/."""
    lines = len(README.splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move material to docs/"


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(text: str) -> set[str]:
    """The anchors of every heading outside code blocks, repeated ones numbered as GitHub does."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), flags=re.M):
        slug = _slug(heading)
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_relative_links_resolve():
    """Every relative link and image of README.md and docs/*.md points to a file of the repository (a
    docs page's images are ``../figs/...``), and every ``#anchor`` into a Markdown page to one of its headings."""
    broken, links = [], 0
    for page, text in PAGES.items():
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            links += 1
            path, _, anchor = target.partition("#")
            file = ((ROOT / page).parent / path).resolve() if path else ROOT / page
            if not file.is_file():
                broken.append(f"{page}: {target} (no file {os.path.relpath(file, ROOT)})")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
                broken.append(f"{page}: {target} (no heading #{anchor})")
    assert links, "README.md and docs/*.md link nothing; this test reads nothing"
    assert broken == []


def test_the_answer_table_is_what_the_report_prints_from_the_published_runs():
    """Every number of README's Answer table is the report's (``--converged-only``) over the runs
    its commands name, to the digits README prints: B mean [± std] / A after B per cell, and
    fine-tuning's then joint's in their shared row; the rows of transfer with q_B started fresh
    from the runs of their own command (a glob), "—" where those runs hold no fraction."""
    import json

    from pyro_bbt.merging import merge_transfer_runs
    from pyro_bbt.report import converged_only

    command = re.search(r"`python -m pyro_bbt\.report --converged-only ([^`]+)` \(shared: `([^`]+)`\)", README)
    assert command, "README's Answer block names no report command"
    fresh = re.search(r"`python -m pyro_bbt\.report --converged-only (figs/fresh-q-b/fresh-mh-\*)` \(shared: `(figs/fresh-q-b/fresh-shared-\*)`\)", README)
    assert fresh, "README's Answer block names no report command for q_B started fresh"
    summaries = {}
    for key, dirs in ((("multi-head", ""), command.group(1).split()), (("shared head", ""), command.group(2).split()),
                      (("multi-head", "fresh"), sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(fresh.group(1)))),
                      (("shared head", "fresh"), sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(fresh.group(2))))):
        assert dirs, key
        runs = [json.loads((ROOT / d / "results.json").read_text()) for d in dirs]
        summaries[key] = converged_only(merge_transfer_runs(runs, dirs))[0]["summary"]
    table = README.split("| head | method | 1 % of B | 10 % | 100 % |", 1)[1].split("\n\n", 1)[0]
    methods = {"scratch": ("scratch",), "transfer": ("transfer",), "transfer, q_B fresh": ("transfer",), "fine-tuning / joint": ("finetune", "joint"), "EWC": ("ewc",)}
    head, checked = None, 0
    for line in table.strip().splitlines()[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        head = cells[0] or head
        summary = summaries[(head, "fresh" if cells[1] == "transfer, q_B fresh" else "")]
        for fraction, cell in zip(("0.01", "0.1", "1.0"), cells[2:]):
            printed = re.findall(r"\d\.\d+", cell)
            if cell == "—":
                assert all(fraction not in summary[method] for method in methods[cells[1]]), (head, cells[1], fraction)
                continue
            expected = []
            for method in methods[cells[1]]:
                entry = summary[method][fraction]
                b = [entry["b_test_accuracy"]["mean"]] + ([entry["b_test_accuracy"]["std"]] if "±" in cell else [])
                expected += [*b, entry["a_test_after_accuracy"]["mean"]]
            assert len(printed) == len(expected), (head, cells[1], fraction, cell)
            for text, value in zip(printed, expected):
                digits = len(text.split(".")[1])
                assert abs(float(text) - value) <= 0.5 * 10 ** -digits + 1e-9, (head, cells[1], fraction, cell, value)
                checked += 1
    assert checked == 2 * 3 * (3 + 3 + 4 + 2) + 2 * 2 * 3  # both heads, three fractions: scratch and transfer 3 numbers a cell, fine-tuning / joint 4, EWC 2; q_B fresh at two
