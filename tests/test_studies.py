"""Side studies on tiny data: they run, and their tables and figures hold what they claim."""

from __future__ import annotations


from pyro_bbt.guides import GUIDES
from pyro_bbt.kl_schedules import KL_SCHEDULES
from pyro_bbt.studies import (
    ABLATION_VARIANTS,
    StudyConfig,
    ablation,
    ablation_table,
    compare_guides,
    compare_schedules,
    plot_guides,
    plot_schedules,
)

TINY = StudyConfig(epochs=1, seeds=(0,), hidden=(8,), eval_samples=2, limit_train=200, limit_eval=100, min_steps=5)


def test_guides_study_covers_every_guide(tmp_path):
    rows = compare_guides(TINY, log=lambda m: None)
    assert [r["guide"] for r in rows] == list(GUIDES)
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["nll"] > 0 and row["seconds_per_epoch"] > 0
    plot_guides(rows, tmp_path / "guides.png")
    assert (tmp_path / "guides.png").stat().st_size > 0


def test_schedules_study_none_has_zero_kl(tmp_path):
    rows = compare_schedules(TINY, log=lambda m: None)
    assert [r["kl_schedule"] for r in rows] == list(KL_SCHEDULES)
    by_name = {r["kl_schedule"]: r for r in rows}
    assert by_name["none"]["history"][-1]["weighted_kl"] == 0.0
    assert by_name["blundell"]["history"][-1]["weighted_kl"] > 0.0
    plot_schedules(rows, tmp_path / "comparing_beta.png")
    assert (tmp_path / "comparing_beta.png").stat().st_size > 0


def test_ablation_runs_every_variant_with_one_budget():
    rows = ablation(TINY, log=lambda m: None)
    assert [r["variant"] for r in rows] == [v[0] for v in ABLATION_VARIANTS]
    assert len({r["steps"] for r in rows}) == 1
    assert len({r["a_test_before_accuracy"] for r in rows}) == 1  # task A fitted once, shared
    table = ablation_table(rows)
    assert table.count("\n") == len(ABLATION_VARIANTS) + 2
    for name, *_ in ABLATION_VARIANTS:
        assert name in table


def test_guides_table_is_mean_and_sample_std_per_guide():
    from pyro_bbt.studies import guides_table

    rows = [
        {"guide": "meanfield", "seed": 0, "accuracy": 0.9, "nll": 0.3, "ece": 0.01, "seconds_per_epoch": 4.0},
        {"guide": "meanfield", "seed": 1, "accuracy": 0.8, "nll": 0.5, "ece": 0.03, "seconds_per_epoch": 6.0},
        {"guide": "delta", "seed": 0, "accuracy": 0.7, "nll": 0.9, "ece": 0.05, "seconds_per_epoch": 2.0},
    ]
    lines = guides_table(rows).strip().splitlines()
    assert lines[2] == "| meanfield | 0.8500 ± 0.0707 | 0.4000 ± 0.1414 | 0.0200 ± 0.0141 | 5.0 ± 1.4 | 2 |"
    assert lines[3] == "| delta | 0.7000 ± 0.0000 | 0.9000 ± 0.0000 | 0.0500 ± 0.0000 | 2.0 ± 0.0 | 1 |"
