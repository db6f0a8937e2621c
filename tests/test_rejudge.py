"""python -m pyro_bbt.rejudge: a finished unit is rerun bit for bit and judged again with noise of its own."""

from __future__ import annotations

import json

from pyro_bbt.rejudge import main as rejudge_main
from pyro_bbt.transfer import main

ARGS = ["--limit-train", "200", "--limit-eval", "60", "--hidden", "8", "--seeds", "0", "--fractions", "0.2", "--epochs-a", "2",
        "--max-epochs-a", "4", "--batch-size-a", "50", "--fit-b", "rule", "--max-epochs-b", "4", "--methods", "scratch,transfer,ewc",
        "--eval-samples", "2", "--epochs", "1", "--min-steps", "3", "--quiet"]


def test_rejudge_reproduces_the_recorded_verdict_and_judges_again(tmp_path, capsys, single_torch_thread):
    out = tmp_path / "run"
    assert main([*ARGS, "--out", str(out)]) == 0
    capsys.readouterr()
    for method in ("scratch", "transfer"):  # transfer's prior is rebuilt from the saved q_A
        key = f"{method}-f0.2-s0"
        convergence = json.loads((out / "units" / f"{key}.json").read_text())["record"]["convergence"]
        recorded = convergence["verdict"]
        assert rejudge_main([str(out), key, "--times", "2"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == f"{key}: {convergence['epochs']} epochs; rerun reproduces the recorded verdict: yes"
        upper = recorded["gain_upper_per_datum"]  # None where the blank-pixel check failed first (a 4-epoch fit)
        assert lines[1].startswith("recorded: gain not measured" if upper is None else f"recorded: upper {upper:.4f} nats per example")
        assert [line.split(":")[0] for line in lines[2:]] == ["judgement 1", "judgement 2"]
        assert lines[2] != lines[3]  # noise of their own


def test_rejudge_refuses_what_it_cannot_judge(tmp_path, capsys):
    assert rejudge_main([str(tmp_path), "scratch-f0.2-s0"]) == 2
    assert "config.json does not exist" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main([*ARGS, "--methods", "ewc", "--out", str(out)]) == 0
    capsys.readouterr()
    assert rejudge_main([str(out), "magic-f0.2-s0"]) == 2 and "no unit 'magic-f0.2-s0'" in capsys.readouterr().err
    assert rejudge_main([str(out), "ewc-f0.2-s0"]) == 2 and "cannot be judged: only scratch, transfer and finetune" in capsys.readouterr().err
    (out / "config.json").write_text("{broken")
    assert rejudge_main([str(out), "ewc-f0.2-s0"]) == 2 and "config.json is damaged" in capsys.readouterr().err
    assert rejudge_main([str(out), "ewc-f0.2-s0", "--times", "0"]) == 2 and "--times must be an integer >= 1, got 0" in capsys.readouterr().err
