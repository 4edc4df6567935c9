"""The synthetic corpus: byte-exact determinism (a golden hash), train/val disjointness, config
validation, the permutation world, evaluation items checked against sympy's permutation algebra,
and the lm-eval tasks loaded by TaskManager and scored end to end by simple_evaluate (whose
accuracy must equal our quick probe :func:`ablate.synthetic.accuracy`)."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import Counter

import pytest
from pydantic import ValidationError

from ablate.errors import UserError
from ablate.synthetic import (
    SyntheticConfig,
    accuracy,
    chance_level,
    eval_items,
    iter_documents,
    task_names,
    world,
    world_is_nonsolvable,
    write_eval_tasks,
)

# sha256 of the first 200 training documents of seed 0 joined by "\n". Any change to the
# generator changes this; update it only on purpose (it changes every cached corpus and zoo model).
GOLDEN_TRAIN_SHA256 = "706e4c70dec36f840609011f0c6879d99913ee01a791c6a606c011f7ab972c68"


def _take(split="train", seed=0, n=200, config=None):
    return list(itertools.islice(iter_documents(split, seed=seed, config=config), n))


def test_golden_sample():
    digest = hashlib.sha256("\n".join(_take()).encode()).hexdigest()
    assert digest == GOLDEN_TRAIN_SHA256


def test_streams_repeat_and_differ_by_seed():
    assert _take(n=50) == _take(n=50)
    assert _take(seed=1, n=50) != _take(n=50)


def test_train_and_val_share_no_document():
    train, val = set(_take("train", n=2000)), set(_take("val", n=2000))
    assert len(train) > 1900 and len(val) > 1900  # documents are varied, not a handful repeated
    assert not train & val


def test_mix_follows_config():
    docs = _take(n=2000)
    kinds = Counter(d.split(" ", 1)[0] for d in docs)
    text = 2000 - kinds["apply"] - kinds["trace"]
    assert abs(text / 2000 - SyntheticConfig().text_share) < 0.05
    only_text = _take(n=100, config=SyntheticConfig(text_share=1.0))
    assert not any(d.startswith(("apply", "trace")) for d in only_text)


def test_grammar_agreement():
    """Subject-verb agreement holds in simple sentences (nesting 0): 'the dogs run', 'a dog runs'."""
    import random

    from ablate.synthetic import INTRANSITIVE, NOUNS, TRANSITIVE, sentence

    singular = {s for s, _ in NOUNS}
    verbs = {v: i for pair in INTRANSITIVE + TRANSITIVE for i, v in enumerate(pair)}  # 0: sg, 1: pl
    rng = random.Random(0)
    for _ in range(200):
        words = sentence(rng, 0).split()
        noun = next(w for w in words if w in singular or any(w == p for _, p in NOUNS))
        verb = next(w for w in words[words.index(noun):] if w in verbs)
        assert verbs[verb] == (0 if noun in singular else 1), words


def test_config_is_validated():
    with pytest.raises(ValidationError, match="extra"):
        SyntheticConfig(texts=0.5)
    with pytest.raises(ValidationError, match="query_k"):
        SyntheticConfig(query_k=(3, 1))
    with pytest.raises(UserError, match="split"):
        next(iter_documents("test"))


def test_world_is_derangements_of_a_nonsolvable_group():
    perms = world()
    assert list(perms) == ["A", "B", "C", "D"]
    for p in perms.values():
        assert sorted(p) == list(range(10))
        assert all(p[i] != i for i in range(10))
    assert world_is_nonsolvable()


@pytest.mark.parametrize("k", [1, 2, 4])
def test_eval_items_against_sympy(k):
    """Answers equal sympy's composition of the named permutations; answers are balanced."""
    from sympy.combinatorics import Permutation

    perms = {name: Permutation(list(p)) for name, p in world().items()}
    items = eval_items(k, 40, seed=0)
    assert len(items) == 40
    assert len({it["context"] for it in items}) == 40
    assert Counter(it["gold"] for it in items) == {d: 4 for d in range(10)}
    for it in items:
        _, start, *ops, eq = it["context"].split()
        assert eq == "=" and len(ops) == k
        composed = Permutation(list(range(10)))
        for op in ops:  # sympy composes left to right: (p * q)(x) = q(p(x))
            composed = composed * perms[op]
        assert composed(int(start)) == it["gold"]


def test_eval_items_cap_at_the_distinct_queries():
    assert len(eval_items(1, 500)) == 40  # 10 digits x 4 functions
    assert eval_items(2, 30, seed=0) == eval_items(2, 30, seed=0)
    assert eval_items(2, 30, seed=0) != eval_items(2, 30, seed=1)
    assert chance_level() == 0.1


def test_write_eval_tasks_rejects_bad_levels(tmp_path):
    with pytest.raises(UserError, match="levels"):
        write_eval_tasks(tmp_path, levels=[0, 1])
    with pytest.raises(UserError, match="items_per_level"):
        write_eval_tasks(tmp_path, items_per_level=0)


def test_tasks_load_and_score_end_to_end(tmp_path, tiny_tokenizer):
    """TaskManager loads the tasks and the group; simple_evaluate's accuracy on each level equals
    the quick probe's (the same items, the same model)."""
    from conftest import tiny_model
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folder = tmp_path / "tasks"
    names = write_eval_tasks(folder, levels=(1, 2, 3), items_per_level=20)
    assert names == ["synth_k1", "synth_k2", "synth_k3"] == task_names(folder)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    assert {"synth", *names} <= set(manager.all_tasks)

    model = tiny_model("llama", 2, vocab_size=len(tiny_tokenizer), seed=3)
    lm = HFLM(pretrained=model, tokenizer=tiny_tokenizer, batch_size=16, device="cpu")
    out = simple_evaluate(model=lm, tasks=["synth"], task_manager=manager, log_samples=False,
                          bootstrap_iters=0)
    results = out["results"]
    for k, name in zip((1, 2, 3), names, strict=True):
        items = [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]
        assert {it["k"] for it in items} == {k}
        assert results[name]["acc,none"] == pytest.approx(accuracy(model, tiny_tokenizer, items))


def test_moved_task_folder_still_loads(tmp_path):
    """A study writes the tasks in a temporary folder and renames it: task_names re-points them."""
    from lm_eval.tasks import TaskManager

    write_eval_tasks(tmp_path / "a", levels=(1,), items_per_level=5)
    (tmp_path / "a").rename(tmp_path / "b")
    assert task_names(tmp_path / "b") == ["synth_k1"]
    loaded = TaskManager(include_path=str(tmp_path / "b"), include_defaults=False).load(["synth"])
    docs = list(loaded["tasks"]["synth_k1"].test_docs())
    assert len(docs) == 5 and docs[0]["context"].startswith("apply ")
    assert task_names(None) == []


def test_tasks_written_for_their_final_folder(tmp_path):
    """Written in a temporary folder with final=..., the YAMLs already point at the final folder."""
    import yaml

    write_eval_tasks(tmp_path / "tmp", levels=(1,), items_per_level=5, final=tmp_path / "final")
    text = (tmp_path / "tmp" / "synth_k1.yaml").read_text()
    (tmp_path / "tmp").rename(tmp_path / "final")
    written = yaml.safe_load(text)["dataset_kwargs"]["data_files"]["test"]
    assert written == str((tmp_path / "final" / "synth_k1.jsonl").resolve())
    assert task_names(tmp_path / "final") == ["synth_k1"]
    assert (tmp_path / "final" / "synth_k1.yaml").read_text() == text  # nothing to re-point
