"""Every layer plan is an arm (issue 16 item 4): ``methods.operators`` in the study schema (canonical
spellings, one-line errors), the search space and sweep cover them, a trial builds, trains and records
each (its plan and zero-output layers; a redundancy-chosen plan measured on the held-out rows), and the
results, paired statistics, summary and figures carry each operator as its own arm. LLaMA Pro's recipe
(item 5): with ``train.trainable: new`` only the added layers train, every other tensor bit-identical after
CPT, and each trial records what trained."""

import json
import re

import matplotlib.pyplot
import numpy as np
import pytest
import torch
from _studykit import finished_arms, load_trials
from conftest import tiny_model
from optuna.trial import FixedTrial

from ablate import plots, results, stats
from ablate.config import parse_config
from ablate.data import PackedData
from ablate.errors import UserError
from ablate.plan import llama_pro, parse_plan, prune
from ablate.search import Arm, SearchSpace
from ablate.study import run_study
from ablate.train import TrainConfig, continue_pretraining
from ablate.trial import Objective, Workspace
from ablate.upscale import apply_plan

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


# ---------------------------------------------------------------------------------------------
# LLaMA Pro's training recipe: train.trainable: new (issue 16 item 5).


def _counting_rows(n: int, seq: int = 16, vocab: int = 96, seed: int = 0):
    rng = np.random.default_rng(seed)
    start, stride = rng.integers(0, vocab, (n, 1)), rng.integers(1, 4, (n, 1))
    return ((start + stride * np.arange(seq)) % vocab).astype(np.int32)


@pytest.mark.parametrize("spec", ["llama_pro(2)", "mid(1, 2, 2)"])
def test_trainable_new_leaves_every_old_tensor_bit_identical(spec):
    grown = apply_plan(tiny_model("llama", 4, tie_word_embeddings=True), spec)
    plan = parse_plan(spec).plan(4)
    before = {k: v.clone() for k, v in grown.state_dict().items()}
    data = PackedData(train=_counting_rows(64), val=_counting_rows(8, seed=1), seq_len=16, source="counting rows")
    config = TrainConfig(tokens=4 * 16 * 16, micro_batch_size=8, tokens_per_step=16 * 16, lr=3e-3, warmup=0.25,
                         eval_every=2, eval_rows=8, precision="fp32", trainable="new")
    result = continue_pretraining(grown, data, config, new_layers=plan.new_layers, progress=False, cpu=True)
    assert result.status == "completed"
    new = {f"model.layers.{j}." for j in plan.new_layers}
    per_layer = sum(p.numel() for p in grown.model.layers[0].parameters())
    assert result.trainable_params == len(plan.new_layers) * per_layer
    changed = {k for k, v in grown.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(tuple(new)) for k in changed)  # only the new blocks moved ...
    assert any(k.endswith("mlp.down_proj.weight") for k in changed)  # ... and they did move
    assert all(p.requires_grad for p in grown.parameters())  # thawed after the run


def test_trainable_new_needs_the_new_layers():
    data = PackedData(train=_counting_rows(32), val=_counting_rows(8), seq_len=16, source="counting rows")
    config = TrainConfig(tokens=2 * 16 * 16, micro_batch_size=8, tokens_per_step=16 * 16, eval_rows=8,
                         precision="fp32", trainable="new")
    with pytest.raises(UserError, match="trainable: new trains only the layers an operator added"):
        continue_pretraining(tiny_model("llama", 2), data, config, progress=False, cpu=True)


def test_trials_record_what_trained(home, tmp_path):
    train = {**home.tree()["train"], "trainable": "new"}
    config = parse_config(home.tree(methods={"dus": True, "moe": None, "operators": ["llama_pro(2)"]}, train=train))
    space = SearchSpace(config, {"tiny": 4})
    objective = Objective(space, Workspace(config, "cpu", None, progress=False), tmp_path, "minimize")
    records = {}
    for number, arm in enumerate([Arm("tiny", "llama_pro(2)", None, 0), Arm("tiny", "dus", 2, 0),
                                  Arm("tiny", "dus", 1, 0)]):
        objective(FixedTrial(space.params(arm), number=number))
        records[(arm.method, arm.m)] = json.loads((tmp_path / "trials" / str(number) / "result.json").read_text())
    pro, control, dus = records[("llama_pro(2)", None)], records[("dus", 2)], records[("dus", 1)]
    layer = (pro["params_total"] - control["params_total"]) // 2  # the two inserted blocks
    assert (pro["trainable"], pro["params_trainable"]) == ("new", 2 * layer)
    assert (dus["trainable"], dus["params_trainable"]) == ("new", 2 * layer)  # DUS m=1: its 2 second copies
    assert (control["trainable"], control["params_trainable"]) == ("all", control["params_total"])
