"""The deterministic synthetic corpus of the embedded default, and its evaluation tasks.

Documents mix two kinds of text:

- **Language**: sentences from a small grammar with number agreement across nested relative
  clauses ("the dog that the cats chase runs ."), so held-out loss measures ordinary language
  modelling, long-range agreement included.
- **Reasoning** about a fixed "world" of ``num_functions`` random permutations of the digits,
  named A, B, C, ... (derived from ``world_seed``). A *query* applies k of them, left to right,
  to a start digit and states the result: ``apply 7 A B = 3`` means B(A(7)) = 3. A *trace* writes
  every intermediate state: ``trace 7 A 5 B 3``. Traces teach the single steps (each is one
  lookup); queries ask for k steps done silently, inside the network.

Why depth plausibly matters. A query needs k *sequential* lookups: step j needs the result of
step j-1. A transformer layer can fetch one earlier result (attention) and apply one table (MLP),
so a natural circuit uses about one layer per step; the permutations generate a non-solvable
group (checked by :func:`world_is_nonsolvable`), whose word problem is NC1-complete (Barrington
1989), so no constant-depth shortcut is expected to cover every k (Liu et al. 2023, "Transformers
learn shortcuts to automata"; Merrill & Sabharwal 2023). Evaluation asks queries with k = 1..4:
k = 1 is one lookup, higher k need more serial computation than a small, short-trained model has.

Why the corpus looks like this (scratch runs; the numbers are in studies/LOG.md, 2026-12-02
"Measurements formerly in module docstrings", part "Synthetic corpus learnability"):

- Traces are mixed in because queries alone were not learned at all, k = 1 included: the
  unlearnable long queries drown the signal of the short ones. With traces k = 1 is learned.
- Narrow heads: 16-wide heads learned the single step reliably, 32-wide ones did not always.
- Depth delays the transition at a fixed budget, and deeper models need a larger learning rate
  and more steps: why the zoo trains at lr 6e-3 and gives its 6-layer model more tokens.
- A 4-layer model trained long enough has one level at ceiling (k = 1), one in between and two
  with headroom: the profile a depth study needs.

Evaluation items come from a seed stream never used for training and have exactly balanced
answers (each digit is the answer equally often), so a constant or surface guess scores
``1 / num_symbols``. The item space is finite: 10 x 4^k queries, so at k = 1 (40) and k = 2
(160) training contains every evaluation question too, and a model may answer them from a
memorised table; from k = 3 (640) on, a memorised table is ever less practical.

Two readings of the same questions. The lm-eval tasks ``synth_k<k>`` (:func:`write_eval_tasks`)
give an accuracy per level on a few hundred items. :func:`answer_metrics` gives the loss and
accuracy of the answer token per level, on every distinct query of the small levels and a fixed
sample above (:func:`answer_items`): the loss moves before the accuracy does, and the answers are
only about 4% of held-out tokens (all levels together; measured on 3,000 validation documents
with the zoo tokenizer), so the held-out loss over all tokens barely sees them.

    python -c "from ablate.synthetic import iter_documents; it = iter_documents(); print(next(it))"
"""

from __future__ import annotations

import itertools
import json
import os
import random
import weakref
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ablate.errors import UserError
from ablate.fsutil import atomic_write_text
from ablate.torchutil import evaluating

__all__ = [
    "SyntheticConfig",
    "iter_documents",
    "world",
    "world_is_nonsolvable",
    "query_item",
    "eval_items",
    "accuracy",
    "answer_items",
    "answer_metrics",
    "write_eval_tasks",
    "task_names",
    "chance_level",
    "DEFAULT_LEVELS",
    "ANSWER_ITEMS",
]

DEFAULT_LEVELS = (1, 2, 3, 4)  # k = 1 is one lookup (learnable in the zoo's budget); 4 has headroom
# answer_metrics scores every distinct query of a level with at most this many (k <= 3 of the default
# world: 40, 160, 640) and a fixed sample of this many above (k = 4: 1,000 of 2,560; the standard
# error of an accuracy near 0.5 is then about 0.016).
ANSWER_ITEMS = 1000
SPLIT_SALT = {"train": "train", "val": "val"}  # separate RNG streams: train and val never share a draw
EVAL_SALT = "eval"  # evaluation items use a third stream, never used for training or validation
QUERY, TRACE = "apply", "trace"  # the words that open a reasoning document


