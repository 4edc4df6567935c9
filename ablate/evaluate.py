"""Fast evaluation of an in-memory model: held-out perplexity and lm-eval tasks on a fixed subset.

- :func:`perplexity`: mean next-token cross-entropy over fixed validation token rows
  (``PackedData.val``); needs only torch.
- :func:`evaluate`: lm-eval tasks through ``lm_eval.simple_evaluate`` on ``HFLM(pretrained=model)``,
  flattened to ``{"task/metric": value}``; its numbers equal a direct ``simple_evaluate`` call with
  the same HFLM settings and items (tested).
- :func:`subset_indices`: the fixed item subset, the same for every trial.

Subset semantics (``evaluate(..., subset=k, subset_seed=s)``): every leaf task (members of a group
included) is scored on ``subset_indices(n, k, s)`` of its evaluation split (lm-eval's ``eval_docs``:
the test split when the task has one, else validation; ``n`` is its size); a task with ``n <= k``
is scored in full. The items depend only on ``(n, k, s)``: never on the model, the trial, the task
order or the library versions, and never "the first k" (lm-eval's ``limit``) of an ordered dataset.
Group aggregates (e.g. ``mmlu/acc``) are over the selected items of their members.

lm-eval is imported inside functions (it takes seconds to import, and only :func:`evaluate` needs
it), so :func:`perplexity` works where lm-eval is not installed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import random
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from ablate.errors import UserError
from ablate.torchutil import evaluating

__all__ = [
    "Precision",
    "evaluate",
    "flatten_results",
    "perplexity",
    "subset_indices",
    "task_manager",
]

Precision = Literal["auto", "fp32", "bf16"]

# lm-eval's own default seed for few-shot sampling; used for every RNG it seeds, so a run is
# reproducible from this one number.
DEFAULT_SEED = 1234


# ----------------------------------------------------------------------------- precision


def _autocast_dtype(model, precision: Precision):
    """The autocast dtype for ``precision`` on ``model``'s device, or None for no autocast.

    "auto" is bf16 autocast only for an fp32 model on a CUDA device that supports bf16. On CPU it
    is fp32: measured on the 2-core AVX2 development CPU (no native bf16), bf16 matmuls ran at
    0.2 vs 43 GFLOP/s and bf16 autocast made tiny-model evaluation 1.2-6x slower, although it
    agreed with fp32 on 900/900 multiple-choice decisions of a random and of a briefly trained
    tiny Llama (max |loglik diff| 0.007 and 0.04). Ask for "bf16" explicitly on a CPU with native
    bf16 (AMX / AVX512-BF16).
    """
    import torch

    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise UserError(f"precision must be one of auto, fp32, bf16, not {precision!r}")
    param = next(model.parameters())
    if param.dtype == torch.float32 and param.device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


# ----------------------------------------------------------------------------- perplexity


def perplexity(model, rows: np.ndarray, *, batch_size: int = 8, precision: Precision = "auto") -> dict:
    """Mean next-token cross-entropy of ``model`` over every predicted position of ``rows``.

    ``rows`` is an int ndarray ``[num_rows, seq_len]`` of full token rows (e.g. ``PackedData.val``);
    each row is one causal sequence with no padding, and position ``t`` predicts token ``t + 1``,
    so ``tokens == num_rows * (seq_len - 1)``. The loss is computed from the logits in fp32 (never
    the model's own ``outputs.loss``, which includes the router aux loss of an upcycled MoE).
    ``batch_size`` rows go through the model at a time (8: the logits of 8 x 2048 tokens of a
    32k vocabulary fit a small GPU in bf16, and on the development CPU 8 rows of 128 tokens ran
    faster than 32). The model's train/eval mode is restored afterwards.

    Returns ``{"val_loss": float, "val_ppl": float, "tokens": int}``.
    """
    import torch
    import torch.nn.functional as F

    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[0] < 1 or rows.shape[1] < 2:
        raise UserError(f"perplexity needs token rows of shape [rows >= 1, seq_len >= 2], got {rows.shape}")
    if not np.issubdtype(rows.dtype, np.integer):
        raise UserError(f"perplexity needs integer token ids, got dtype {rows.dtype}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    vocab = model.get_output_embeddings().weight.shape[0]
    low, high = int(rows.min()), int(rows.max())
    if low < 0 or high >= vocab:
        raise UserError(
            f"token ids span [{low}, {high}] but the model's vocabulary has {vocab} entries; "
            "use rows made with this model's tokenizer"
        )

    device = next(model.parameters()).device
    amp = _autocast_dtype(model, precision)
    total = torch.zeros((), dtype=torch.float64, device=device)  # float64: many rows lose no precision
    with evaluating(model):
        for start in range(0, rows.shape[0], batch_size):
            batch = torch.from_numpy(np.asarray(rows[start : start + batch_size], dtype=np.int64)).to(device)
            autocast = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
            with autocast:
                logits = model(input_ids=batch, use_cache=False).logits
            # One row at a time so the fp32 copy of the logits stays small.
            for row_logits, row in zip(logits, batch, strict=True):
                total += F.cross_entropy(row_logits[:-1].float(), row[1:], reduction="sum").double()
    tokens = int(rows.shape[0]) * (int(rows.shape[1]) - 1)
    loss = total.item() / tokens
    return {"val_loss": loss, "val_ppl": math.exp(loss), "tokens": tokens}


# ----------------------------------------------------------------------------- subsets


def subset_indices(n_docs: int, k: int, seed: int) -> list[int]:
    """``k`` distinct item indices out of ``range(n_docs)``, sorted; all of them when ``k >= n_docs``.

    Each index ``i`` is ranked by a hash of ``(seed, i)`` and the ``k`` lowest are kept. So the
    subset is a deterministic random sample that depends only on ``(n_docs, k, seed)``, is the same
    on every machine and library version (no RNG stream involved), and is nested: for one seed the
    subset of size ``k`` contains the subset of every smaller size.
    """
    if n_docs < 0 or k < 1:
        raise UserError(f"subset needs n_docs >= 0 and k >= 1, got n_docs={n_docs}, k={k}")
    if k >= n_docs:
        return list(range(n_docs))

    def rank(i: int) -> bytes:
        return hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest()

    return sorted(sorted(range(n_docs), key=rank)[:k])


# ----------------------------------------------------------------------------- lm-eval


def _include_paths(include_path) -> tuple[str, ...]:
    if include_path is None:
        return ()
    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
    for path in paths:
        if not Path(path).is_dir():
            raise UserError(f"include_path {str(path)!r} is not a folder of lm-eval task YAML files")
    return tuple(str(Path(p).resolve()) for p in paths)


@functools.lru_cache(maxsize=8)
def _cached_task_manager(paths: tuple[str, ...], include_defaults: bool):
    """One TaskManager per (include paths, defaults) per process: indexing lm-eval's ~15k built-in
    task configs takes ~11 s on the development CPU, indexing a small include_path ~2 ms."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths) or None, include_defaults=include_defaults)


def task_manager(include_path=None, tasks: Sequence[str] = (), include_defaults: bool | None = None):
    """The (cached) lm-eval TaskManager that can load ``tasks``.

    ``include_defaults=None`` decides by itself: lm-eval's built-in tasks are indexed only when a
    requested name is not found under ``include_path``. Pass True when a task or group under
    ``include_path`` refers to built-in tasks by name.
    """
    paths = _include_paths(include_path)
    if include_defaults is None:
        include_defaults = not paths or not all(name in _cached_task_manager(paths, False).all_tasks for name in tasks)
    return _cached_task_manager(paths, bool(include_defaults))


def _load_tasks(manager, names: Sequence[str]) -> tuple[list, dict]:
    """Build each requested task/group/tag once: (top-level objects for simple_evaluate, leaf tasks)."""
    top: list = []
    leaves: dict = {}
    for name in names:
        if name not in manager.all_tasks and not Path(name).is_file():
            raise UserError(f"unknown lm-eval task {name!r}; check the name (`lm-eval ls tasks`) or the include_path")
        loaded = manager.load([name])
        groups = loaded.get("groups", {})
        top += [groups[name]] if name in groups else list(loaded["tasks"].values())
        leaves.update(loaded["tasks"])
    return top, leaves


@contextlib.contextmanager
def _preserve_global_rng() -> Iterator[None]:
    """simple_evaluate seeds Python's, NumPy's and torch's global RNGs; put the caller's back."""
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def _lean_simple_evaluate(progress: bool) -> Iterator[None]:
    """Skip simple_evaluate's environment report and git lookup, and its bars unless ``progress``.

    The report (torch's collect_env runs `pip list` and other subprocesses) took ~2 s per call,
    about as long as the whole 3 x 100-item evaluation of a tiny model, and `git describe` prints
    "fatal: not a git repository" outside a checkout; both only add metadata to the result (a
    trial's env.json records the versions and commit). Metrics are untouched.
    """
    import lm_eval.api.model as model_module
    import lm_eval.api.task as task_module
    import lm_eval.evaluator as evaluator
    import lm_eval.models.huggingface as hf_module

    patches = {(evaluator, "add_env_info"): lambda results: None,
               (evaluator, "get_git_commit_hash"): lambda: None}
    if not progress:  # their bars pass disable= themselves, so force it rather than default it
        for module in (model_module, task_module, hf_module):
            bar = getattr(module, "tqdm", None)
            if bar is not None:
                patches[(module, "tqdm")] = functools.partial(_silent_bar, bar)
    saved = {key: getattr(*key) for key in patches if hasattr(*key)}
    from datasets.utils import logging as datasets_logging  # lm-eval reads task files with datasets

    hide_datasets_bars = not progress and datasets_logging.is_progress_bar_enabled()
    if hide_datasets_bars:
        datasets_logging.disable_progress_bar()
    # simple_evaluate returns its results only where LOCAL_RANK is 0 (its rule for tensor-parallel launches);
    # with a model instance every rank of a study worker evaluates every item itself and needs them
    local_rank = os.environ.pop("LOCAL_RANK", None)
    try:
        for (module, name), value in patches.items():
            if (module, name) in saved:
                setattr(module, name, value)
        yield
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)
        if hide_datasets_bars:
            datasets_logging.enable_progress_bar()
        if local_rank is not None:
            os.environ["LOCAL_RANK"] = local_rank


