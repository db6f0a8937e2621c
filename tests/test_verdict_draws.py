"""benchmarks/verdict_draws.py: a running unit's posterior, read from its checkpoint, judged as
the run judges it and with added draws; its running continuation scored with more and more
draws (the standard error falls like 1/sqrt(D))."""

from __future__ import annotations

import json

import pytest

from conftest import load_benchmark
from pyro_bbt.runstore import RunStore
from pyro_bbt.transfer import main

ARGS = ["--limit-train", "200", "--limit-eval", "60", "--hidden", "8", "--seeds", "0", "--fractions", "0.5", "--epochs-a", "2",
        "--max-epochs-a", "4", "--batch-size-a", "50", "--fit-b", "rule", "--max-epochs-b", "24", "--window", "2", "--methods", "scratch",
        "--eval-samples", "2", "--epochs", "1", "--min-steps", "3", "--verdict-tol", "10", "--continuation-epochs", "4",
        "--continuation-fraction", "1", "--init-scale", "1", "--quiet"]


def test_the_bench_judges_a_running_unit_and_scores_its_continuation(tmp_path, capsys, monkeypatch, single_torch_thread):
    """A B unit whose cap (24 epochs) ends it inside a continuation (tolerance 10 nats per example:
    the line search passes at once, and widths that start at the prior's pass the blank-pixel
    check); its last checkpoint kept (the store would clear it)."""
    monkeypatch.setattr(RunStore, "clear_checkpoint", lambda self, key: None)
    out = tmp_path / "run"
    assert main([*ARGS, "--out", str(out)]) == 0
    capsys.readouterr()
    bench = load_benchmark("verdict_draws")
    model, guide, start, split, tol, (start_epoch, epoch) = bench.load_unit(out, "scratch-f0.5-s0")
    assert tol == 10 and 0 < start_epoch < epoch == 24 and len(split) > 0 and start is not None
    assert bench.main([str(out), "scratch-f0.5-s0", "--max-draws", "32", "--judgements", "2", "--out", str(tmp_path / "d.json")]) == 0
    record = json.loads((tmp_path / "d.json").read_text())
    plain, added = record["judgements"], record["judgements_added"]
    assert [j["draws"] for j in plain] == [None, None] and all(j["draws"] in (0, 8) for j in added)  # decided at once at 10 per example
    assert all(j["passes"] for j in plain + added) and plain[0]["nats"] != plain[1]["nats"]
    fixed = record["continuation"]["fixed"]
    assert [row["draws"] for row in fixed] == [8, 16, 32]
    for row in fixed:
        assert len(row["scores"]) == 2 and row["scores"][0]["nats"] != row["scores"][1]["nats"]  # noise of their own
    mean_se = [sum(s["stderr"] for s in row["scores"]) / 2 for row in fixed]
    assert mean_se[2] < mean_se[0]  # 4x the draws: about half the standard error
    assert [a["draws"] for a in record["continuation"]["added"]] == [8, 8] and all(a["passes"] for a in record["continuation"]["added"])
    assert bench.main([str(out), "scratch-f0.5-s0", "--max-draws", "32", "--judgements", "1", "--no-ladder", "--out", str(tmp_path / "e.json")]) == 0
    short = json.loads((tmp_path / "e.json").read_text())["continuation"]
    def timeless(score: dict) -> dict:
        return {k: v for k, v in score.items() if k != "seconds"}

    assert short["fixed"] == [] and [timeless(a) for a in short["added"]] == [timeless(record["continuation"]["added"][0])]
    with pytest.raises(ValueError, match="no unit 'magic-f0.5-s0'"):
        bench.load_unit(out, "magic-f0.5-s0")
    capsys.readouterr()
    assert bench.main([str(out), "magic-f0.5-s0"]) == 2 and "no unit 'magic-f0.5-s0'" in capsys.readouterr().err
    assert bench.main([str(tmp_path / "nothing"), "scratch-f0.5-s0"]) == 2 and "config.json" in capsys.readouterr().err
