"""The budget axis in ablate.train: the wsd schedule, cooldown branches forked off one run, and the
standalone runs they must equal bit for bit on a CPU."""

from __future__ import annotations

import json
import math

import numpy as np
import pydantic
import pytest
import torch
from conftest import tiny_model
from test_train import SEQ, random_data

from ablate.errors import UserError
from ablate.train import BudgetPoint, TrainConfig, continue_pretraining, plan_points, row_order, wsd_lr_at

STEP = 16 * SEQ  # tokens per step: 2 micro-batches of 8 rows


def wsd(budgets, **overrides) -> TrainConfig:
    kwargs = dict(tokens=budgets[-1], budgets=budgets, schedule="wsd", warmup_tokens=STEP, cooldown=0.25,
                  micro_batch_size=8, tokens_per_step=STEP, lr=3e-3, eval_every=3, eval_rows=8, precision="fp32")
    return TrainConfig(**{**kwargs, **overrides})


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run(config, data, seed=0, order_seed=None):
    """Train a fresh tiny model; return its result and a snapshot of the model at every point's end."""
    model = tiny_model("llama", 2, seed=seed)
    seen = {}

    def on_point(point, info):
        seen[point.tokens] = (state(model), info)

    config = config.model_copy(update={"data_order_seed": order_seed})
    result = continue_pretraining(model, data, config, on_point=on_point, progress=False)
    return result, seen


@pytest.mark.parametrize("order_seed", [None, 3])
def test_every_branch_equals_its_standalone_run_bit_for_bit(order_seed):
    data = random_data(train_rows=600)
    budgets = [2 * STEP, 4 * STEP, 8 * STEP, 16 * STEP]  # a factor 2 apart; the 16-step run forks 3 times
    result, seen = run(wsd(budgets), data, order_seed=order_seed)
    assert result.status == "completed" and sorted(seen) == budgets
    assert [p["budget_tokens"] for p in result.points] == budgets
    # extra cost: the cooldowns of the three branches (1, 1 and 2 steps of 4 rows each)
    assert result.branch_tokens == (1 + 1 + 2) * STEP
    for b in budgets:
        alone, alone_seen = run(wsd([b]), data, order_seed=order_seed)
        assert alone.status == "completed" and list(alone_seen) == [b]
        got, want = seen[b][0], alone_seen[b][0]
        for key in want:
            assert torch.equal(got[key], want[key]), (b, key)
        assert seen[b][1]["val_loss"] == alone_seen[b][1]["val_loss"]


def test_the_main_run_is_unchanged_by_its_branches():
    data = random_data(train_rows=600)
    with_branches, _ = run(wsd([2 * STEP, 4 * STEP, 8 * STEP]), data)
    alone, _ = run(wsd([8 * STEP]), data)
    assert with_branches.val_losses == alone.val_losses
    assert with_branches.final_val_loss == alone.final_val_loss


def test_branch_state_on_disk_equals_in_memory(tmp_path):
    data = random_data(train_rows=600)
    budgets = [2 * STEP, 8 * STEP]
    memory, seen_m = run(wsd(budgets), data)
    model = tiny_model("llama", 2, seed=0)
    seen_d = {}

    def on_point(point, info):
        seen_d[point.tokens] = state(model)

    disk = continue_pretraining(model, data, wsd(budgets, branch_state="disk"), out_dir=tmp_path, progress=False,
                                on_point=on_point)
    assert disk.val_losses == memory.val_losses
    for b in budgets:
        assert all(torch.equal(seen_d[b][k], seen_m[b][0][k]) for k in seen_d[b])
    assert not (tmp_path / "fork.pt").exists()
    branch_lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
                    if '"branch"' in x]
    assert {x["branch"] for x in branch_lines} == {2 * STEP}


