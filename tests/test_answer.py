"""The answer-token metrics of the synthetic queries and the objectives that read them.

- :func:`ablate.synthetic.answer_items`: every distinct query of a small level (counted against an
  enumeration written here), a fixed seeded sample above the bound (the same on every call,
  whatever the global RNG state; not the first N; nested; starting with the lm-eval task's items).
- :func:`ablate.synthetic.answer_metrics` against models whose answer is known: a stub that puts
  all its mass on the right token (loss 0, accuracy 1) and one that is uniform (loss log V per
  answer token, accuracy at chance); batched equals one prompt at a time; its accuracy equals the
  lm-eval-style probe :func:`ablate.synthetic.accuracy`; both tokenizer paths (the answer digit one
  token, or several); the model's mode restored.
- ``objective: {kind: answer_loss}`` (and ``answer_acc``): parsing, direction, value, errors.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model
from pydantic import ValidationError

from ablate.errors import UserError
from ablate.objective import ObjectiveConfig, direction, objective_value
from ablate.synthetic import (
    ANSWER_ITEMS,
    SyntheticConfig,
    accuracy,
    answer_items,
    answer_metrics,
    eval_items,
    world,
)

# ----------------------------------------------------------------------------- tokenizers and stubs


@pytest.fixture(scope="module")
def word_tokenizer():
    """Whitespace-split word-level tokenizer: every word and digit is one token (like the zoo's BPE,
    which writes " 7" as one token), so answer_metrics takes its one-row-per-item path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<|endoftext|>", "apply", "trace", "=", ";", *"0123456789", *"ABCDEFGH", "the", "dog"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def byte_tokenizer():
    """Byte-level BPE without merges: every character is a token, so " 7" is two ("Ġ", "7") and every
    answer digit shares its first token: answer_metrics takes its one-row-per-choice path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tokenizers(word_tokenizer, byte_tokenizer, tiny_tokenizer):
    """By how the answer digit tokenizes: one token, two, or one for some digits and two for others
    (conftest's tiny BPE learned " 7" and not the other digits)."""
    return {"one": word_tokenizer, "two": byte_tokenizer, "mixed": tiny_tokenizer}


TOKENIZERS = ["one", "two", "mixed"]


def _answer_tokens(tokenizer, item) -> list[int]:
    context = tokenizer(item["context"])["input_ids"]
    return tokenizer(f"{item['context']} {item['gold']}")["input_ids"][len(context):]


def _answer_lengths(tokenizer) -> set[int]:
    return {len(_answer_tokens(tokenizer, it)) for it in answer_items(1)}


def test_the_tokenizers_cover_both_paths(tokenizers):
    assert [_answer_lengths(tokenizers[name]) for name in TOKENIZERS] == [{1}, {2}, {1, 2}]


class Oracle(torch.nn.Module):
    """A stub causal LM: after a prefix that is a query's prompt (plus part of its answer), all the
    mass on the answer's next token; uniform logits everywhere else (``perfect=False``: everywhere)."""

    def __init__(self, tokenizer, items, vocab: int, perfect: bool = True):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a parameter: answer_metrics reads the device
        self.vocab, self.perfect = vocab, perfect
        self.next: dict[tuple, int] = {}
        for item in items:
            n_ctx = len(tokenizer(item["context"])["input_ids"])
            whole = tokenizer(f"{item['context']} {item['gold']}")["input_ids"]
            for j in range(n_ctx, len(whole)):
                self.next[tuple(whole[:j])] = whole[j]
        self.calls = 0

    def forward(self, input_ids, use_cache=None):
        self.calls += 1
        logits = torch.zeros(*input_ids.shape, self.vocab, device=input_ids.device)
        if self.perfect:
            rows = input_ids.tolist()
            for b, row in enumerate(rows):
                for t in range(len(row)):
                    token = self.next.get(tuple(row[:t + 1]))
                    if token is not None:
                        logits[b, t, token] = 60.0
        return SimpleNamespace(logits=logits + 0 * self.anchor)


LEVELS = (1, 2, 3)
SMALL = 100  # max_items of the quick tests: k = 1 full (40), k = 2 and 3 sampled (100 each)


# ----------------------------------------------------------------------------- items


def _enumerated(k, config=None):
    """Every (start, ops) of level k with its answer, computed here, not by ablate.synthetic."""
    config = config or SyntheticConfig()
    perms = world(config.num_symbols, config.num_functions, config.world_seed)
    out = {}
    for ops in itertools.product(sorted(perms), repeat=k):
        for start in range(config.num_symbols):
            state = start
            for op in ops:
                state = perms[op][state]
            out[f"apply {start} {' '.join(ops)} ="] = state
    return out


def test_small_levels_are_every_distinct_query():
    for k, count in [(1, 40), (2, 160), (3, 640)]:
        items = answer_items(k)
        truth = _enumerated(k)
        assert len(truth) == count == len(items) == len({it["context"] for it in items})
        assert {it["context"]: it["gold"] for it in items} == truth
        assert Counter(it["gold"] for it in items) == {d: count // 10 for d in range(10)}
        assert all(it["k"] == k and it["choices"] == [str(d) for d in range(10)] for it in items)
        assert answer_items(k, seed=5) == items  # the full set does not depend on the seed
    small = SyntheticConfig(num_symbols=5, num_functions=3)
    assert len(answer_items(2, config=small)) == 5 * 3**2
    assert {it["context"]: it["gold"] for it in answer_items(2, config=small)} == _enumerated(2, small)


def test_the_bound_between_every_item_and_a_sample():
    assert ANSWER_ITEMS == 1000
    assert len(answer_items(3, 640)) == 640 and answer_items(3, 640) == answer_items(3, 640, seed=1)
    sample = answer_items(3, 639)
    assert len(sample) == 639 and sample != answer_items(3, 639, seed=1)


def test_the_sample_is_fixed_seeded_and_not_the_first_n():
    truth = _enumerated(4)
    items = answer_items(4)
    assert len(truth) == 2560 and len(items) == ANSWER_ITEMS == len({it["context"] for it in items})
    assert all(truth[it["context"]] == it["gold"] for it in items)  # real queries, right answers
    assert Counter(it["gold"] for it in items) == {d: 100 for d in range(10)}  # balanced answers
    random.seed(123)
    torch.manual_seed(123)
    assert answer_items(4) == items  # the same on every call, whatever the global RNG state
    other = answer_items(4, seed=1)
    assert other != items and len({it["context"] for it in other} & {it["context"] for it in items}) < 1000
    first = list(truth)[:ANSWER_ITEMS]
    assert [it["context"] for it in items] != first and {it["context"] for it in items} != set(first)
    # nested, and it starts with the items of the lm-eval task synth_k4 written with the same seed
    assert answer_items(4, 300) == items[:300]
    assert items[:200] == eval_items(4, 200, seed=0)


def test_bad_arguments_are_one_line_errors(word_tokenizer):
    stub = Oracle(word_tokenizer, [], len(word_tokenizer))
    for kwargs, match in [({"levels": [0, 1]}, "levels"), ({"levels": []}, "levels"),
                          ({"batch_size": 0}, "batch_size"), ({"max_items": 0}, "max_items")]:
        with pytest.raises(UserError, match=match) as info:
            answer_metrics(stub, word_tokenizer, **kwargs)
        assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- metrics


def _items(levels=LEVELS, max_items=SMALL):
    return [it for k in levels for it in answer_items(k, max_items)]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_a_perfect_model_scores_zero_loss_and_full_accuracy(name, tokenizers):
    tokenizer = tokenizers[name]
    stub = Oracle(tokenizer, _items(), len(tokenizer))
    out = answer_metrics(stub, tokenizer, levels=LEVELS, max_items=SMALL, batch_size=64)
    assert set(out) == {*(f"answer_k{k}/{m}" for k in LEVELS for m in ("loss", "acc")), "answer/loss", "answer/acc"}
    for key, value in out.items():
        assert value == (1.0 if key.endswith("acc") else pytest.approx(0.0, abs=1e-6)), key


def test_a_uniform_model_scores_log_v_and_chance(word_tokenizer):
    vocab = len(word_tokenizer)
    stub = Oracle(word_tokenizer, [], vocab, perfect=False)
    out = answer_metrics(stub, word_tokenizer, levels=LEVELS, max_items=SMALL)
    for k in LEVELS:
        assert out[f"answer_k{k}/loss"] == pytest.approx(math.log(vocab))  # over the whole vocabulary
        assert out[f"answer_k{k}/acc"] == pytest.approx(0.1)  # ties go to digit 0: 1 / num_symbols
    assert out["answer/loss"] == pytest.approx(math.log(vocab)) and out["answer/acc"] == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["two", "mixed"])
def test_split_answers_are_charged_for_every_token(name, tokenizers):
    tokenizer = tokenizers[name]
    vocab = len(tokenizer)
    out = answer_metrics(Oracle(tokenizer, [], vocab, perfect=False), tokenizer, levels=(1,))
    tokens = [len(_answer_tokens(tokenizer, it)) for it in answer_items(1)]
    assert out["answer_k1/loss"] == pytest.approx(sum(tokens) / len(tokens) * math.log(vocab))
    if name == "two":  # every choice equally likely: ties go to digit 0
        assert out["answer_k1/acc"] == pytest.approx(0.1)


def test_one_level_right_only_moves_that_level(word_tokenizer):
    """The stub knows k = 1 and k = 3: the levels are scored apart, and the totals are plain means."""
    vocab = len(word_tokenizer)
    stub = Oracle(word_tokenizer, _items(levels=(1, 3)), vocab)
    out = answer_metrics(stub, word_tokenizer, levels=(3, 2, 1, 2), max_items=SMALL)  # order, repeats: no matter
    assert list(out)[:6] == [f"answer_k{k}/{m}" for k in (1, 2, 3) for m in ("loss", "acc")]
    assert (out["answer_k1/acc"], out["answer_k2/acc"], out["answer_k3/acc"]) == (1.0, 0.1, 1.0)
    assert out["answer_k2/loss"] == pytest.approx(math.log(vocab)) and out["answer_k3/loss"] < 1e-6
    assert out["answer/loss"] == pytest.approx(math.log(vocab) / 3)
    assert out["answer/acc"] == pytest.approx(2.1 / 3)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_batched_equals_one_prompt_at_a_time(name, tokenizers):
    tokenizer = tokenizers[name]
    levels, max_items = (1, 3), 30
    lengths = {len(tokenizer(it["context"])["input_ids"]) for it in _items(levels, max_items)}
    assert len(lengths) > 1  # batches mix prompt lengths: padding is exercised
    model = tiny_model("llama", 2, vocab_size=len(tokenizer), seed=1)
    alone = answer_metrics(model, tokenizer, levels=levels, max_items=max_items, batch_size=1)
    for batch_size in (7, 256):
        batched = answer_metrics(model, tokenizer, levels=levels, max_items=max_items, batch_size=batch_size)
        assert batched.keys() == alone.keys()
        for key in alone:
            assert batched[key] == pytest.approx(alone[key], rel=1e-5, abs=1e-6), (batch_size, key)
    assert 0.5 < alone["answer/loss"] < 20  # a random model: neither certain nor broken


@pytest.mark.parametrize("name", TOKENIZERS)
def test_accuracy_equals_the_lm_eval_style_probe(name, tokenizers):
    """answer_k<k>/acc is the multiple-choice acc of ablate.synthetic.accuracy (and so of lm-eval's
    synth_k<k> tasks, tested equal in test_synthetic.py) on the same items."""
    tokenizer = tokenizers[name]
    seen = set()
    for seed in range(4):
        # large initial weights: logits far from uniform, so the choices differ by more than their token counts
        model = tiny_model("llama", 2, vocab_size=len(tokenizer), seed=seed, initializer_range=0.5)
        out = answer_metrics(model, tokenizer, levels=LEVELS, max_items=60)
        for k in LEVELS:
            probe = accuracy(model, tokenizer, answer_items(k, 60))
            assert out[f"answer_k{k}/acc"] == pytest.approx(probe), (seed, k)
            seen.add(round(probe, 6))
    if name != "mixed":  # there " 7" is one token and every other digit two: a random model says 7
        assert len(seen) > 2  # the accuracies differ between models and levels: the comparison can fail


def test_mode_is_restored_and_no_gradients_are_kept(word_tokenizer):
    model = tiny_model("llama", 2, vocab_size=len(word_tokenizer)).train()
    seen = []
    original = model.forward

    def spy(*args, **kwargs):
        seen.append((model.training, torch.is_grad_enabled()))
        return original(*args, **kwargs)

    model.forward = spy
    answer_metrics(model, word_tokenizer, levels=(1,), batch_size=16)
    assert seen and set(seen) == {(False, False)} and len(seen) == 3  # 40 prompts in batches of 16
    assert model.training and all(p.grad is None for p in model.parameters())


def test_encodings_are_remembered_per_tokenizer(word_tokenizer):
    """Every trial scores the same items with the same tokenizer: it encodes them once."""

    class Counting:
        def __init__(self):
            self.calls = 0

        def __call__(self, texts):
            self.calls += 1
            return word_tokenizer(texts)

    tokenizer = Counting()
    model = tiny_model("llama", 2, vocab_size=len(word_tokenizer), seed=4)
    first = answer_metrics(model, tokenizer, levels=(1, 2), max_items=SMALL)
    assert tokenizer.calls == 2  # the prompts, then the prompts with each answer
    assert answer_metrics(model, tokenizer, levels=(1, 2), max_items=SMALL) == first
    assert tokenizer.calls == 2
    answer_metrics(model, tokenizer, levels=(1, 2), max_items=SMALL, seed=1)  # other items: encoded
    assert tokenizer.calls == 4
    assert answer_metrics(model, word_tokenizer, levels=(1, 2), max_items=SMALL) == first


@pytest.mark.gpu
def test_cuda_equals_cpu(word_tokenizer):
    model = tiny_model("llama", 2, vocab_size=len(word_tokenizer), seed=2)
    on_cpu = answer_metrics(model, word_tokenizer, levels=LEVELS, max_items=SMALL)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        on_gpu = answer_metrics(model.to("cuda"), word_tokenizer, levels=LEVELS, max_items=SMALL)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    for key in on_cpu:
        assert on_gpu[key] == pytest.approx(on_cpu[key], rel=1e-4, abs=1e-5), key


# ----------------------------------------------------------------------------- objective


def test_answer_objectives_parse_and_read_their_metric():
    metrics = {"val_loss": 2.5, "answer/loss": 0.7, "answer/acc": 0.6, "answer_k1/loss": 0.1}
    loss = ObjectiveConfig.model_validate({"kind": "answer_loss"})
    assert (objective_value(metrics, loss), direction(loss)) == (0.7, "minimize")
    assert loss.describe() == "answer loss (nats, mean of k)" and len(loss.describe()) <= 30
    acc = ObjectiveConfig.model_validate({"kind": "answer_acc"})
    assert (objective_value(metrics, acc), direction(acc)) == (0.6, "maximize")
    assert acc.describe() == "answer accuracy (mean of k)"
    assert (objective_value(metrics, ObjectiveConfig()), direction(ObjectiveConfig())) == (2.5, "minimize")
    assert ObjectiveConfig().describe() == "held-out loss"


def test_answer_objective_without_answer_metrics_names_the_fix():
    with pytest.raises(UserError) as info:
        objective_value({"val_loss": 1.0, "synth_k1/acc": 0.5}, ObjectiveConfig(kind="answer_loss"))
    message = str(info.value)
    assert "\n" not in message and "'answer/loss'" in message and "eval.synthetic_tasks" in message
    assert "available: synth_k1/acc, val_loss" in message


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"kind": "answer_loss", "keys": ["answer/loss"]}, "kind 'answer_loss' takes no keys"),
        ({"kind": "answer_acc", "keys": ["a/acc"]}, "kind 'answer_acc' takes no keys"),
        ({"kind": "metric", "keys": ["answer/loss"]}, "answer/loss: lower is better.*answer_loss"),
        ({"kind": "mean", "keys": ["answer_k1/loss", "answer_k2/acc"]}, "answer_k1/loss: lower is better"),
        ({"kind": "answer_loss", "direction": "maximize"}, "Extra inputs"),
        ({"kind": "answer"}, "kind"),
    ],
)
def test_answer_objective_validation(spec, match):
    with pytest.raises(ValidationError, match=match) as info:
        ObjectiveConfig.model_validate(spec)
    assert len(info.value.errors()) == 1


def test_answer_accuracies_are_fine_keys():
    cfg = ObjectiveConfig(kind="mean", keys=["answer_k3/acc", "answer_k4/acc"])
    assert objective_value({"answer_k3/acc": 0.5, "answer_k4/acc": 0.3}, cfg) == pytest.approx(0.4)
    assert direction(cfg) == "maximize"