_TOKENS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {call: token ids}


@functools.cache
def _cached_tokens_hflm():
    """lm-eval's ``HFLM``, remembering each tokenization for as long as its tokenizer lives.

    Every trial of a study scores the same items with the same tokenizer, and encoding them was
    most of an evaluation on the default study (4,000 context/continuation strings a call, ~0.6 s
    of ~1.1 s; the model's forward passes took ~0.04 s). The cache key holds everything
    ``tok_encode`` reads besides the tokenizer, so the ids are the same; the tests compare the
    scores with ``simple_evaluate`` on a plain ``HFLM``.
    """
    from lm_eval.models.huggingface import HFLM

    class CachedTokensHFLM(HFLM):
        def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
            if kwargs:  # a call this cache does not know: pass it through
                return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
            cache = _TOKENS.setdefault(self.tokenizer, {})
            key = (string, add_special_tokens, left_truncate_len, self.add_bos_token, self.prefix_token_id)
            if key not in cache:
                cache[key] = tuple(super().tok_encode(string, add_special_tokens, left_truncate_len))
            return list(cache[key])  # a fresh list: callers may extend it

    return CachedTokensHFLM


@contextlib.contextmanager
def _logger_level(name: str, level: int) -> Iterator[None]:
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def _silent_bar(bar, *args, **kwargs):
    return bar(*args, **{**kwargs, "disable": True})


