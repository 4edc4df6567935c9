"""Study configs: every shipped YAML validates, the packaged default equals studies/default.yaml,
and bad configs fail with one line naming the key."""

from pathlib import Path

import pytest

from ablate.config import DEFAULT_CONFIG, load_study_config, parse_config
from ablate.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "studies").glob("*.yaml"))
MINIMAL = {"name": "t", "bases": [{"model": "zoo-a"}], "train": {"tokens": 1000}}


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
])
def test_bad_configs_name_the_key(change, expected):
    tree = {**MINIMAL, **change}
    with pytest.raises(UserError) as info:
        parse_config(tree, "s.yaml")
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_malformed_yaml_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: t\nbases: [{model: a}\ntrain: {tokens: 1}\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        load_study_config(p)


def test_missing_config_file():
    with pytest.raises(UserError, match="does not exist"):
        load_study_config("/nonexistent/study.yaml")
