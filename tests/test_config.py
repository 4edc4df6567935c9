"""Study configs: every shipped YAML validates, the packaged default equals studies/default.yaml,
and bad configs fail with one line naming the key."""

from pathlib import Path

import pytest

from ablate.config import DEFAULT_CONFIG, load_study_config, parse_config
from ablate.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "studies").glob("*.yaml"))
MINIMAL = {"name": "t", "bases": [{"model": "zoo-a"}], "train": {"tokens": 1000}}
WSD = {"schedule": "wsd", "warmup_tokens": 256, "budgets": [1024, 4096]}


def test_studies_are_shipped():
    names = {p.name for p in SHIPPED}
    assert {"default.yaml", "smoke.yaml", "hub-small.yaml", "solar.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_study_validates_and_opens_with_a_comment(path):
    config = load_study_config(path)
    assert config.name
    head = path.read_text().splitlines()[0]
    assert head.startswith("# Question"), f"{path.name} must open with the question it asks"
    assert "python -m ablate.study" in path.read_text()


def test_packaged_default_is_studies_default():
    assert DEFAULT_CONFIG.read_bytes() == (ROOT / "studies" / "default.yaml").read_bytes()


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: t\nbases: [{model: zoo-a}]\ntrain: {tokens: 1000, lr: 1e-5}\n")
    assert load_study_config(p).train.lr == 1e-5


def test_overrides_are_parsed_as_yaml(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: t\nbases: [{model: zoo-a}]\ntrain: {tokens: 1000}\n")
    config = load_study_config(p, ["train.lr=2e-3", "repeats=3", "bases.0.m=[0, 1]", "eval.subset=null"])
    assert config.train.lr == 2e-3 and config.repeats == 3 and config.bases[0].m == [0, 1]
    assert config.eval.subset is None


@pytest.mark.parametrize("change,expected", [
    ({"trian": {}}, "trian: unknown key"),
    ({"train": {"tokens": 1000, "lr": "fast"}}, "train.lr"),
    ({"train": {"tokens": 1000, "lr": float("nan")}}, "train.lr"),
    ({"train": {"tokens": 1000, "lr": -1}}, "train.lr"),
    ({"name": "a/b"}, "no path separators"),
    ({"bases": []}, "bases"),
    ({"bases": [{"model": "x", "m": []}]}, "m list is empty"),
    ({"bases": [{"model": "x", "m": [1, 1]}]}, "repeats a value"),
    ({"methods": {"dus": False, "moe": None}}, "enable at least one"),
    ({"methods": {"moe": {"experts": 2, "top_k": 3}}}, "top_k=3 exceeds experts=2"),
    ({"repeats": 0}, "repeats"),
    ({"data": {"source": "hf:"}}, "names no dataset"),
    ({"eval": {"objective": {"kind": "accuracy"}}}, "eval.objective"),
    ({"pruner": {"kind": "hyperband"}}, "pruner.kind hyperband needs train.schedule: wsd with at least 2"),
    ({"pruner": {"kind": "successive_halving"}, "train": {"schedule": "wsd", "warmup_tokens": 100, "tokens": 1000}},
     "pruner.kind successive_halving needs train.schedule: wsd with at least 2 train.budgets"),
    ({"pruner": {"kind": "hyperband", "min_fraction": 0.5}, "train": {**WSD, "budgets": [1000, 4000, 16000]}},
     "would never prune: its rungs fall at budget points [1000, 4000, 16000]"),
    ({"pruner": {"kind": "hyperband", "reduction_factor": 1}, "train": WSD}, "pruner.reduction_factor"),
    ({"pruner": {"kind": "median", "min_fraction": 1.5}}, "pruner.min_fraction"),
    ({"pruner": {"kind": "median", "min_fraction": float("nan")}}, "pruner.min_fraction"),
    ({"pruner": {"kind": "asha"}}, "pruner.kind"),
    ({"methods": {"dus": False}, "bases": [{"model": "x"}, {"model": "y", "moe": False}]},
     "'y' has no arm to run (methods.dus is off and its moe is false)"),
    ({"methods": {"nocpt": "maybe"}}, "methods.nocpt"),
    ({"eval": {"synthetic_tasks": False, "objective": {"kind": "answer_loss"}}},
     "eval.objective kind answer_loss is measured on the synthetic tasks; set eval.synthetic_tasks: true"),
    ({"eval": {"synthetic_tasks": False, "objective": {"kind": "answer_acc"}}}, "kind answer_acc is measured"),
    ({"eval": {"synthetic_tasks": False, "objective": {"kind": "mean", "keys": ["arc/acc", "synth_k2/acc"]}}},
     "eval.objective key synth_k2/acc is measured on the synthetic tasks"),
    ({"eval": {"synthetic_tasks": False, "objective": {"kind": "metric", "keys": ["answer_k3/acc"]}}},
     "key answer_k3/acc is measured"),
])
def test_bad_configs_name_the_key(change, expected):
    tree = {**MINIMAL, **change}
    with pytest.raises(UserError) as info:
        parse_config(tree, "s.yaml")
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_budgets_and_an_lr_grid_parse_from_the_command_line(tmp_path):
    """Issue 13: --set 'train.budgets=[1024,4096]' and --set train.lr=[1e-3,3e-3] (PyYAML reads 1e-3 as text)."""
    p = tmp_path / "s.yaml"
    p.write_text("name: t\nbases: [{model: zoo-a}]\ntrain: {tokens: 1000}\n")
    config = load_study_config(p, ["train.schedule=wsd", "train.tokens=4096", "train.warmup_tokens=256",
                                   "train.budgets=[1024,4096]", "pruner.kind=hyperband", "train.lr=[1e-3,3e-3]"])
    assert config.train.budgets == [1024, 4096] and config.train.budget_points == [1024, 4096]
    assert config.train.lr == [1e-3, 3e-3] and config.train.lr_grid == [1e-3, 3e-3]
    assert config.pruner.kind == "hyperband" and config.pruner.reduction_factor == 4
    assert config.pruner.min_fraction == 0.25
    spaced = load_study_config(p, ["train.schedule=wsd", "train.tokens=4096", "train.warmup_tokens=256",
                                   "train.budgets=[1024, 4096]", "train.lr=[ 1.0e-3 , 3e-3 ]"])
    assert spaced.train.budgets == [1024, 4096] and spaced.train.lr == [1e-3, 3e-3]


def test_a_study_yaml_with_an_lr_grid_budgets_and_a_pruner(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: t\nbases: [{model: zoo-a}]\n"
                 "train: {schedule: wsd, budgets: [1024, 4096, 16384], warmup_tokens: 256, lr: [1e-3, 3e-3]}\n"
                 "pruner: {kind: successive_halving, reduction_factor: 4, min_fraction: 0.25}\n"
                 "methods: {nocpt: false}\n")
    config = load_study_config(p)
    assert config.train.tokens == 16384 and config.train.lr == [1e-3, 3e-3] and not config.methods.nocpt
    assert config.pruner.kind == "successive_halving"
    assert parse_config(MINIMAL).methods.nocpt is True  # the reference row is on by default


@pytest.mark.parametrize("objective", [{"kind": "answer_loss"}, {"kind": "answer_acc"},
                                       {"kind": "metric", "keys": ["synth_k1/acc"]}])
def test_synthetic_objectives_with_the_synthetic_tasks(objective):
    config = parse_config({**MINIMAL, "eval": {"synthetic_tasks": True, "objective": objective}})
    assert config.eval.objective.kind == objective["kind"]
    other = parse_config({**MINIMAL, "eval": {"synthetic_tasks": False, "tasks": ["arc_easy"],
                                              "objective": {"kind": "metric", "keys": ["arc_easy/acc"]}}})
    assert other.eval.objective.keys == ["arc_easy/acc"]


def test_rung_points_and_the_guard():
    from ablate.config import prunable, rung_points

    assert rung_points([1024, 4096, 16384], 4) == [1024, 4096, 16384]
    assert rung_points([1024, 2048, 4096, 8192], 4) == [1024, 4096]  # points between rungs decide nothing
    assert rung_points([1000, 3000, 8000], 4) == [1000, 8000]  # a rung between points: the next point decides
    assert prunable([1024, 4096, 16384], 16384, 0.25) == [4096]
    assert prunable([1024, 4096], 4096, 0.25) == [1024]  # at exactly the fraction a trial may be pruned


def test_malformed_yaml_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: t\nbases: [{model: a}\ntrain: {tokens: 1}\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        load_study_config(p)


def test_missing_config_file():
    with pytest.raises(UserError, match="does not exist"):
        load_study_config("/nonexistent/study.yaml")


def test_budget_points_on_the_command_line_replace_the_files_budget():
    """`--set 'train.budgets=[...]'` on a study file with its own tokens: the points are the run."""
    config = load_study_config(None, ["train.schedule=wsd", "train.budgets=[1024,4096]", "train.warmup_tokens=0"])
    assert (config.train.tokens, config.train.budget_points) == (4096, [1024, 4096])
    with pytest.raises(UserError, match="must equal tokens=65536"):  # both given and disagreeing: say so
        load_study_config(None, ["train.schedule=wsd", "train.budgets=[1024,4096]", "train.warmup_tokens=0",
                                 "train.tokens=65536"])


def test_config_changes_name_the_leaves_and_the_keys_a_later_ablate_added():
    from ablate.config import config_changes

    old = {"name": "s", "train": {"lr": 1e-3, "tokens": 10}, "eval": {"tasks": ["a"]}}
    new = {"name": "s", "train": {"lr": 3e-3, "tokens": 10, "eval_early": 5}, "eval": {"tasks": ["a", "b"]}}
    assert config_changes(old, new) == "eval.tasks, train.eval_early (new in this ablate), train.lr"
    assert config_changes(new, old) == "eval.tasks, train.eval_early (no longer in this ablate), train.lr"
    assert config_changes(old, old) == ""
    assert config_changes(None, new) == "the whole config"
    many = {"train": {f"k{i}": i for i in range(6)}}
    assert config_changes({"train": {"k0": 0}}, many, limit=2) == \
        "train.k1 (new in this ablate), train.k2 (new in this ablate) and 3 more"
    assert config_changes({"other": 1}, new) == "the whole config"  # nothing in common: not a newer version's keys
