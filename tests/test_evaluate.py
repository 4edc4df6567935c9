"""Checks of the fast evaluation (ablate.evaluate).

- ``evaluate`` returns exactly what ``lm_eval.simple_evaluate`` returns when called directly on
  the same in-memory model, tasks, items and HFLM settings (tiny Llama, tiny multiple-choice
  tasks written as YAML + JSONL into a temporary folder), flattened to "task/metric" keys,
  group aggregates included; it leaves the caller's RNG state and the model's mode alone.
- ``subset_indices`` is deterministic, sorted, nested, and not the first N.
- ``perplexity`` equals the vocabulary size for a model that predicts uniformly, and matches
  transformers' own causal-LM loss for a random model.
- The objective: value, direction and the one-line errors for missing keys and bad configs.

Nothing touches the network (conftest sets HF_HUB_OFFLINE / HF_DATASETS_OFFLINE).
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from conftest import tiny_model
from pydantic import ValidationError

from ablate.errors import UserError
from ablate.evaluate import evaluate, flatten_results, perplexity, subset_indices
from ablate.objective import ObjectiveConfig, direction, objective_value

N_DOCS = 40
TASKS = ("toy_sum", "toy_word")


def _write_task(folder, name: str, rows: list[dict]) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {data}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "{{question}} ="\n'
        "doc_to_target: label\n"
        "doc_to_choice: choices\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "  - metric: acc_norm\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "metadata:\n"
        "  version: 1.0\n"
    )


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Two tiny multiple-choice tasks (ordered: answers sorted by label) and a group of both."""
    folder = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    sums, words = [], []
    for i in range(N_DOCS):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        choices = [str((a + b + d) % 10) for d in (0, 1, 3)]
        sums.append({"question": f"{a} + {b}", "choices": choices, "label": 0 if i < N_DOCS // 2 else 2})
        words.append(
            {"question": rng.choice(["the cat", "a dog", "cats"]), "choices": ["sat", "run", "sleep ."], "label": i % 3}
        )
    _write_task(folder, TASKS[0], sums)
    _write_task(folder, TASKS[1], words)
    (folder / "toy_group.yaml").write_text(
        "group: toy_group\ntask:\n  - toy_sum\n  - toy_word\naggregate_metric_list:\n"
        "  - metric: acc\n    weight_by_size: true\nmetadata:\n  version: 1.0\n"
    )
    return folder


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_tokenizer):
    return tiny_model("llama", 2, vocab_size=len(tiny_tokenizer)), tiny_tokenizer


# ----------------------------------------------------------------------------- lm-eval


def test_evaluate_equals_direct_simple_evaluate(task_dir, model_and_tokenizer):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tok = model_and_tokenizer
    model.train()  # evaluate must put the caller's mode back
    random.seed(7)
    torch.manual_seed(7)
    expected_draws = (random.random(), torch.rand(1).item())
    random.seed(7)
    torch.manual_seed(7)

    ours = evaluate(
        model,
        tok,
        ["toy_group"],
        include_path=task_dir,
        subset=15,
        subset_seed=3,
        batch_size=8,
        precision="fp32",
        seed=11,
    )

    assert model.training
    assert (random.random(), torch.rand(1).item()) == expected_draws

    samples = {name: subset_indices(N_DOCS, 15, 3) for name in TASKS}
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=8)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    direct = simple_evaluate(
        lm,
        tasks=["toy_group"],
        task_manager=manager,
        samples=samples,
        bootstrap_iters=1000,
        random_seed=11,
        numpy_random_seed=11,
        torch_random_seed=11,
        fewshot_random_seed=11,
    )
    assert {name: direct["n-samples"][name]["effective"] for name in TASKS} == {name: 15 for name in TASKS}
    assert ours == flatten_results(direct["results"])
    for name in TASKS:
        assert 0.0 <= ours[f"{name}/acc"] <= 1.0
        assert ours[f"{name}/acc_stderr"] > 0.0
        assert ours[f"{name}/sample_len"] == 15
    # The group aggregate is the size-weighted mean of its members (equal sizes here).
    assert ours["toy_group/acc"] == pytest.approx((ours["toy_sum/acc"] + ours["toy_word/acc"]) / 2)


