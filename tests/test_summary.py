"""The end-of-study summary: its dict (what tests and scripts read) on constructed tables, what it prints,
and a real multi-budget study of the tiny kit through ``run_study``."""

from __future__ import annotations

import math

import pytest
from rich.console import Console

from ablate.search import Arm
from ablate.summary import _arm_table, _budget_lines, describe_arm, summarize

CONTROL = [2.00, 2.10, 2.05]
DEEPER = [1.97, 2.06, 2.03]  # below the control in every repeat: -0.03, -0.04, -0.02


def point(method, m, repeat, objective, *, budget, lr=None, val_loss=None, n=4, state="complete") -> dict:
    return {"state": state, "base": "b", "method": method, "n": n, "m": m, "repeat": repeat, "lr": lr,
            "budget_tokens": budget, "val_loss": objective if val_loss is None else val_loss, "objective": objective}


def trial(method, m, objective, state="complete") -> dict:
    return {"state": state, "base": "b", "method": method, "n": 4, "m": m, "objective": objective}


def study_tables(repeats: int = 3, budgets=(1000, 4000)):
    """Trial rows and budget rows of a study: control (m = 2), m = 0, MoE, the no-CPT reference."""
    points, trials = [], [trial("nocpt", None, 3.0)]
    points.append(point("nocpt", None, 0, 3.0, budget=0))
    for i, budget in enumerate(budgets):
        shift = -0.5 * i  # every arm gains with the budget
        for r in range(repeats):
            points += [point("dus", 2, r, CONTROL[r] + shift, budget=budget),
                       point("dus", 0, r, DEEPER[r] + shift + (0.06 if i else 0.0), budget=budget),
                       point("moe", None, r, CONTROL[r] + shift + 0.001, budget=budget)]
    last = [p for p in points if p["budget_tokens"] == budgets[-1]]
    trials += [trial(p["method"], p["m"], p["objective"]) for p in last]
    trials.append(trial("dus", 1, None, state="fail"))
    return trials, points


def test_summary_dict_per_budget_point():
    trials, points = study_tables()
    s = summarize(trials, "minimize", points)["b"]
    assert (s["complete"], s["failed"], s["nocpt"], s["budgets"], s["budget"]) == (10, 1, 3.0, [1000, 4000], 4000)
    assert s["best_m"] == 2 and s["control"] == pytest.approx(sum(CONTROL) / 3 - 0.5)  # m = 0 loses at 4000
    assert s["moe"] == pytest.approx(s["control"] + 0.001)
    gaps = {(g["budget"], g["arm"]): g for g in s["gaps"]}
    assert sorted(gaps) == [(1000, "DUS m=0"), (1000, "MoE"), (4000, "DUS m=0"), (4000, "MoE")]
    early, late = gaps[(1000, "DUS m=0")], gaps[(4000, "DUS m=0")]
    half = 4.302652729911275 * 0.01 / math.sqrt(3)  # t(0.975, 2) x sd / sqrt(pairs)
    assert early["arm_minus_control"] == pytest.approx(-0.03) and early["lo"] == pytest.approx(-0.03 - half)
    assert (early["verdict"], late["verdict"], early["pairs"]) == ("better", "worse", 3)
    assert late["arm_minus_control"] == pytest.approx(0.03)
    assert gaps[(1000, "MoE")]["verdict"] == "worse"  # +0.001 in every pair: sd 0, the interval is a point
    best = {b["budget"]: b for b in s["best_by_budget"]}
    assert (best[1000]["best_m"], best[4000]["best_m"]) == (0, 2)
    assert best[4000]["control_verdict"] == "is the control" and best[1000]["control_verdict"] == "better"
    (rho,) = s["spearman"]  # three arms: m = 0 first at 1000, last at 4000
    assert (rho["budget"], rho["next_budget"], rho["arms"]) == (1000, 4000, 3) and rho["rho"] == pytest.approx(-0.5)
    assert s["lr_choices"] == [] and s["repeats"] == 3 and s["intervals"] is True
    assert isinstance(s["gaps"][0]["pairs"], int) and s["gaps"][1]["m"] is None  # plain Python, JSON-ready


def test_single_budget_and_one_repeat_say_there_are_no_intervals():
    trials, points = study_tables(repeats=1, budgets=(1000,))
    s = summarize(trials, "minimize", points)["b"]
    assert s["budgets"] == [1000] and s["spearman"] == [] and s["intervals"] is False
    assert {g["verdict"] for g in s["gaps"]} == {"one pair: no interval"}
    assert all(g["lo"] is None for g in s["gaps"])
    console = Console(record=True, width=100)
    notes = _budget_lines(console, {**s, "base": "b"}, "minimize", "tokens")
    text = console.export_text()
    assert "one pair: no interval" in text and "the best m at each budget point" not in text  # one point only
    assert "95% interval" not in text.split("\n", 2)[1]  # no column of dashes
    console = Console(record=True, width=100)
    console.print(_arm_table({**s, "base": "b"}, "tokens"))
    assert "objective by m after 1,000 CPT tokens" in console.export_text()
    assert any("no intervals" in line for line in notes) and not any("Spearman" in line for line in notes)


