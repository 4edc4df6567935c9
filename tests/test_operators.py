"""Every layer plan is an arm (issue 16 item 4): ``methods.operators`` in the study schema (canonical
spellings, one-line errors), the search space and sweep cover them, a trial builds, trains and records
each (its plan and zero-output layers; a redundancy-chosen plan measured on the held-out rows), and the
results and paired statistics carry each operator as its own arm."""

import json
import re

import matplotlib.pyplot
import pytest
from _studykit import finished_arms, load_trials
from optuna.trial import FixedTrial

from ablate import plots, results, stats
from ablate.config import parse_config
from ablate.errors import UserError
from ablate.plan import llama_pro, prune
from ablate.search import Arm, SearchSpace
from ablate.study import run_study
from ablate.trial import Objective, Workspace

OPERATORS = ["llama_pro(2)", "prune(1, by=angular)", "similar(1)"]


def test_operators_are_canonical_and_checked():
    base = {"name": "x", "bases": [{"model": "tiny-2l"}], "train": {"tokens": 512}}
    config = parse_config({**base, "methods": {"operators": ["llama_pro( 2 )", "prune(k=1,by=last)"]}})
    assert config.methods.operators == ["llama_pro(2)", "prune(1, by=last)"]
    for ops, message in [(["lama_pro(2)"], "methods.operators: unknown plan family 'lama_pro'"),
                         (["solar(1)"], "solar(1) is DUS: set methods.dus: true and list m=1 in bases[].m"),
                         (["stack(2)", "stack( 2)"], "stack(2) is listed twice")]:
        with pytest.raises(UserError, match=re.escape(message)):
            parse_config({**base, "methods": {"operators": ops}})
    only = parse_config({**base, "methods": {"dus": False, "moe": None, "operators": ["stack(2)"]}})
    assert only.methods.operators == ["stack(2)"]  # an operator alone is an arm to run


def test_search_space_covers_every_operator(home):
    config = parse_config(home.tree(methods={"dus": True, "moe": None, "operators": OPERATORS}, repeats=2))
    space = SearchSpace(config, {"tiny": 4})
    arms = space.arms()
    assert space.count() == len(arms) == 1 + 2 * (3 + len(OPERATORS))  # nocpt + 2 repeats x (m 0..2 + operators)
    assert {a.method for a in arms} == {"nocpt", "dus", *OPERATORS}
    for arm in arms:  # every configuration round-trips through Optuna's parameters
        assert space.suggest(FixedTrial(space.params(arm))) == arm


def test_trials_build_train_and_record_operators(home, tmp_path):
    config = parse_config(home.tree(methods={"dus": True, "moe": None, "operators": OPERATORS}))
    space = SearchSpace(config, {"tiny": 4})
    objective = Objective(space, Workspace(config, "cpu", None, progress=False), tmp_path, "minimize")
    records = {}
    for number, arm in enumerate([Arm("tiny", "dus", 2, 0)] + [Arm("tiny", op, None, 0) for op in OPERATORS]):
        objective(FixedTrial(space.params(arm), number=number))
        records[arm.method] = json.loads((tmp_path / "trials" / str(number) / "result.json").read_text())
    pro = records["llama_pro(2)"]
    assert (pro["status"], pro["n"], pro["s"], pro["m"]) == ("completed", 4, 6, None)
    assert pro["plan"] == list(llama_pro(2).plan(4).sources) and pro["zero_output"] == [2, 5]
    # zero-output blocks: the grown model starts as the base, to the last bit of the held-out loss
    assert pro["train"]["initial_val_loss"] == records["dus"]["train"]["initial_val_loss"]
    pruned = records["prune(1, by=angular)"]
    assert pruned["s"] == 3 and len(pruned["plan"]) == 3 and pruned["zero_output"] == []
    assert pruned["params_total"] < records["dus"]["params_total"] < pro["params_total"]
    assert records["similar(1)"]["s"] == 6 and len(set(records["similar(1)"]["plan"])) == 4


def test_tiny_study_with_operators_groups_results_by_operator(home, tmp_path):
    ops = ["llama_pro(2)", "prune(1, by=last)"]
    config = parse_config(home.tree(methods={"dus": True, "moe": None, "nocpt": False, "operators": ops},
                                    bases=[{"model": str(home.base), "label": "tiny", "m": [2]}], repeats=2))
    summary = run_study(config, trials=6, out=tmp_path, progress=False)["tiny"]
    assert {op: (count, layers) for op, (_, _, count, layers) in summary["operators"].items()} == \
        {"llama_pro(2)": (2, 6), "prune(1, by=last)": (2, 3)}
    assert set(summary["by_m"]) == {2}  # DUS keeps its table by m; the operators are not m values
    study_dir = tmp_path / "tiny-study"
    arms = finished_arms(load_trials(study_dir))
    assert sorted(arms) == sorted(("tiny", method, m, r) for method, m in [("dus", 2)] + [(op, None) for op in ops]
                                  for r in (0, 1))
    table = results.load(study_dir)
    assert set(table["method"]) == {"dus", *ops}
    assert dict(zip(table["method"], table["s"], strict=False)) == {"dus": 4, "llama_pro(2)": 6, "prune(1, by=last)": 3}
    points = results.load_budgets(study_dir)
    gaps = stats.paired_gaps(points, "objective", "minimize")
    assert set(gaps["arm"]) == set(ops) and (gaps["pairs"] == 2).all()  # each operator paired with the control
    assert stats.arm_label("llama_pro(2)", float("nan")) == "llama_pro(2)"
    # the figures: a line (legend entry) per operator; score vs layers puts each family at its depth
    figures = {"layers": plots.score_vs_m(table), "params": plots.score_vs_params(table),
               "budget": plots.score_vs_budget(points), "gap": plots.gap_vs_budget(points)}
    labels = {name: " | ".join(t.get_text() for legend in fig.legends for t in legend.get_texts())
              for name, fig in figures.items()}
    assert "llama_pro, same CPT (at its depth s)" in labels["layers"] and "prune, same CPT" in labels["layers"]
    assert "tiny: llama_pro(2)" in labels["params"] and "tiny: prune(1, by=last)" in labels["params"]
    assert "llama_pro(2), same CPT" in labels["budget"] and "prune(1, by=last) − control" in labels["gap"]
    for fig in figures.values():
        matplotlib.pyplot.close(fig)


def test_an_operator_that_does_not_fit_a_base_is_refused_before_the_study(home, tmp_path):
    config = parse_config(home.tree(methods={"dus": True, "moe": None, "operators": ["llama_pro(3)"]}))
    with pytest.raises(UserError, match=r"methods.operators: base 'tiny': llama_pro\(3\) .* p must divide n=4"):
        run_study(config, trials=1, out=tmp_path, progress=False)
    assert not (tmp_path / "tiny-study").exists()
    assert prune(3, "angular").needs(4) == (("gromov", 3),)