def test_wsd_schedule_values():
    point = BudgetPoint(index=0, tokens=100, steps=100, cooldown_steps=20, final=True)
    kw = dict(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert wsd_lr_at(0, point, **kw) == pytest.approx(0.1)
    assert wsd_lr_at(9, point, **kw) == pytest.approx(1.0)  # warmup ends at the peak
    assert wsd_lr_at(79, point, **kw) == 1.0  # the last constant step, just before the fork
    # mid-cooldown: t = 10/20
    assert wsd_lr_at(89, point, **kw) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)))
    assert wsd_lr_at(89, point, **kw, decay="linear") == pytest.approx(0.1 + 0.9 * 0.5)
    assert wsd_lr_at(99, point, **kw) == pytest.approx(0.1)  # the end: the floor
    values = [wsd_lr_at(s, point, **kw) for s in range(80, 100)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))


def test_plan_points_and_config_errors():
    points = plan_points(wsd([1 * STEP, 4 * STEP, 16 * STEP], cooldown=0.2, warmup_tokens=0))
    assert [(p.steps, p.cooldown_steps, p.fork_step, p.final) for p in points] == \
        [(1, 1, 0, False), (4, 1, 3, False), (16, 3, 13, True)]
    with pytest.raises(UserError, match="warmup"):
        plan_points(wsd([2 * STEP, 8 * STEP], warmup_tokens=4 * STEP))
    with pytest.raises(UserError, match="same number of steps"):
        plan_points(wsd([STEP, STEP + 1, 8 * STEP]))
    with pytest.raises(pydantic.ValidationError, match="strictly increasing"):
        wsd([4 * STEP, 2 * STEP])
    with pytest.raises(pydantic.ValidationError, match="last budget point"):
        TrainConfig(tokens=8 * STEP, budgets=[STEP, 4 * STEP], schedule="wsd", warmup_tokens=0)
    with pytest.raises(pydantic.ValidationError, match="warmup_tokens"):
        TrainConfig(budgets=[STEP, 4 * STEP], schedule="wsd")
    with pytest.raises(pydantic.ValidationError, match="schedule: wsd"):
        TrainConfig(budgets=[STEP, 4 * STEP], warmup_tokens=0)
    assert TrainConfig(budgets=[STEP, 4 * STEP], schedule="wsd", warmup_tokens=0).tokens == 4 * STEP


