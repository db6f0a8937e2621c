"""benchmarks/ngsteps.py (outside the package): a real fit on tiny data (200 images, 784-8-5,
three epochs of Adam), then two arms from that one posterior, Adam's continuation and the
verdict's natural-gradient line-search steps, each scored by the common evaluator."""

import json

import pytest

from conftest import load_benchmark

ngsteps = load_benchmark("ngsteps")

TINY = ["--problem", "small", "--limit-train", "200", "--hidden", "8", "--start-epochs", "3", "--points", "2", "--chunk", "2",
        "--eval-draws", "2", "--seconds", "600"]


def test_both_arms_start_from_one_posterior_and_the_ng_steps_raise_the_elbo(tmp_path, single_torch_thread):
    out = tmp_path / "ng.json"
    assert ngsteps.main([*TINY, "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["args"]["hidden"] == [8] and record["start"]["epochs"] == 3
    assert [p["epochs"] for p in record["adam"]] == [2, 4]
    assert len(record["ng"]) == 2 and all(0 < p["seconds"] for p in record["ng"])
    # three epochs of Adam leave a lot to gain: the line search's steps find it, and the evaluator agrees
    assert all(p["estimated_gain"] > 0 and p["step"] > 0 for p in record["ng"])
    assert record["start"]["elbo"] < record["ng"][0]["elbo"] < record["ng"][1]["elbo"]


@pytest.mark.parametrize("flags, message", [(["--seconds", "0"], "--seconds must be > 0, got 0.0"), (["--chunk", "0"], "argument --chunk:")])
def test_bad_settings_are_refused_before_any_fit(tmp_path, capsys, flags, message):
    out = tmp_path / "ng.json"
    with pytest.raises(SystemExit) as exit_info:
        ngsteps.main([*TINY, *flags, "--out", str(out)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err and not out.exists()
