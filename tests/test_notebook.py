"""Execute the tutorial notebook in its tiny configuration (``PYRO_BBT_NOTEBOOK_TINY=1``).

The notebook is copied into a temporary directory and executed there, so nothing is written
into ``notebooks/``. The kernel inherits the environment of this process.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "bayesian_transfer.ipynb"

# Appended to the temporary copy: hands the notebook's results back as one JSON line.
PROBE = """import json
print("PROBE " + json.dumps({"tiny": TINY, "summary": summary, "a_before": a_before.accuracy,
                             "curves": {m: r["curve"] for m, r in runs.items()}}))"""


def _text(cell) -> str:
    return "".join(out.get("text", "") for out in cell.get("outputs", []) if out.get("output_type") == "stream")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("PYRO_BBT_NOTEBOOK_TINY", "1")
    mp.setenv("MPLBACKEND", "Agg")
    try:
        workdir = tmp_path_factory.mktemp("notebook")
        path = workdir / NOTEBOOK.name
        shutil.copy(NOTEBOOK, path)
        nb = nbformat.read(path, as_version=4)
        nb.cells.append(nbformat.v4.new_code_cell(PROBE))
        client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}})
        client.execute()
        return nb
    finally:
        mp.undo()


def test_notebook_is_clean_json():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not any(out.get("output_type") == "error" for out in cell.outputs), "the committed notebook holds an error"
    assert "--preset paper" in nb.cells[-1].source


def test_notebook_runs_tiny(executed):
    code = [c for c in executed.cells if c.cell_type == "code"]
    for cell in code:
        assert not any(out.get("output_type") == "error" for out in cell.outputs)
    assert _text(code[0]).startswith("TINY")

    probe = json.loads(_text(code[-1]).split("PROBE ", 1)[1])
    assert probe["tiny"] is True
    assert set(probe["summary"]) == {"transfer", "scratch"}
    assert 0.0 <= probe["a_before"] <= 1.0
    for row in probe["summary"].values():
        for key in ("b_test_accuracy", "a_test_accuracy_after_b"):
            assert 0.0 <= row[key] <= 1.0
    for curve in probe["curves"].values():
        steps = [step for step, _ in curve]
        assert steps[0] == 0 and steps == sorted(steps) and len(steps) >= 2
        assert all(0.0 <= acc <= 1.0 for _, acc in curve)

    # The summary cell (the last one of the notebook itself) prints one row per method.
    table = _text(code[-2])
    for method in ("transfer", "scratch"):
        row = next(line for line in table.splitlines() if line.strip().startswith(method))
        numbers = [float(x) for x in re.findall(r"[-+]?\d+\.\d+", row)]
        assert 0.0 <= numbers[0] <= 1.0 and 0.0 <= numbers[2] <= 1.0

    # The figures were drawn (image grid, sigma converging, posterior histograms, learning curves).
    sources = "\n".join(c.source for c in code)
    assert sources.count("plt.show()") == 4