def test_row_order_is_prefix_stable_across_windows():
    from ablate.data import SHUFFLE_WINDOW as W

    big = row_order(7, 3 * W, 3 * W)
    assert sorted(big.tolist()) == list(range(3 * W))
    for n in (5, W, W + 1, 2 * W + 3):
        pool = -(-n // W) * W
        np.testing.assert_array_equal(row_order(7, n, pool), big[:n])
    assert not np.array_equal(row_order(8, W, W), big[:W])
    assert row_order(None, 10) is None


def test_on_point_stops_the_run_after_a_branch():
    data = random_data(train_rows=600)
    model = tiny_model("llama", 2, seed=0)
    result = continue_pretraining(model, data, wsd([2 * STEP, 4 * STEP, 8 * STEP]), progress=False,
                                  on_point=lambda point, info: point.tokens >= 4 * STEP)
    assert result.status == "stopped" and "budget point 4096" in result.reason.replace(str(4 * STEP), "4096")
    assert [p["budget_tokens"] for p in result.points] == [2 * STEP, 4 * STEP]
    assert result.steps == 3  # the main run stopped at the second point's fork


def _points(study_dir) -> dict:
    import pandas as pd

    from ablate.results import load_budgets

    frame = load_budgets(study_dir)
    return {(r.method, None if pd.isna(r.m) else int(r.m), int(r.budget_tokens)): r for r in frame.itertuples()}


def test_through_the_cli_a_branch_equals_the_standalone_study(home, tmp_path):
    """`ablate study` with budgets [256, 512, 1024] against a study with tokens 512, budgets [512]:
    the 512-token point of every arm has the same scores to the last bit."""
    wsd_train = {"schedule": "wsd", "warmup_tokens": 128, "cooldown": 0.25, "tokens_per_step": 128,
                 "micro_batch_size": 4, "lr": 1e-3, "eval_every": 2, "eval_rows": 8, "precision": "fp32"}
    arms = dict(bases=[{"model": str(home.base), "label": "tiny", "m": [1, 2]}], methods={"dus": True, "moe": None})
    many = home.write(tmp_path, "many", train={**wsd_train, "budgets": [256, 512, 1024]}, **arms)
    one = home.write(tmp_path, "one", train={**wsd_train, "tokens": 512, "budgets": [512]}, **arms)
    for config in (many, one):
        done = home.run(["--config", str(config), "--trials", "3", "--out", "runs", "--quiet"], tmp_path)
        assert done.returncode == 0, done.stderr
    big, small = _points(tmp_path / "runs" / "many"), _points(tmp_path / "runs" / "one")
    assert {k[2] for k in big} == {0, 256, 512, 1024} and {k[2] for k in small} == {0, 512}
    for m in (1, 2):
        a, b = big[("dus", m, 512)], small[("dus", m, 512)]
        assert (a.val_loss, a.objective, a.cpt_val_loss) == (b.val_loss, b.objective, b.cpt_val_loss)
        assert a.branch and not b.branch
        assert a.tokens == b.tokens == 512
    assert big[("dus", 1, 256)].val_loss != big[("dus", 1, 512)].val_loss
    # the trial record states the branches' extra cost: cooldowns of 1 step (256) and 1 step (512)
    results = (tmp_path / "runs" / "many" / "results.csv").read_text().splitlines()
    header = results[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in results[1:]]
    assert {r["branch_tokens"] for r in rows if r["method"] == "dus"} == {str(2 * 128)}
    assert {r["tokens"] for r in rows if r["method"] == "dus"} == {"1024"}


def test_flops_per_token_on_mistral_7b():
    """6N + 6 * layers * context * attention width (Kaplan et al. 2020) on MISSION.md's reference model."""
    from transformers import MistralConfig

    from ablate.params import inference_flops_per_token, training_flops_per_token

    config = MistralConfig()  # 32 layers, 32 heads x 128 = 4096 wide, 7,241,732,096 parameters
    n = 7_241_732_096
    assert inference_flops_per_token(config, n, 4096) == 2 * n + 2 * 32 * 4096 * 4096
    assert training_flops_per_token(config, n, 4096) == 46_671_618_048 == 6 * n + 6 * 32 * 4096 * 4096


def test_flop_budgets_become_each_arms_tokens():
    config = TrainConfig(budget_unit="flops", budgets=[4_000 * STEP, 16_000 * STEP], schedule="wsd",
                         warmup_tokens=0, tokens_per_step=STEP)
    shallow, deep = config.in_tokens(1_000), config.in_tokens(3_000)
    assert (shallow.budget_unit, shallow.budgets, shallow.tokens) == ("tokens", [4 * STEP, 16 * STEP], 16 * STEP)
    # 4,000 x 512 / 3,000 = 682.7 tokens: one step of 512; 16,000 x 512 / 3,000 = 2,730.7: five steps
    assert (deep.budgets, deep.tokens) == ([STEP, 5 * STEP], 5 * STEP)
    with pytest.raises(UserError, match="less than one step"):
        config.in_tokens(10**9)
    assert TrainConfig(tokens=STEP).in_tokens(123) == TrainConfig(tokens=STEP)
    with pytest.raises(UserError, match="convert the budget"):
        continue_pretraining(tiny_model("llama", 2), random_data(), config, progress=False)


def test_equal_flops_study_gives_deeper_arms_fewer_tokens(home, tmp_path):
    from ablate.config import parse_config
    from ablate.results import load_budgets
    from ablate.study import run_study

    train = {"schedule": "wsd", "budget_unit": "flops", "budgets": [2e8, 8e8], "warmup_tokens": 0,
             "tokens_per_step": 128, "micro_batch_size": 4, "lr": 1e-3, "eval_every": 4, "eval_rows": 8,
             "precision": "fp32"}
    config = parse_config(home.tree("flops", train=train, methods={"dus": True, "moe": None},
                                    bases=[{"model": str(home.base), "label": "tiny", "m": [0, 2]}]))
    run_study(config, trials=3, out=tmp_path, progress=False)
    frame = load_budgets(tmp_path / "flops")
    dus = frame[frame.method == "dus"].set_index(["m", "budget"])
    deep, base = dus.loc[(0, 8e8)], dus.loc[(2, 8e8)]
    assert deep.flops_per_token > base.flops_per_token and deep.tokens < base.tokens
    for row in (deep, base):  # each trained the tokens its FLOPs buy, in whole steps
        assert row.tokens == 8e8 // row.flops_per_token // 128 * 128
        assert row.flops == row.tokens * row.flops_per_token <= 8e8


def test_items_round_trip_from_trial_folders(tmp_path):
    """What a trial writes per budget point and item (items.jsonl) is what the item bootstrap reads."""
    from ablate.results import read_items
    from ablate.trial import _write_items

    for trial, hits in ((0, [0, 1, 1]), (1, [1, 1, 1])):
        folder = tmp_path / "trials" / str(trial)
        folder.mkdir(parents=True)
        _write_items(folder, 256, {"answer_k1": {"hit": hits, "loss": [0.5, 0.25, 0.125]}}, append=False)
        _write_items(folder, 512, {"answer_k1": {"hit": hits[::-1], "loss": [1 / 3] * 3}}, append=True)
    (tmp_path / "trials" / "7").mkdir()
    (tmp_path / "trials" / "7" / "items.jsonl").write_text("{not json\n")  # damaged: left out
    items = read_items(tmp_path)
    assert sorted(items) == [(0, 256.0, "answer_k1"), (0, 512.0, "answer_k1"), (1, 256.0, "answer_k1"),
                             (1, 512.0, "answer_k1")]
    assert items[(0, 512.0, "answer_k1")] == {"hit": [1, 1, 0], "loss": [0.33333] * 3}


def test_lm_eval_tasks_only_at_the_last_budget_point(home, tmp_path):
    """eval.tasks_at: last runs lm-eval (here the synthetic tasks) at the last budget point alone; the
    held-out loss and the answer metrics are measured at every point."""
    from ablate.config import load_study_config
    from ablate.study import run_study

    train = {"schedule": "wsd", "warmup_tokens": 128, "cooldown": 0.25, "tokens": 512, "budgets": [256, 512],
             "tokens_per_step": 128, "micro_batch_size": 4, "lr": 1e-3, "eval_every": 2, "eval_rows": 8,
             "precision": "fp32"}
    config = home.write(tmp_path, "last", train=train, methods={"dus": True, "moe": None, "nocpt": False},
                        bases=[{"model": str(home.base), "label": "tiny", "m": [1]}],
                        eval={"synthetic_tasks": True, "subset": 4, "tasks_at": "last",
                              "objective": {"kind": "answer_loss"}})
    run_study(load_study_config(config), trials=1, out=tmp_path / "runs", progress=False)
    import pandas as pd

    from ablate.results import load_budgets

    frame = load_budgets(tmp_path / "runs" / "last").set_index("budget_tokens")
    assert list(frame.index) == [256, 512]
    assert np.isfinite(frame["val_loss"]).all() and np.isfinite(frame["answer/loss"]).all()
    assert pd.isna(frame.loc[256, "synth_k1/acc"]) and 0 <= frame.loc[512, "synth_k1/acc"] <= 1


def test_an_lm_eval_objective_needs_every_point():
    from ablate.config import parse_config

    tree = {"name": "x", "bases": [{"model": "llama-4l"}], "train": {"tokens": 1024},
            "eval": {"tasks_at": "last", "objective": {"kind": "metric", "keys": ["synth_k2/acc"]}}}
    with pytest.raises(UserError, match="measured only at the last budget point"):
        parse_config(tree)
    tree["eval"]["objective"] = {"kind": "metric", "keys": ["answer_k2/acc"]}
    assert parse_config(tree).eval.tasks_at == "last"