def flatten_results(results: Mapping) -> dict[str, float]:
    """``simple_evaluate(...)["results"]`` as ``{"task/metric": value}``.

    lm-eval's ``"acc,none"`` becomes ``"acc"`` and ``"acc_stderr,none"`` ``"acc_stderr"``; a
    metric under another filter keeps it (``"gsm8k/exact_match,strict-match"``). Groups with an
    aggregate appear like tasks; ``"task/sample_len"`` is the number of items scored. Non-numeric
    entries (aliases, "N/A" stderrs) are dropped.
    """
    flat: dict[str, float] = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if key == "alias" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric = key[: -len(",none")] if key.endswith(",none") else key
            flat[f"{task}/{metric}"] = float(value)
    return dict(sorted(flat.items()))


def evaluate(
    model,
    tokenizer,
    tasks: str | Sequence[str],
    *,
    include_path=None,
    include_defaults: bool | None = None,
    subset: int | None = None,
    subset_seed: int = 0,
    samples: Mapping[str, list[int]] | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int | str = 32,
    precision: Precision = "auto",
    seed: int = DEFAULT_SEED,
    bootstrap_iters: int = 1000,
    progress: bool = True,
) -> dict[str, float]:
    """Score an in-memory causal LM on lm-eval ``tasks``; returns ``{"task/metric": value}``.

    Runs ``lm_eval.simple_evaluate`` on ``HFLM(pretrained=model, tokenizer=tokenizer,
    batch_size=batch_size)`` (plus bf16 autocast with an fp32 softmax when ``precision`` resolves
    to bf16; its tokenizations are cached across calls), with all of lm-eval's seeds set to
    ``seed``. Items: ``subset=k`` selects a fixed subset per task (module docstring);
    ``samples={task: indices}`` selects items by hand; ``limit`` takes lm-eval's first N (smoke
    tests only). At most one of the three.

    ``tasks`` are lm-eval task/group/tag names, found under ``include_path`` (a folder or list of
    folders of task YAMLs) or among lm-eval's built-in tasks (see :func:`task_manager`).
    ``batch_size`` 32 keeps the per-forward overhead of small models low; "auto" lets lm-eval
    search on GPU. ``bootstrap_iters``: stderrs of mean metrics (acc, acc_norm, mc2, exact_match)
    are closed-form; 1000 draws are used only for metrics like f1/bleu, where lm-eval's default
    100000 takes minutes. ``progress=False`` hides lm-eval's progress bars. The caller's global RNG
    states and the model's train/eval mode are restored afterwards.
    """
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise UserError("evaluate needs at least one lm-eval task name")
    if sum(x is not None for x in (subset, samples, limit)) > 1:
        raise UserError("pass at most one of subset, samples and limit (they all choose the items)")
    if subset is not None and subset < 1:
        raise UserError(f"subset must be >= 1 items per task, got {subset}")

    import torch
    from lm_eval import simple_evaluate

    # Loading tasks and simple_evaluate both draw from / seed the global RNGs: put the caller's back.
    with _preserve_global_rng():
        manager = task_manager(include_path, names, include_defaults)
        top, leaves = _load_tasks(manager, names)
        if subset is not None:
            samples = {name: subset_indices(len(t.eval_docs), subset, subset_seed) for name, t in leaves.items()}
        elif samples is not None:
            unknown = sorted(set(samples) - set(leaves))
            if unknown:
                raise UserError(f"samples names tasks {unknown} that are not among {sorted(leaves)}")
            samples = {name: sorted(int(i) for i in idx) for name, idx in samples.items()}

        amp = _autocast_dtype(model, precision)
        was_training = model.training
        try:
            # HFLM warns that an in-memory model ignores its loading options and must not run
            # under `accelerate launch`: true of every call here, so not news to print each trial
            with _logger_level("lm_eval.models.huggingface", logging.ERROR):
                lm = _cached_tokens_hflm()(
                    pretrained=model,
                    tokenizer=tokenizer,
                    batch_size=batch_size,
                    mixed_precision_dtype=amp,
                    softmax_dtype=torch.float32 if amp is not None else None,
                )
            with _lean_simple_evaluate(progress):
                out = simple_evaluate(
                    model=lm,
                    tasks=top,
                    task_manager=manager,
                    num_fewshot=num_fewshot,
                    limit=limit,
                    samples=samples,
                    bootstrap_iters=bootstrap_iters,
                    log_samples=False,
                    random_seed=seed,
                    numpy_random_seed=seed,
                    torch_random_seed=seed,
                    fewshot_random_seed=seed,
                )
        finally:
            model.train(was_training)  # HFLM switched it to eval mode
    return flatten_results(out["results"])
