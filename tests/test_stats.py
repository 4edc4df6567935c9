"""ablate.stats on constructed budget tables whose answers are known by hand: the paired t interval,
the verdicts, the lr chosen on held-out loss, the best m per budget point, Spearman between points."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from ablate import stats

T_975_DF2 = 4.302652729911275  # Student's t, 97.5th percentile, 2 degrees of freedom (printed tables: 4.303)


def row(method="dus", m=None, repeat=0, objective=2.0, *, base="b", n=4, budget=1000, lr=None, val_loss=None,
        state="complete", **extra) -> dict:
    return {"state": state, "base": base, "method": method, "n": n, "m": m, "repeat": repeat, "lr": lr,
            "budget_tokens": budget, "val_loss": objective if val_loss is None else val_loss,
            "objective": objective, **extra}


def frame(rows) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    df["m"] = df["m"].astype("Int64")  # as ablate.results.load_budgets gives it: integers with gaps
    return df


def arm(method, m, values, **kw) -> list[dict]:
    return [row(method, m, r, v, **kw) for r, v in enumerate(values)]


CONTROL = [2.00, 2.10, 2.05]  # repeats differ a lot (data order) ...
DEEPER = [1.97, 2.06, 2.03]  # ... but m = 0 is below the control in every repeat: -0.03, -0.04, -0.02


def test_paired_interval_by_hand():
    df = frame(arm("dus", 2, CONTROL) + arm("dus", 0, DEEPER))
    gaps = stats.paired_gaps(df, "objective", "minimize")
    assert len(gaps) == 1
    g = gaps.iloc[0]
    # differences -0.03, -0.04, -0.02: mean -0.03, sd sqrt((0 + 0.01^2 + 0.01^2) / 2) = 0.01
    half = T_975_DF2 * 0.01 / math.sqrt(3)  # 0.024841...
    assert (g["arm"], g["pairs"]) == ("DUS m=0", 3)
    assert g["arm_minus_control"] == pytest.approx(-0.03)
    assert g["sd"] == pytest.approx(0.01)
    assert (g["lo"], g["hi"]) == (pytest.approx(-0.03 - half), pytest.approx(-0.03 + half))
    assert g["lo"] == pytest.approx(-0.054841, abs=1e-6) and g["hi"] == pytest.approx(-0.005159, abs=1e-6)
    assert g["verdict"] == "better"
    assert g["arm_mean"] == pytest.approx(np.mean(DEEPER)) and g["control_mean"] == pytest.approx(np.mean(CONTROL))
    # unpaired, the two arms' 95% intervals would overlap: the pairing is what orders them
    from scipy.stats import sem

    assert np.mean(DEEPER) + T_975_DF2 * sem(DEEPER) > np.mean(CONTROL) - T_975_DF2 * sem(CONTROL)


def test_pairs_are_matched_by_repeat_not_by_row_order():
    rows = arm("dus", 2, CONTROL) + arm("dus", 0, DEEPER)
    shuffled = frame([rows[i] for i in (5, 1, 3, 0, 4, 2)])
    g = stats.paired_gaps(shuffled).iloc[0]
    assert g["arm_minus_control"] == pytest.approx(-0.03) and g["sd"] == pytest.approx(0.01)
    # repeat 2 of the arm missing: two pairs (-0.03, -0.04), t with 1 degree of freedom
    two = stats.paired_gaps(frame(rows[:5])).iloc[0]
    assert two["pairs"] == 2 and two["arm_minus_control"] == pytest.approx(-0.035)
    half = 12.706204736174696 * (0.01 / math.sqrt(2)) / math.sqrt(2)  # t(0.975, 1) = 12.706
    assert two["hi"] == pytest.approx(-0.035 + half) and two["verdict"] == "cannot be ordered"


@pytest.mark.parametrize(("values", "direction", "expected"), [
    (DEEPER, "minimize", "better"),
    (DEEPER, "maximize", "worse"),  # the same numbers as accuracies: lower is worse
    ([2.03, 2.14, 2.07], "minimize", "worse"),  # +0.03, +0.04, +0.02
    ([2.01, 2.08, 2.06], "minimize", "cannot be ordered"),  # +0.01, -0.02, +0.01: the interval covers 0
])
def test_verdicts(values, direction, expected):
    g = stats.paired_gaps(frame(arm("dus", 2, CONTROL) + arm("dus", 1, values)), "objective", direction).iloc[0]
    assert g["verdict"] == expected
    assert (g["lo"] <= 0 <= g["hi"]) == (expected == "cannot be ordered")


def test_one_pair_has_no_interval_and_no_control_gives_no_pairs():
    one = stats.paired_gaps(frame(arm("dus", 2, CONTROL[:1]) + arm("dus", 0, DEEPER[:1]))).iloc[0]
    assert one["pairs"] == 1 and one["arm_minus_control"] == pytest.approx(-0.03)
    assert math.isnan(one["lo"]) and math.isnan(one["hi"]) and one["verdict"] == "one pair: no interval"
    other = stats.paired_gaps(frame(arm("dus", 2, CONTROL[:1], budget=1000) + arm("dus", 0, DEEPER, budget=2000)))
    assert list(other["pairs"]) == [0] and list(other["verdict"]) == ["no pairs"]
    odd = frame(arm("dus", 1, CONTROL, n=3) + arm("dus", 0, DEEPER, n=3))  # n odd: no control exists
    assert stats.paired_gaps(odd).empty


def test_moe_and_every_budget_point_get_their_own_pairs():
    rows = []
    for budget, shift in ((1000, 0.0), (4000, -0.5)):
        rows += arm("dus", 2, [v + shift for v in CONTROL], budget=budget)
        rows += arm("dus", 0, [v + shift + (0.03 if budget == 4000 else -0.03) for v in CONTROL], budget=budget)
        rows += arm("moe", None, [v + shift + 0.01 + 0.001 * r for r, v in enumerate(CONTROL)], budget=budget)
    rows += [row("nocpt", None, 0, 9.0, budget=0)]  # a reference, never an arm
    rows += [row("dus", 0, 3, 0.0, state="running")]  # not finished: left out
    gaps = stats.paired_gaps(frame(rows))
    assert list(zip(gaps["budget"], gaps["arm"], strict=True)) == [(1000, "DUS m=0"), (1000, "MoE"),
                                                                   (4000, "DUS m=0"), (4000, "MoE")]
    assert list(gaps["verdict"]) == ["better", "worse", "worse", "worse"]
    assert list(gaps["arm_minus_control"]) == pytest.approx([-0.03, 0.011, 0.03, 0.011])


def test_the_point_is_the_budget_in_the_study_unit_when_the_table_has_it():
    """budget_unit flops: each arm trains its own tokens for the same FLOP budget; pairs match on ``budget``."""
    rows = arm("dus", 2, CONTROL, budget=1000, budget_point=7e12) + arm("dus", 0, DEEPER, budget=600,
                                                                        budget_point=7e12)
    df = frame(rows).rename(columns={"budget_point": "budget"})
    g = stats.paired_gaps(df)
    assert len(g) == 1 and g.iloc[0]["budget"] == 7e12 and g.iloc[0]["pairs"] == 3
    assert stats.paired_gaps(frame(rows).drop(columns="budget_point"))["pairs"].tolist() == [0]


def grid_rows() -> list[dict]:
    """Control and m = 0 at two lrs; the held-out loss and the objective disagree on which lr is best."""
    rows = []
    # the control: lr 1e-3 lower held-out loss (chosen), though its objective is worse than at 3e-3
    rows += [row("dus", 2, r, 2.0 + 0.01 * r, lr=1e-3, val_loss=3.00 + 0.01 * r) for r in range(3)]
    rows += [row("dus", 2, r, 1.0, lr=3e-3, val_loss=3.10) for r in range(3)]
    # m = 0: lr 3e-3 lower held-out loss
    rows += [row("dus", 0, r, 1.9 + 0.01 * r, lr=1e-3, val_loss=3.20) for r in range(3)]
    rows += [row("dus", 0, r, 1.95 + 0.012 * r, lr=3e-3, val_loss=3.05) for r in range(3)]
    rows += [row("nocpt", None, 0, 9.0, budget=0)]
    return rows


def test_best_lr_chooses_on_held_out_loss_never_on_the_objective():
    df = frame(grid_rows())
    kept, choices = stats.best_lr(df)
    assert len(kept) == 7  # 3 control, 3 m = 0, the no-CPT reference
    assert set(zip(kept["m"].fillna(-1), kept["lr"].fillna(0), strict=True)) == {(2, 1e-3), (0, 3e-3), (-1, 0)}
    assert list(choices["arm"]) == ["DUS m=0", "DUS m=2"] and list(choices["lr"]) == [3e-3, 1e-3]
    assert list(choices["val_loss"]) == pytest.approx([3.05, 3.01]) and list(choices["lrs"]) == [2, 2]
    assert choices.iloc[1]["tried"] == "0.001: 3.0100 (3), 0.003: 3.1000 (3)"
    again, _ = stats.best_lr(kept)
    assert len(again) == len(kept)  # idempotent
    g = stats.paired_gaps(df).iloc[0]  # each arm at its own chosen lr
    assert (g["lr"], g["control_lr"]) == (3e-3, 1e-3)
    assert g["arm_minus_control"] == pytest.approx(-0.05 + 0.002)  # (1.95 + .012 r) - (2.0 + .01 r)


def test_best_lr_ties_go_to_the_smaller_lr_and_each_point_chooses_alone():
    rows = [row("dus", 2, r, 2.0, lr=lr, val_loss=3.0, budget=1000) for r in range(2) for lr in (3e-3, 1e-3)]
    rows += [row("dus", 2, r, 2.0, lr=lr, val_loss=3.0 - (lr > 2e-3) * 0.1, budget=2000)
             for r in range(2) for lr in (1e-3, 3e-3)]
    _, choices = stats.best_lr(frame(rows))
    assert list(zip(choices["budget"], choices["lr"], strict=True)) == [(1000, 1e-3), (2000, 3e-3)]
    # without a grid nothing is chosen and nothing dropped
    plain = frame(arm("dus", 2, CONTROL))
    kept, none = stats.best_lr(plain)
    assert none.empty and len(kept) == 3


def test_best_m_by_budget_with_runner_up_and_tied_set():
    rows = arm("dus", 2, CONTROL) + arm("dus", 0, DEEPER)
    rows += arm("dus", 1, [1.98, 2.06, 2.04])  # -0.02, -0.04, -0.01 against the control
    rows += arm("moe", None, [1.0, 1.0, 1.0])  # MoE is never "the best m"
    best = stats.best_m_by_budget(frame(rows), "objective", "minimize")
    assert len(best) == 1
    b = best.iloc[0]
    assert b["best_m"] == 0 and b["best_mean"] == pytest.approx(np.mean(DEEPER)) and b["runner_up_m"] == 1
    # best - runner-up: -0.01, 0.00, -0.01: mean -0.02/3, sd 0.005774
    d = np.array([-0.01, 0.0, -0.01])
    half = T_975_DF2 * d.std(ddof=1) / math.sqrt(3)
    assert b["best_minus_runner_up"] == pytest.approx(d.mean())
    assert (b["lo"], b["hi"]) == (pytest.approx(d.mean() - half), pytest.approx(d.mean() + half))
    assert b["verdict"] == "cannot be ordered" and b["tied"] == (0, 1) and (b["m_lo"], b["m_hi"]) == (0, 1)
    assert b["best_minus_control"] == pytest.approx(-0.03) and b["control_verdict"] == "better"
    up = stats.best_m_by_budget(frame(rows), "objective", "maximize").iloc[0]  # as an accuracy: the control wins
    assert up["best_m"] == 2 and up["control_verdict"] == "is the control" and math.isnan(up["best_minus_control"])


def test_best_m_with_one_repeat_knows_no_tied_set():
    b = stats.best_m_by_budget(frame(arm("dus", 2, CONTROL[:1]) + arm("dus", 0, DEEPER[:1]))).iloc[0]
    assert b["best_m"] == 0 and b["verdict"] == "one pair: no interval"
    assert math.isnan(b["m_lo"]) and b["tied"] == (0,)


def means_rows(order_by_budget: dict[int, list[float]]) -> list[dict]:
    """Three arms (m = 0, the control m = 2, MoE) with the given means at each budget point, two repeats."""
    rows = []
    for budget, (m0, control, moe) in order_by_budget.items():
        for r, noise in enumerate((-0.001, 0.001)):
            rows += [row("dus", 0, r, m0 + noise, budget=budget), row("dus", 2, r, control + noise, budget=budget),
                     row("moe", None, r, moe + noise, budget=budget)]
    return rows


def test_rank_correlation_between_consecutive_points():
    rows = means_rows({1000: [1.0, 2.0, 3.0], 2000: [3.0, 2.0, 1.0], 4000: [1.0, 3.0, 2.0]})
    rho = stats.rank_correlation(frame(rows))
    assert list(zip(rho["budget"], rho["next_budget"], rho["arms"], strict=True)) == [(1000, 2000, 3),
                                                                                       (2000, 4000, 3)]
    # ranks (1, 2, 3) then (3, 2, 1): reversed, rho = -1; (3, 2, 1) then (1, 3, 2): sum d^2 = 4 + 1 + 1 = 6,
    # rho = 1 - 6 * 6 / (3 * (9 - 1)) = -0.5
    assert list(rho["rho"]) == pytest.approx([-1.0, -0.5])
    assert rho.iloc[0]["p"] == pytest.approx(1 / 3)  # exact: 2 of the 6 orderings are as extreme
    last = stats.rank_correlation(frame(rows), against="last")
    assert list(last["next_budget"]) == [4000, 4000] and list(last["rho"]) == pytest.approx([0.5, -0.5])


def test_rank_correlation_needs_two_arms_and_two_points():
    one_point = stats.rank_correlation(frame(means_rows({1000: [1.0, 2.0, 3.0]})))
    assert one_point.empty
    rows = [r for r in means_rows({1000: [1.0, 2.0, 3.0], 2000: [1.0, 2.0, 3.0]}) if r["method"] == "dus"]
    rows = [r for r in rows if r["m"] == 0 or r["budget_tokens"] == 1000]  # the control only at the first point
    lonely = stats.rank_correlation(frame(rows)).iloc[0]
    assert lonely["arms"] == 1 and math.isnan(lonely["rho"])


def test_metric_direction():
    assert stats.metric_direction("objective", "maximize") == "maximize"
    assert stats.metric_direction("answer_k3/loss") == "minimize" == stats.metric_direction("val_ppl")
    assert stats.metric_direction("answer/acc", "minimize") == "maximize"
    assert stats.metric_direction("gsm8k/exact_match,strict-match") == "maximize"


def test_arm_means_t_interval_and_trials_at_the_chosen_lr():
    df = frame(grid_rows())
    means = stats.arm_means(df)
    control = means[means["arm"] == "DUS m=2"].iloc[0]  # at lr 1e-3: 2.00, 2.01, 2.02
    assert (control["lr"], control["count"]) == (1e-3, 3) and control["mean"] == pytest.approx(2.01)
    assert control["half"] == pytest.approx(T_975_DF2 * 0.01 / math.sqrt(3))
    assert len(stats.arm_means(df, per_lr=True)) == 4  # two arms at two lrs
    trials = pd.DataFrame({"base": "b", "method": ["dus"] * 4 + ["nocpt"], "m": [2, 2, 0, 0, None],
                           "lr": [1e-3, 3e-3, 1e-3, 3e-3, None], "trial": range(5)})
    assert list(stats.trials_at_best_lr(trials, df)["trial"]) == [0, 3, 4]
    assert len(stats.trials_at_best_lr(trials, frame(arm("dus", 2, CONTROL)))) == 5  # one lr: nothing dropped


def _item_frame():
    rows = [row("dus", 2, r, 2.0, trial=r) for r in range(2)] + [row("dus", 0, r, 1.9, trial=10 + r) for r in range(2)]
    return frame(rows)


def test_item_bootstrap_by_hand():
    """A bootstrap over items of the paired accuracy difference: all-or-nothing items give a point
    interval; a 50/50 split gives an interval around +0.5 as wide as resampling 400 coin flips allows."""
    df = _item_frame()
    ones, zeros = [1] * 400, [0] * 400
    half = [1, 0] * 200
    items = {(0, 1000.0, "answer_k1"): {"hit": zeros}, (1, 1000.0, "answer_k1"): {"hit": zeros},
             (10, 1000.0, "answer_k1"): {"hit": ones}, (11, 1000.0, "answer_k1"): {"hit": ones},
             (0, 1000.0, "answer_k2"): {"hit": zeros}, (1, 1000.0, "answer_k2"): {"hit": zeros},
             (10, 1000.0, "answer_k2"): {"hit": half}, (11, 1000.0, "answer_k2"): {"hit": half}}
    gaps = stats.item_gaps(df, items).set_index("task")
    k1, k2 = gaps.loc["answer_k1"], gaps.loc["answer_k2"]
    assert (k1["arm"], k1["pairs"], k1["items"]) == ("DUS m=0", 2, 400)
    assert (k1["arm_minus_control"], k1["lo"], k1["hi"], k1["verdict"]) == (1.0, 1.0, 1.0, "better")
    # the mean of 400 fair coin flips: sd 0.025, a 95% interval of about +-0.049 around 0.5
    assert k2["arm_minus_control"] == 0.5 and k2["verdict"] == "better"
    assert 0.5 - 0.06 < k2["lo"] < 0.5 - 0.04 and 0.5 + 0.04 < k2["hi"] < 0.5 + 0.06
    # a control as good as the arm: cannot be ordered
    same = {**items, (0, 1000.0, "answer_k2"): {"hit": half[::-1]}, (1, 1000.0, "answer_k2"): {"hit": half[::-1]}}
    tie = stats.item_gaps(df, same, tasks=["answer_k2"]).iloc[0]
    assert tie["arm_minus_control"] == 0.0 and tie["lo"] < 0 < tie["hi"] and tie["verdict"] == "cannot be ordered"
    # items missing for a trial: that pair is left out, not guessed
    partial = {k: v for k, v in items.items() if k[0] != 11}
    assert stats.item_gaps(df, partial, tasks=["answer_k1"]).iloc[0]["pairs"] == 1


def _gaps(rows):
    import pandas as pd

    return pd.DataFrame([{"base": "b", "n": 4, "budget": budget, "method": "dus", "m": m, "arm": f"DUS m={m}",
                          "arm_minus_control": gap, "verdict": verdict}
                         for m, points in rows.items() for budget, gap, verdict in points])


def test_gap_trend_measures_where_an_arm_pays_off_and_labels_an_extrapolation():
    import math

    from ablate.stats import gap_trend

    line = [(2 ** k, 0.006 - 0.001 * k, "worse") for k in (1, 2, 3, 4)]  # zero at 2^6 = 64
    gaps = _gaps({0: line,
                  1: [(2, 0.001, "worse"), (4, -0.001, "cannot be ordered"), (8, -0.002, "better"),
                      (16, -0.003, "better")],
                  3: [(2, 0.001, "worse"), (4, 0.002, "worse"), (8, 0.004, "worse")]})
    trend = gap_trend(gaps, "minimize").set_index("m")
    assert trend.loc[0, "status"] == "extrapolated" and trend.loc[0, "crossover"] == pytest.approx(64)
    assert trend.loc[0, "slope"] == pytest.approx(-0.001) and math.isnan(trend.loc[0, "pays_from"])
    assert trend.loc[1, "status"] == "pays off" and trend.loc[1, "pays_from"] == 8  # from the last run of "better"
    assert trend.loc[3, "status"] == "no crossover in sight" and math.isnan(trend.loc[3, "crossover"])
    # an accuracy (maximize): the same numbers mean the opposite
    flipped = gap_trend(gaps.assign(verdict="cannot be ordered"), "maximize").set_index("m")
    assert flipped.loc[3, "status"] == "ahead, not significant"
    assert flipped.loc[0, "status"] == "ahead, not significant"  # +0.002 at the last point is ahead
    two = gap_trend(_gaps({0: line[:2]}), "minimize")  # two points: no line
    assert math.isnan(two["slope"].iloc[0]) and two["status"].iloc[0] == "no crossover in sight"