def test_quiet_evaluate_prints_nothing_and_scores_the_same(task_dir, model_and_tokenizer, capfd, tmp_path,
                                                           monkeypatch):
    """progress=False: no lm-eval bars, and no "fatal: not a git repository" from its git lookup."""
    model, tok = model_and_tokenizer
    monkeypatch.chdir(tmp_path)  # outside any git checkout
    capfd.readouterr()
    quiet = evaluate(model, tok, "toy_sum", include_path=task_dir, subset=10, progress=False)
    out, err = capfd.readouterr()
    assert "fatal" not in err, err
    assert "%|" not in err + out, err + out
    loud = evaluate(model, tok, "toy_sum", include_path=task_dir, subset=10)
    assert "%|" in capfd.readouterr().err  # the bars this test hides do exist
    assert quiet == loud


def test_tokenizations_are_reused_across_calls(task_dir, tiny_tokenizer, monkeypatch):
    """A study scores the same items every trial: the second call encodes nothing (the scores
    stay equal to simple_evaluate's on a plain HFLM, checked above)."""
    import copy

    tok = copy.deepcopy(tiny_tokenizer)  # a tokenizer no other test has warmed the cache with
    model = tiny_model("llama", 2, vocab_size=len(tok))
    calls = []
    encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda *a, **k: calls.append(a) or encode(*a, **k))
    first = evaluate(model, tok, "toy_sum", include_path=task_dir, subset=10, progress=False)
    encoded = len(calls)
    assert encoded >= 20  # context and context + choice of 10 items
    assert evaluate(model, tok, "toy_sum", include_path=task_dir, subset=10, progress=False) == first
    assert len(calls) == encoded


def test_evaluate_is_reproducible(task_dir, model_and_tokenizer):
    """The same subset seed scores the same items (the cached TaskManager serves the second call)."""
    model, tok = model_and_tokenizer
    first, second = (evaluate(model, tok, "toy_sum", include_path=task_dir, subset=10, subset_seed=0) for _ in range(2))
    assert first == second
    assert set(first) == {
        "toy_sum/acc",
        "toy_sum/acc_norm",
        "toy_sum/acc_stderr",
        "toy_sum/acc_norm_stderr",
        "toy_sum/sample_len",
    }
    assert first["toy_sum/sample_len"] == 10


def test_evaluate_user_errors(task_dir, model_and_tokenizer):
    model, tok = model_and_tokenizer
    with pytest.raises(UserError, match="at most one of subset, samples and limit"):
        evaluate(model, tok, "toy_sum", include_path=task_dir, subset=5, limit=5)
    with pytest.raises(UserError, match="unknown lm-eval task 'toy_nope'"):
        evaluate(model, tok, "toy_nope", include_path=task_dir, include_defaults=False)
    with pytest.raises(UserError, match="not a folder"):
        evaluate(model, tok, "toy_sum", include_path=task_dir / "missing")
    with pytest.raises(UserError, match="samples names tasks"):
        evaluate(model, tok, "toy_sum", include_path=task_dir, samples={"toy_word": [0]})


def test_flatten_results_keys():
    results = {
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1},
        "mmlu": {"acc,none": 0.5, "acc_stderr,none": "N/A"},
    }
    assert flatten_results(results) == {
        "gsm8k/exact_match,strict-match": 0.25,
        "gsm8k/exact_match_stderr,strict-match": 0.1,
        "mmlu/acc": 0.5,
    }


# ----------------------------------------------------------------------------- subsets