class SyntheticConfig(BaseModel):
    """Knobs of the corpus. ``ablate.data`` reads the defaults; editing one changes the documents
    and, through this module's hash in the cache key, every packed cache built from them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text_share: float = Field(0.3, ge=0, le=1, description="Share of documents that are grammar "
                              "text; the rest are reasoning documents. 0.3 keeps a language signal "
                              "while most tokens go to the slower-to-learn reasoning items.")
    trace_share: float = Field(0.5, ge=0, le=1, description="Share of reasoning documents that are "
                               "traces (every state written out). Without traces even k=1 queries "
                               "were not learned in the zoo's budget (see the module docstring).")
    num_symbols: int = Field(10, ge=3, le=10, description="States are the digits 0..num_symbols-1; "
                             "chance on a query is 1/num_symbols.")
    num_functions: int = Field(4, ge=2, le=26, description="Fixed permutations A, B, ...; 4 gives "
                               "40 single-step facts, few enough for a small model to learn fast.")
    world_seed: int = Field(0, ge=0, description="Seed of the permutations (the 'world'); training "
                            "text and evaluation items must share it.")
    query_k: tuple[int, int] = Field((1, 4), description="Inclusive range of steps k of training "
                                     "queries: the evaluated levels. Longer queries are unlearnable "
                                     "noise at the zoo's budget and delayed learning k = 1.")
    trace_k: tuple[int, int] = Field((1, 8), description="Inclusive range of steps of traces.")
    items_per_doc: tuple[int, int] = Field((4, 12), description="Inclusive range of queries or "
                                           "traces per reasoning document, separated by ' ;'.")
    sentences_per_doc: tuple[int, int] = Field((3, 8), description="Inclusive range of sentences "
                                               "per text document.")
    max_nesting: int = Field(2, ge=0, le=4, description="Deepest relative-clause nesting of grammar "
                             "sentences (0: none).")

    @model_validator(mode="after")
    def _ranges(self) -> SyntheticConfig:
        for name in ("query_k", "trace_k", "items_per_doc", "sentences_per_doc"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ValueError(f"{name}=({low}, {high}) must satisfy 1 <= low <= high")
        return self


# ----------------------------------------------------------------------------- the world


@lru_cache(maxsize=8)
def world(num_symbols: int = 10, num_functions: int = 4, world_seed: int = 0) -> Mapping[str, tuple[int, ...]]:
    """The fixed permutations ``{"A": (A(0), A(1), ...), ...}`` of ``range(num_symbols)`` (read-only).

    Each is a derangement (no fixed point), so at k = 1 copying the start digit is always wrong
    (a guesser that knows this and nothing else scores 1/9 instead of 1/10 at k = 1).
    """
    rng = random.Random(f"ablate-synthetic/world/{world_seed}")
    perms = {}
    for name in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:num_functions]:
        while True:
            p = list(range(num_symbols))
            rng.shuffle(p)
            if all(p[i] != i for i in range(num_symbols)):
                break
        perms[name] = tuple(p)
    return MappingProxyType(perms)  # cached: callers must not be able to change the world


def _world(config: SyntheticConfig) -> Mapping[str, tuple[int, ...]]:
    return world(config.num_symbols, config.num_functions, config.world_seed)


def world_is_nonsolvable(config: SyntheticConfig | None = None) -> bool:
    """True when the permutations generate a non-solvable group (no shortcut of constant depth)."""
    from sympy.combinatorics import Permutation, PermutationGroup

    perms = _world(config or SyntheticConfig())
    return not PermutationGroup([Permutation(list(p)) for p in perms.values()]).is_solvable


def apply(perms: Mapping[str, tuple[int, ...]], start: int, ops: Sequence[str]) -> int:
    """The state after applying ``ops`` left to right to ``start``."""
    state = start
    for op in ops:
        state = perms[op][state]
    return state


def query_item(perms: Mapping[str, tuple[int, ...]], start: int, ops: Sequence[str]) -> tuple[str, str]:
    """``(context, answer)`` of one query: ``("7 A B =", "3")``."""
    return f"{start} {' '.join(ops)} =", str(apply(perms, start, ops))


def _query(rng: random.Random, perms, config: SyntheticConfig) -> str:
    k = rng.randint(*config.query_k)
    context, answer = query_item(perms, rng.randrange(config.num_symbols), rng.choices(list(perms), k=k))
    return f"{context} {answer}"


def _trace(rng: random.Random, perms, config: SyntheticConfig) -> str:
    state = rng.randrange(config.num_symbols)
    parts = [str(state)]
    for op in rng.choices(list(perms), k=rng.randint(*config.trace_k)):
        state = perms[op][state]
        parts += [op, str(state)]
    return " ".join(parts)


# ----------------------------------------------------------------------------- the grammar

# (singular, plural) pairs; irregular plurals make agreement a property of words, not of "-s".
NOUNS = [("dog", "dogs"), ("cat", "cats"), ("bird", "birds"), ("fox", "foxes"), ("child", "children"),
         ("teacher", "teachers"), ("farmer", "farmers"), ("king", "kings"), ("horse", "horses"),
         ("mouse", "mice"), ("wolf", "wolves"), ("girl", "girls")]
INTRANSITIVE = [("runs", "run"), ("sleeps", "sleep"), ("sings", "sing"), ("waits", "wait"),
                ("laughs", "laugh"), ("falls", "fall")]
TRANSITIVE = [("sees", "see"), ("chases", "chase"), ("likes", "like"), ("helps", "help"),
              ("finds", "find"), ("follows", "follow")]
DETERMINERS = (["the", "a", "every", "this"], ["the", "some", "many", "these"])  # (singular, plural)
ADJECTIVES = ["small", "big", "old", "young", "red", "happy", "quiet"]
ADVERBS = ["quickly", "slowly", "again", "today", "at night", "in the garden", "near the river"]


def _noun_phrase(rng: random.Random, depth: int) -> tuple[str, bool]:
    """``(words, plural)``; ``depth`` relative clauses may nest inside."""
    plural = rng.random() < 0.5
    words = [rng.choice(DETERMINERS[plural])]
    if rng.random() < 0.3:
        words.append(rng.choice(ADJECTIVES))
    words.append(NOUNS[rng.randrange(len(NOUNS))][plural])
    if depth > 0:
        if rng.random() < 0.5:  # subject relative: the verb agrees with the head noun
            words += ["that", _verb_phrase(rng, plural, depth - 1)]
        else:  # object relative: the verb agrees with the inner subject, an attractor
            inner, inner_plural = _noun_phrase(rng, depth - 1)
            words += ["that", inner, TRANSITIVE[rng.randrange(len(TRANSITIVE))][inner_plural]]
    return " ".join(words), plural


def _verb_phrase(rng: random.Random, plural: bool, depth: int) -> str:
    if rng.random() < 0.5:
        words = [INTRANSITIVE[rng.randrange(len(INTRANSITIVE))][plural]]
    else:
        words = [TRANSITIVE[rng.randrange(len(TRANSITIVE))][plural], _noun_phrase(rng, depth)[0]]
    if rng.random() < 0.3:
        words.append(rng.choice(ADVERBS))
    return " ".join(words)


def sentence(rng: random.Random, nesting: int) -> str:
    """One sentence whose subject carries ``nesting`` levels of relative clauses."""
    subject, plural = _noun_phrase(rng, nesting)
    return f"{subject} {_verb_phrase(rng, plural, 0)} ."


def _text(rng: random.Random, config: SyntheticConfig) -> str:
    count = rng.randint(*config.sentences_per_doc)
    return " ".join(sentence(rng, rng.randint(0, config.max_nesting)) for _ in range(count))


# ----------------------------------------------------------------------------- documents


def iter_documents(split: str = "train", seed: int = 0, config: SyntheticConfig | None = None) -> Iterator[str]:
    """An endless, deterministic stream of documents of ``split`` ("train" or "val").

    The same ``(split, seed, config)`` gives the same strings on every machine (string-seeded
    ``random.Random``: Python hashes the seed with SHA-512, never with ``hash()``). "train" and
    "val" draw from separate streams; evaluation items (:func:`eval_items`) from a third.
    """
    if split not in SPLIT_SALT:
        raise UserError(f"unknown split {split!r}; use 'train' or 'val'")
    config = config or SyntheticConfig()
    perms = _world(config)
    rng = random.Random(f"ablate-synthetic/{SPLIT_SALT[split]}/{seed}")
    while True:
        if rng.random() < config.text_share:
            yield _text(rng, config)
        else:
            trace = rng.random() < config.trace_share
            make, word = (_trace, TRACE) if trace else (_query, QUERY)
            items = [make(rng, perms, config) for _ in range(rng.randint(*config.items_per_doc))]
            yield f"{word} " + " ; ".join(items)


# ----------------------------------------------------------------------------- evaluation


def chance_level(config: SyntheticConfig | None = None) -> float:
    """Accuracy of guessing on any query task: answers are balanced over the digits."""
    return 1.0 / (config or SyntheticConfig()).num_symbols


def eval_items(k: int, n: int, *, seed: int = 0, config: SyntheticConfig | None = None) -> list[dict]:
    """``n`` distinct queries of ``k`` steps, each answer digit equally often (fewer when fewer exist).

    Items are ``{"context": "apply 7 A B =", "choices": ["0", ..., "9"], "gold": 3, "k": k}``.
    The op sequence is uniform; the start digit is solved backwards from the wanted answer, so the
    answers are exactly balanced without biasing which functions appear.
    """
    config = config or SyntheticConfig()
    perms = _world(config)
    names, digits = list(perms), config.num_symbols
    total = digits * len(names) ** k
    n = min(n, total)
    rng = random.Random(f"ablate-synthetic/{EVAL_SALT}/{seed}/k{k}")
    seen: set[tuple] = set()
    items = []
    while len(items) < n:
        answer = len(items) % digits  # round-robin over answers: balanced up to n % digits
        ops = tuple(rng.choices(names, k=k))
        start = next(s for s in range(digits) if apply(perms, s, ops) == answer)
        if (start, ops) in seen:
            continue
        seen.add((start, ops))
        context, gold = query_item(perms, start, ops)
        items.append({"context": f"{QUERY} {context}", "choices": [str(d) for d in range(digits)],
                      "gold": int(gold), "k": k})
    return items


def accuracy(model, tokenizer, items: Sequence[dict], *, batch_size: int = 256) -> float:
    """Multiple-choice accuracy of ``model`` on ``items``, scored as lm-eval's ``acc`` does.

    Each choice is appended to the context after a space; the choice with the highest summed
    log-probability of its tokens wins. A quick probe for calibration, without lm-eval's import
    and setup cost; ``tests/test_synthetic.py`` checks it against ``lm_eval.simple_evaluate``.
    """
    import torch

    rows, spans = [], []
    for item in items:
        n_ctx = len(tokenizer(item["context"])["input_ids"])
        for choice in item["choices"]:
            ids = tokenizer(f"{item['context']} {choice}")["input_ids"]
            rows.append(ids)
            spans.append((n_ctx, len(ids)))
    scores: list[float] = []
    device = next(model.parameters()).device
    with evaluating(model):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([r + [0] * (width - len(r)) for r in chunk], device=device)  # right padding
            logp = model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
            # log p(token t | tokens < t) for t = 1..width-1, summed over each choice's tokens
            token_logp = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
            t = torch.arange(1, width, device=device)
            bounds = torch.tensor(spans[start:start + len(chunk)], device=device)
            lo, hi = bounds[:, :1], bounds[:, 1:]
            scores += (token_logp * ((t >= lo) & (t < hi))).sum(-1).tolist()
    correct, at = 0, 0
    for item in items:
        best = max(range(len(item["choices"])), key=lambda c: scores[at + c])
        correct += best == item["gold"]
        at += len(item["choices"])
    return correct / len(items)


def _levels(levels: Sequence[int]) -> list[int]:
    out = sorted(set(int(k) for k in levels))
    if not out or out[0] < 1:
        raise UserError(f"levels {out} must be a non-empty list of step counts k >= 1")
    return out


def answer_items(k: int, max_items: int = ANSWER_ITEMS, *, seed: int = 0,
                 config: SyntheticConfig | None = None) -> list[dict]:
    """The queries of ``k`` steps that :func:`answer_metrics` scores, as :func:`eval_items` dicts.

    A query is a start digit and a sequence of ``k`` function names, so a level has
    ``num_symbols * num_functions ** k`` distinct ones (40, 160, 640, 2,560 for k = 1..4 of the
    default world). When that is at most ``max_items``, every one of them, in a fixed order (op
    sequences in alphabetical order, start digits ascending; ``seed`` plays no part). Above it,
    ``eval_items(k, max_items, seed=seed)``: a sample drawn from a string-seeded stream of its own
    (no global RNG state, the same on every call and machine), never "the first N" of the
    enumeration, nested in ``max_items``, and starting with the items of the lm-eval task
    ``synth_k<k>`` written with the same seed. Answers are balanced either way: exactly in the full
    set (each op sequence is a bijection of the digits), up to ``max_items % num_symbols`` in a sample.
    """
    if k < 1:
        raise UserError(f"k={k} must be a step count >= 1")
    if max_items < 1:
        raise UserError(f"max_items={max_items} must be at least 1")
    config = config or SyntheticConfig()
    perms = _world(config)
    if config.num_symbols * len(perms) ** k > max_items:
        return eval_items(k, max_items, seed=seed, config=config)
    choices = [str(d) for d in range(config.num_symbols)]
    items = []
    for ops in itertools.product(list(perms), repeat=k):
        for start in range(config.num_symbols):
            context, gold = query_item(perms, start, ops)
            items.append({"context": f"{QUERY} {context}", "choices": choices, "gold": int(gold), "k": k})
    return items


def answer_metrics(model, tokenizer, *, levels: Sequence[int] = DEFAULT_LEVELS, max_items: int = ANSWER_ITEMS,
                   seed: int = 0, batch_size: int = 256, config: SyntheticConfig | None = None,
                   per_item: dict | None = None) -> dict[str, float]:
    """Loss and accuracy of ``model`` on the answer of the k-step queries, per level k.

    Items: :func:`answer_items` per level (every distinct query up to ``max_items``, a fixed seeded
    sample above). Each prompt is tokenized as lm-eval and :func:`accuracy` do (the tokenizer's
    defaults; the answer is the digit after a space).

    - ``answer_k<k>/loss``: mean cross-entropy in nats of the correct answer given the prompt,
      over the **whole vocabulary**: what training minimises and a proper score, so it also
      charges a model that is unsure a digit comes at all. With a tokenizer that writes " 7" as
      one token (the zoo's) it is that token's loss; one that splits it gets the summed loss of
      its tokens (the negative log-likelihood of the answer string).
    - ``answer_k<k>/acc``: argmax accuracy over the **answer alphabet** (the ``num_symbols``
      digits; ties go to the lowest digit): the multiple-choice ``acc`` of lm-eval and of
      :func:`accuracy` on the same items (tested equal), with chance exactly ``1 / num_symbols``
      on balanced answers. An argmax over the whole vocabulary would add "is it a digit at all",
      which the loss already measures, and make chance depend on the tokenizer.
    - ``answer/loss``, ``answer/acc``: the unweighted mean over levels, each level counting once
      however many items it has.

    ``per_item``, when given, receives ``{"answer_k<k>": {"hit": [0/1, ...], "loss": [...]}}`` in the
    order of :func:`answer_items`, the same items for every model: what a bootstrap over items needs.

    One forward pass per ``batch_size`` prompts (right-padded; a causal model's logits at real
    positions never see the padding), fp32 softmax over the model's own-dtype logits, no
    gradients, on the model's device; the train/eval mode is restored afterwards.
    """
    levels = _levels(levels)
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be at least 1")
    items = [item for k in levels for item in answer_items(k, max_items, seed=seed, config=config)]
    scores = _choice_logprobs(model, tokenizer, items, batch_size)  # [items, choices], float64 on CPU
    gold = [item["gold"] for item in items]
    losses = [-float(row[g]) for row, g in zip(scores, gold, strict=True)]
    hits = [float(int(row.argmax()) == g) for row, g in zip(scores, gold, strict=True)]
    out: dict[str, float] = {}
    for k in levels:
        mine = [i for i, item in enumerate(items) if item["k"] == k]
        out[f"answer_k{k}/loss"] = sum(losses[i] for i in mine) / len(mine)
        out[f"answer_k{k}/acc"] = sum(hits[i] for i in mine) / len(mine)
        if per_item is not None:
            per_item[f"answer_k{k}"] = {"hit": [int(hits[i]) for i in mine], "loss": [losses[i] for i in mine]}
    out["answer/loss"] = sum(out[f"answer_k{k}/loss"] for k in levels) / len(levels)
    out["answer/acc"] = sum(out[f"answer_k{k}/acc"] for k in levels) / len(levels)
    return out


_ENCODED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {texts: their token ids}


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """``tokenizer(texts)["input_ids"]`` (not to be changed by the caller), remembered for as long as
    the tokenizer lives: every trial of a study scores the same items with the same tokenizer, and
    encoding the ~20,000 prompt and answer strings of the default levels took longer than scoring
    them with a zoo model."""
    try:
        cache = _ENCODED.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: no cache
        return tokenizer(texts)["input_ids"]
    key = tuple(texts)
    if key not in cache:
        cache[key] = tokenizer(texts)["input_ids"]
    return cache[key]


def _choice_logprobs(model, tokenizer, items: Sequence[dict], batch_size: int):
    """``[len(items), choices]`` float64 tensor: log p(choice | context) summed over the choice's tokens.

    Choices continue the context after a space, split off the whole text's tokens as lm-eval does.
    When every choice is one token that extends the context's tokens (the zoo's tokenizer), one
    row per item is enough: the logits after the context. Otherwise one row per (item, choice).
    """
    import torch

    n_choices = len(items[0]["choices"])
    if any(len(item["choices"]) != n_choices for item in items):
        raise UserError("answer items must all have the same number of choices")
    contexts = _encode(tokenizer, [item["context"] for item in items])
    wholes = _encode(tokenizer, [f"{item['context']} {c}" for item in items for c in item["choices"]])
    spans = [(len(contexts[i // n_choices]), len(whole)) for i, whole in enumerate(wholes)]
    if any(lo >= hi for lo, hi in spans):
        raise UserError("the tokenizer gives an answer digit no tokens of its own after the prompt")
    single = all(hi == lo + 1 and whole[:lo] == contexts[i // n_choices]
                 for i, (whole, (lo, hi)) in enumerate(zip(wholes, spans, strict=True)))
    device = next(model.parameters()).device
    rows = contexts if single else wholes
    out = []
    with evaluating(model):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([r + [0] * (width - len(r)) for r in chunk], device=device)  # right padding
            logits = model(input_ids=ids, use_cache=False).logits
            # Only the positions that predict an answer go through the fp32 softmax: a copy of all
            # the logits in fp32 would be rows x width x vocab floats (GBs for a 150k vocabulary).
            if single:  # the next-token distribution after each context, read at the choices' tokens
                last = torch.tensor([len(r) - 1 for r in chunk], device=device)
                logp = logits[torch.arange(len(chunk), device=device), last].float().log_softmax(-1)
                targets = torch.tensor([[w[-1] for w in wholes[(start + j) * n_choices:(start + j + 1) * n_choices]]
                                        for j in range(len(chunk))], device=device)
                out.append(logp.gather(-1, targets).double().cpu())
            else:  # log p(token t | tokens < t), t from the first answer token on, summed over each choice's tokens
                bounds = torch.tensor(spans[start:start + len(chunk)], device=device)
                first = min(lo for lo, _ in spans[start:start + len(chunk)])
                logp = logits[:, first - 1:-1].float().log_softmax(-1)
                token_logp = logp.gather(-1, ids[:, first:, None]).squeeze(-1)
                t = torch.arange(first, width, device=device)
                inside = (t >= bounds[:, :1]) & (t < bounds[:, 1:])
                out.append((token_logp.double() * inside).sum(-1).cpu())
    return torch.cat(out).reshape(len(items), n_choices)


def _task_yaml(name: str, data_file: Path, chance: float) -> str:
    # data_files must be absolute: lm-eval hands it to datasets, which resolves it against the
    # working directory, not the YAML's folder.
    return "\n".join([
        f"# {name}: queries of the synthetic corpus; chance accuracy {chance:.3f}",
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        f"  data_files: {{test: {json.dumps(str(data_file))}}}",
        "test_split: test",
        "output_type: multiple_choice",
        "doc_to_text: context",  # a field name: lm-eval reads it as is, no Jinja template per item
        "doc_to_choice: choices",
        "doc_to_target: gold",
        'target_delimiter: " "',
        "metric_list:",
        "  - {metric: acc, aggregation: mean, higher_is_better: true}",
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}",
        "metadata: {version: 1.0}",
        "",
    ])


def write_eval_tasks(folder: str | os.PathLike, *, levels: Sequence[int] = DEFAULT_LEVELS,
                     items_per_level: int = 200, seed: int = 0,
                     config: SyntheticConfig | None = None, final: str | os.PathLike | None = None) -> list[str]:
    """Write lm-eval tasks ``synth_k<k>`` (one per level) and the group ``synth`` into ``folder``.

    Each task is a YAML plus a JSONL of :func:`eval_items`; load them with
    ``lm_eval.tasks.TaskManager(include_path=folder)``. Returns the task names, easiest first.
    The YAMLs name their JSONL files by absolute path (lm-eval resolves relative ones against the
    working directory), so write the folder where it is used, or pass ``final``: the folder the
    files will live in once ``folder`` is renamed there. :func:`task_names` re-points a folder
    that was moved after all.
    """
    levels = _levels(levels)
    if items_per_level < 1:
        raise UserError(f"items_per_level={items_per_level} must be at least 1")
    config = config or SyntheticConfig()
    folder = Path(folder).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for k in levels:
        name = f"synth_k{k}"
        data = folder / f"{name}.jsonl"
        items = eval_items(k, items_per_level, seed=seed, config=config)
        data.write_text("".join(json.dumps(item, sort_keys=True) + "\n" for item in items))
        named = Path(final).expanduser().resolve() / data.name if final is not None else data
        (folder / f"{name}.yaml").write_text(_task_yaml(name, named, chance_level(config)))
        names.append(name)
    group = ["group: synth", "task:", *[f"  - {n}" for n in names], "aggregate_metric_list:",
             "  - {metric: acc, aggregation: mean, weight_by_size: false}",
             "  - {metric: acc_norm, aggregation: mean, weight_by_size: false}",
             "metadata: {version: 1.0}", ""]
    (folder / "synth.yaml").write_text("\n".join(group))
    return names


def task_names(folder: str | os.PathLike | None) -> list[str]:
    """The per-level task names written into ``folder`` by :func:`write_eval_tasks`, easiest first.

    lm-eval needs absolute data paths, so when the folder was moved or renamed since it was
    written (a study writes it in a temporary folder and renames it into place), the YAMLs are
    re-pointed at the JSONL files beside them, atomically.
    """
    import yaml

    if folder is None:
        return []
    folder = Path(folder).expanduser().resolve()
    names = sorted((p.stem for p in folder.glob("synth_k*.yaml")), key=lambda n: int(n[len("synth_k"):]))
    for name in names:
        data, task = folder / f"{name}.jsonl", folder / f"{name}.yaml"
        if not data.is_file():
            raise UserError(f"{folder}: {name}.yaml has no {name}.jsonl; delete the folder to rewrite it")
        text = task.read_text()
        written = yaml.safe_load(text)["dataset_kwargs"]["data_files"]["test"]
        if written != str(data):
            atomic_write_text(task, text.replace(json.dumps(written), json.dumps(str(data))))
    return names