def test_without_budget_rows_the_summary_is_the_trials_last_scores():
    trials, _ = study_tables()
    s = summarize(trials, "minimize")["b"]
    assert set(s) == {"n", "by_m", "best_m", "best", "control", "moe", "complete", "pruned", "failed"}
    assert s["best_m"] == 2 and s["by_m"][0][2] == 3


def test_lr_grid_every_arm_at_its_best_lr():
    points = [point("nocpt", None, 0, 3.0, budget=0)]
    for r in range(2):  # the control's held-out loss is lower at 1e-3, m = 0's at 3e-3
        points += [point("dus", 2, r, 2.0 + 0.01 * r, lr=1e-3, val_loss=3.0, budget=1000),
                   point("dus", 2, r, 1.0, lr=3e-3, val_loss=3.1, budget=1000),
                   point("dus", 0, r, 1.9, lr=1e-3, val_loss=3.2, budget=1000),
                   point("dus", 0, r, 1.95 + 0.01 * r, lr=3e-3, val_loss=3.05, budget=1000)]
    trials = [trial(p["method"], p["m"], p["objective"]) for p in points]
    s = summarize(trials, "minimize", points)["b"]
    assert s["by_m"][2][0] == pytest.approx(2.005) and s["by_m"][0][0] == pytest.approx(1.955)
    assert s["lr_by_m"] == {0: 3e-3, 2: 1e-3} and s["best_m"] == 0
    assert [(c["arm"], c["lr"]) for c in s["lr_choices"]] == [("DUS m=0", 3e-3), ("DUS m=2", 1e-3)]
    (gap,) = s["gaps"]
    assert (gap["lr"], gap["control_lr"]) == (3e-3, 1e-3) and gap["arm_minus_control"] == pytest.approx(-0.05)
    console = Console(record=True, width=120)
    _budget_lines(console, {**s, "base": "b"}, "minimize", "tokens")
    text = console.export_text()
    assert "control lr" in text and "the lr of each arm, chosen on held-out loss" in text
    assert "0.001: 3.0000 (2), 0.003: 3.1000 (2)" in text


def test_printed_tables_fit_a_100_column_terminal():
    trials, points = study_tables()
    s = summarize(trials, "minimize", points)["b"]
    console = Console(record=True, width=100)
    notes = _budget_lines(console, {**s, "base": "b"}, "minimize", "tokens")
    text = console.export_text()
    assert all(len(line) <= 100 for line in text.splitlines())
    assert "arm - control (DUS m=2, same CPT), paired by repeat; negative is better" in text
    assert "[-0.0548, -0.0052]" in text and "better" in text and "worse" in text and "1,000" in text
    assert any(line.startswith("Spearman's rho") and "-0.50 (3 arms" in line for line in notes)
    console = Console(record=True, width=100)
    console.print(_arm_table({**s, "base": "b"}, "tokens"))
    assert "objective by m at the last budget point, 4,000 CPT tokens" in console.export_text()


def test_describe_arm_shows_the_lr_only_when_set():
    assert describe_arm(Arm("tiny", "dus", 1, 0, lr=1e-3)) == "tiny dus m=1 lr=0.001 repeat 0"
    assert describe_arm(Arm("tiny", "dus", 1, 0)) == "tiny dus m=1 repeat 0"
    assert describe_arm(Arm("tiny", "moe", None, 2, lr=3e-3)) == "tiny moe lr=0.003 repeat 2"


def test_a_multi_budget_study_summary(home, tmp_path, capsys):
    """The tiny kit with budgets [256, 512], two repeats of m = 0 and the control: paired gaps at both points."""
    from ablate.config import parse_config
    from ablate.study import run_study

    train = {"schedule": "wsd", "warmup_tokens": 128, "cooldown": 0.25, "tokens_per_step": 128, "budgets": [256, 512],
             "micro_batch_size": 4, "lr": 1e-3, "eval_every": 2, "eval_rows": 8, "precision": "fp32"}
    config = parse_config(home.tree("budgets", train=train, repeats=2, methods={"dus": True, "moe": None},
                                    bases=[{"model": str(home.base), "label": "tiny", "m": [0, 2]}]))
    summary = run_study(config, trials=5, out=tmp_path, progress=False)
    s = summary["tiny"]
    assert s["budgets"] == [256, 512] and s["nocpt"] is not None and s["complete"] == 5
    assert [(g["budget"], g["arm"], g["pairs"]) for g in s["gaps"]] == [(256, "DUS m=0", 2), (512, "DUS m=0", 2)]
    assert all(g["lo"] <= g["arm_minus_control"] <= g["hi"] for g in s["gaps"])
    assert [(r["budget"], r["next_budget"], r["arms"]) for r in s["spearman"]] == [(256, 512, 2)]
    assert s["by_m"][2][2] == 2 and s["control"] == s["by_m"][2][0]
    out = capsys.readouterr().out
    assert "arm - control (DUS m=2, same CPT)" in out and "no CPT" in out and "Spearman" in out