def test_subset_indices_deterministic_sorted_nested_and_not_first_n():
    picked = subset_indices(1000, 100, seed=0)
    assert picked == subset_indices(1000, 100, seed=0)
    assert picked == sorted(set(picked)) and len(picked) == 100
    assert all(0 <= i < 1000 for i in picked)
    assert picked != list(range(100))
    assert max(picked) > 500  # spread over the whole split, not bunched at its start
    assert subset_indices(1000, 100, seed=1) != picked
    assert set(subset_indices(1000, 30, seed=0)) <= set(picked)  # nested in k
    assert subset_indices(7, 100, seed=0) == list(range(7))
    with pytest.raises(UserError, match="k >= 1"):
        subset_indices(10, 0, seed=0)


# ----------------------------------------------------------------------------- perplexity


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    model = tiny_model("llama", 2, vocab_size=96)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # all logits equal: probability 1/96 for every token
    rows = np.random.default_rng(0).integers(0, 96, size=(5, 17), dtype=np.int32)
    out = perplexity(model, rows, batch_size=2)
    assert out["tokens"] == 5 * 16
    assert out["val_ppl"] == pytest.approx(96, rel=1e-5)
    assert out["val_loss"] == pytest.approx(math.log(96), rel=1e-6)


def test_perplexity_matches_transformers_loss():
    model = tiny_model("qwen2", 2, vocab_size=96)
    model.train()
    rows = np.random.default_rng(1).integers(0, 96, size=(7, 24), dtype=np.int32)
    out = perplexity(model, rows, batch_size=3)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        ids = torch.as_tensor(rows, dtype=torch.long)
        reference = model(input_ids=ids, labels=ids).loss.item()
    assert out["val_loss"] == pytest.approx(reference, rel=1e-5)


def test_perplexity_rejects_bad_rows():
    model = tiny_model("llama", 2, vocab_size=96)
    with pytest.raises(UserError, match="vocabulary has 96"):
        perplexity(model, np.full((2, 8), 200, dtype=np.int32))
    with pytest.raises(UserError, match="shape"):
        perplexity(model, np.zeros(8, dtype=np.int32))


# ----------------------------------------------------------------------------- objective


def test_objective_value_and_direction():
    metrics = {"val_loss": 2.5, "val_ppl": 12.2, "a/acc": 0.4, "b/acc": 0.8}
    loss = ObjectiveConfig()
    assert (objective_value(metrics, loss), direction(loss)) == (2.5, "minimize")
    one = ObjectiveConfig(kind="metric", keys=["a/acc"])
    assert (objective_value(metrics, one), direction(one)) == (0.4, "maximize")
    both = ObjectiveConfig(kind="mean", keys=["a/acc", "b/acc"])
    assert objective_value(metrics, both) == pytest.approx(0.6)
    assert direction(both) == "maximize"
    assert both.describe() == "mean of a/acc, b/acc"


def test_objective_missing_key_is_a_one_line_error():
    cfg = ObjectiveConfig(kind="mean", keys=["a/acc", "c/acc"])
    with pytest.raises(UserError) as info:
        objective_value({"val_loss": 1.0, "a/acc": 0.5}, cfg)
    message = str(info.value)
    assert "\n" not in message and "'c/acc'" in message and "available: a/acc, val_loss" in message


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"kind": "metric"}, "exactly one key"),
        ({"kind": "mean", "keys": []}, "at least one key"),
        ({"kind": "val_loss", "keys": ["a/acc"]}, "takes no keys"),
        ({"kind": "metric", "keys": ["val_loss"]}, "minimised"),
        ({"kind": "metric", "keys": ["acc"]}, "task/metric"),
        ({"kind": "val_loss", "direction": "maximize"}, "Extra inputs"),
        ({"kind": "accuracy"}, "kind"),
    ],
)
def test_objective_config_validation(spec, match):
    with pytest.raises(ValidationError, match=match):
        ObjectiveConfig.model_validate(spec)
