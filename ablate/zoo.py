"""The zoo: small base models of the embedded default, shipped with the package or pretrained on first use.

Each :class:`ZooSpec` names an architecture and its pretraining recipe. Building one trains the
shared byte-level BPE tokenizer (:func:`zoo_tokenizer`), packs the synthetic corpus
(:func:`ablate.data.load_packed`), pretrains with :func:`ablate.train.continue_pretraining`
and saves an ordinary Hugging Face checkpoint (safetensors, tokenizer, and ``zoo.json`` with
the spec, tokens, final held-out loss and wall time) under ``ablate_home()/zoo/<name>``,
written with :func:`~ablate.fsutil.atomic_dir` so an interrupted build leaves nothing behind.

The default study's bases (``llama-2l``, ``llama-4l``) pretrain for 16M tokens each, about half
an hour of one CPU core, so their builds ship with the package (:data:`SHIPPED`, 0.7 and 1.1 MB
of fp32 safetensors, each file's sha256 in its ``zoo.json``): :func:`build` installs the shipped
build when its spec is the current one, and ``--force`` pretrains it again from the recipe (on a
CPU of the same kind, the same bits). Their recipe is wsd, so one run gives a base's whole learning
curve (``studies/probes/pretrain_curve.py``; the curves are in studies/LOG.md, 2026-12-03).

Builds are single-process training, so :func:`build_many` (and ``python -m ablate.zoo build``)
runs the missing ones side by side in worker processes, one per model up to the CPU count (on a
GPU one at a time, in this process). A build side by side gives the same bits as one alone.

Why these sizes: 64 wide with 16-wide heads (two 32-wide heads learned the single step
unreliably), lr 6e-3 (a smaller one made the deeper models learn k = 1 much later, or not at
all), 1,024 tokens per step. ``mistral-6l`` keeps the earlier short recipe (2,560 steps, built on
first use). Earlier build times and accuracies: studies/LOG.md, 2026-12-02 "Measurements formerly
in module docstrings", part "Zoo build".

    python -m ablate.zoo list
    python -m ablate.zoo build [NAME ...] [--jobs N] [--threads T]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ablate import train  # as a module: tests replace train.continue_pretraining
from ablate.data import load_packed
from ablate.errors import UserError
from ablate.fsutil import ablate_home, atomic_dir, atomic_write_json
from ablate.synthetic import DEFAULT_LEVELS, accuracy, chance_level, eval_items, iter_documents

__all__ = ["ZooSpec", "ZOO", "zoo_dir", "is_built", "build", "spec_of", "data_args", "zoo_tokenizer",
           "model_config", "micro_spec", "recipe_of", "shipped", "install_shipped", "ship"]

ZOO_VERSION = 1  # bump when builds of unchanged specs would differ (e.g. the corpus changed)
# Closed vocabulary: ~100 words, 10 digits, a few letters and signs. At 512 the BPE merges run
# out (every word and every " 7" / " A" is one token at ~460 entries), so a larger vocab adds only
# unused embedding rows, and a smaller one splits words and lengthens every sequence.
TOKENIZER_VOCAB = 512
TOKENIZER_DOCS = 5_000  # documents the BPE is trained on: ~1 s, and every word is seen many times
TOKENIZER_SEED = 10_007  # a stream of its own, so no pretraining or CPT document is reused
EOS = "<|endoftext|>"
# CPU threads of a build. Zoo matrices are 64 wide: on an idle 2-core machine 2 threads trained
# ~1.6x faster than 1 (26k vs 16k tokens/s for llama-4l), but with one other busy process 3x
# slower (5-6k vs 15-16k tokens/s): OpenMP threads wait on each other. 1 is the robust default of
# build(); build_many shares the CPUs out among its processes (one thread each on 2 cores, 2 models).
BUILD_THREADS = 1
PROBE_ITEMS = 200  # items per level of the calibration probe stored in zoo.json (seed 0: the
# same items write_eval_tasks writes by default)
POLL_S = 0.5  # how often build_many's bar (and each worker's metrics follower) looks for news


class ZooSpec(BaseModel):
    """One base model of the zoo: architecture and pretraining recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Zoo name, also the folder name under ablate_home()/zoo.")
    family: Literal["llama", "mistral"] = Field(description="transformers model family.")
    description: str = Field(description="What a researcher would pick this base for.")
    num_layers: int = Field(gt=0, description="Decoder layers n.")
    hidden_size: int = Field(gt=0, description="Residual width.")
    intermediate_size: int = Field(gt=0, description="MLP width (SwiGLU).")
    num_heads: int = Field(gt=0, description="Attention heads.")
    num_kv_heads: int = Field(gt=0, description="Key/value heads (grouped-query attention).")
    sliding_window: int | None = Field(None, gt=0, description="Mistral's attention window in tokens.")
    seq_len: int = Field(128, gt=1, description="Pretraining row length; longer than any reasoning "
                         "item, and attention cost stays small.")
    train_tokens: int = Field(gt=0, description="Pretraining tokens.")
    val_tokens: int = Field(8_192, gt=0, description="Held-out tokens for the final validation loss.")
    tokens_per_step: int = Field(1_024, gt=0, description="Tokens per optimizer step: small batches "
                                 "give many steps, which the reasoning items need more than "
                                 "low-noise gradients.")
    micro_batch_size: int = Field(8, gt=0, description="Rows per forward pass.")
    lr: float = Field(gt=0, description="Peak learning rate, tuned per architecture.")
    warmup: float = Field(0.05, ge=0, lt=1, description="schedule cosine: warmup as a fraction of the steps.")
    schedule: Literal["cosine", "wsd"] = Field("cosine", description="cosine: warmup, then cosine decay. wsd: "
                                               "warmup_tokens of warmup, the peak lr, and a 1-sqrt decay over "
                                               "the last `cooldown` share: a build at T tokens is, bit for bit on "
                                               "a CPU, the T-token point of one longer wsd run, which is how one "
                                               "run gives a base's learning curve (studies/probes/pretrain_curve.py).")
    warmup_tokens: int | None = Field(None, ge=0, description="schedule wsd: warmup in tokens.")
    cooldown: float = Field(0.2, gt=0, lt=1, description="schedule wsd: the decay's share of the steps.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="Compute precision of the build; "
                                                       "fp32 for a shipped build, so a rebuild is the same bits.")
    seed: int = Field(0, ge=0, description="Seed of the initial weights and the training order.")
    data_seed: int = Field(1_000, ge=0, description="Seed of the pretraining documents: not the "
                           "study's data seed (0), so CPT reads documents the base never saw.")


# The default's bases share one shape and one recipe: pretrained long (wsd, 16M tokens, fp32) and
# shipped with the package; only the depth differs.
_SHIPPED_RECIPE = dict(family="llama", hidden_size=64, intermediate_size=192, num_heads=4, num_kv_heads=4,
                       train_tokens=16_777_216, lr=6e-3, schedule="wsd", warmup_tokens=102_400, cooldown=0.2,
                       precision="fp32")

ZOO: dict[str, ZooSpec] = {
    spec.name: spec
    for spec in [
        ZooSpec(name="llama-2l", num_layers=2, **_SHIPPED_RECIPE,
                description="A saturated shallow base: 2 Llama layers, 16M tokens (101 per parameter); solves "
                "k = 1 and 2, not 3 and 4, which a 4-layer model learns: depth is what it lacks."),
        ZooSpec(name="llama-4l", num_layers=4, **_SHIPPED_RECIPE,
                description="A base deep enough for the corpus: 4 Llama layers, 16M tokens (61 per parameter); "
                "solves k = 1 to 4. DUS gives 2 (pruned) to 8 layers."),
        ZooSpec(name="mistral-6l", family="mistral",
                description="The deeper base: 6 Mistral layers with grouped-query attention and "
                "a 64-token sliding window; DUS gives 6 to 12 layers.",
                num_layers=6, hidden_size=64, intermediate_size=192, num_heads=4, num_kv_heads=2,
                sliding_window=64, train_tokens=2_621_440, lr=6e-3),
        ZooSpec(name="tiny-2l", family="llama",
                description="Test-sized: 2 Llama layers at hidden 32, built in seconds; for the smoke "
                "study and CI, too small for findings.",
                num_layers=2, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=2, seq_len=64,
                train_tokens=16_384, val_tokens=2_048, tokens_per_step=512, lr=3e-3),
    ]
}


def micro_spec(name: str = "micro", **overrides) -> ZooSpec:
    """A spec that builds in seconds, for tests (it is not in :data:`ZOO`)."""
    fields = dict(name=name, family="llama", description="test-sized", num_layers=2, hidden_size=32,
                  intermediate_size=64, num_heads=2, num_kv_heads=2, seq_len=64,
                  train_tokens=4_096, val_tokens=1_024, tokens_per_step=512, lr=3e-3)
    return ZooSpec(**{**fields, **overrides})


def zoo_dir(name: str) -> Path:
    return ablate_home() / "zoo" / name


# Builds shipped with the package (package data): a study copies one into zoo_dir instead of
# pretraining, when its zoo.json names the same spec and zoo version; `python -m ablate.zoo build
# NAME --force` still pretrains it from the recipe (and gives the same bits on the same kind of CPU).
SHIPPED = Path(__file__).parent / "zoo_weights"
SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "zoo.json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shipped(spec: ZooSpec) -> Path | None:
    """The package's own build of ``spec``, or None when it ships none for this spec and zoo version."""
    meta = SHIPPED / spec.name / "zoo.json"
    if not meta.is_file():
        return None
    info = json.loads(meta.read_text())
    if info.get("zoo_version") != ZOO_VERSION or info.get("spec") != spec.model_dump():
        return None
    return meta.parent


def install_shipped(spec: ZooSpec) -> bool:
    """Copy the shipped build of ``spec`` into its zoo folder, each file checked against its sha256;
    False (nothing done) when none ships. A damaged shipped file is a one-line error."""
    source = shipped(spec)
    if source is None:
        return False
    info = json.loads((source / "zoo.json").read_text())
    for name, digest in info["sha256"].items():
        if not (source / name).is_file() or _sha256(source / name) != digest:
            raise UserError(f"the build of {spec.name} shipped with ablate is damaged ({name} does not match the "
                            f"sha256 in its zoo.json); reinstall ablate, or pretrain it here with "
                            f"python -m ablate.zoo build {spec.name} --force")
    final = zoo_dir(spec.name)
    try:
        with atomic_dir(final, overwrite=final.exists()) as tmp:
            for path in source.iterdir():
                if path.is_file():
                    shutil.copy2(path, tmp / path.name)
    except OSError:  # another process put the same build in place first
        if not is_built(spec):
            raise
    return True


def ship(spec: ZooSpec, folder: Path | None = None) -> Path:
    """Write the build of ``spec`` in ``folder`` (default: its zoo folder) into the package's shipped
    builds, with the sha256 of each file in its zoo.json (for maintainers: the wheel then carries it)."""
    folder = Path(folder) if folder is not None else zoo_dir(spec.name)
    info = json.loads((folder / "zoo.json").read_text())
    if info.get("zoo_version") != ZOO_VERSION or info.get("spec") != spec.model_dump():
        raise UserError(f"{folder} is not a build of the current {spec.name} spec; rebuild it with "
                        f"python -m ablate.zoo build {spec.name} --force")
    names = [n for n in SHIPPED_FILES if n != "zoo.json" and (folder / n).is_file()]
    info["sha256"] = {n: _sha256(folder / n) for n in names}
    target = SHIPPED / spec.name
    with atomic_dir(target, overwrite=target.exists()) as tmp:
        for name in names:
            shutil.copy2(folder / name, tmp / name)
        atomic_write_json(tmp / "zoo.json", info)
    return target


def is_built(name: str | ZooSpec) -> bool:
    """True when a complete build of this spec (and zoo version) is on disk."""
    spec = name if isinstance(name, ZooSpec) else spec_of(name)
    meta = zoo_dir(spec.name) / "zoo.json"
    if not meta.is_file():
        return False
    try:
        info = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return False
    return info.get("zoo_version") == ZOO_VERSION and info.get("spec") == spec.model_dump()


def zoo_tokenizer():
    """The zoo's byte-level BPE tokenizer, trained deterministically on synthetic documents."""
    import itertools

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    docs = list(itertools.islice(iter_documents("train", seed=TOKENIZER_SEED), TOKENIZER_DOCS))
    tok.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   pad_token=EOS, model_max_length=2048)


def model_config(spec: ZooSpec, vocab_size: int):
    """The transformers config of ``spec`` (untied embeddings: the tied variant learned slower)."""
    from transformers import AutoConfig

    kwargs = dict(vocab_size=vocab_size, hidden_size=spec.hidden_size,
                  intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
                  num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
                  max_position_embeddings=2048, tie_word_embeddings=False)
    if spec.family == "mistral":
        kwargs["sliding_window"] = spec.sliding_window
    return AutoConfig.for_model(spec.family, **kwargs)


def build(name: str | ZooSpec, *, force: bool = False, progress: bool = True,
          threads: int = BUILD_THREADS, on_step: Callable[[int, float], None] | None = None) -> Path:
    """Pretrain zoo model ``name`` (or a given spec) unless already built; return its folder.

    ``threads`` CPU threads train it (the caller's setting is restored afterwards).
    ``on_step(steps_done, tokens_per_s)`` is called from a helper thread as pretraining goes
    (how :func:`build_many`'s workers tell the parent how far they are).
    """
    import torch

    if threads < 1:
        raise UserError(f"threads={threads}: a build needs at least one CPU thread")
    spec = name if isinstance(name, ZooSpec) else spec_of(name)
    final = zoo_dir(spec.name)
    built = is_built(spec)
    if built and not force:
        return final
    if not force and install_shipped(spec):
        return final
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _build(spec, final, progress, on_step)
    except OSError:
        # another process (a second study worker) finished the same spec first: atomic_dir found
        # the folder taken at its final rename; theirs is as good as ours (same spec, same bits)
        if built or not is_built(spec):
            raise
        return final
    finally:
        torch.set_num_threads(before)


def _build(spec: ZooSpec, final: Path, progress: bool, on_step=None) -> Path:
    import torch
    from transformers import AutoModelForCausalLM


    start = time.perf_counter()
    tokenizer = zoo_tokenizer()
    data = load_packed("synthetic", tokenizer, progress=progress, **data_args(spec))
    torch.manual_seed(spec.seed)
    config = model_config(spec, len(tokenizer))
    config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    model = AutoModelForCausalLM.from_config(config)
    recipe = recipe_of(spec, data.val.shape[0])
    # replaces a build of another spec or zoo version (or any, with force) once the new one is complete
    with atomic_dir(final, overwrite=final.exists()) as tmp:
        if progress:
            print(f"building {spec.name}: {spec.num_layers} layers, {_count(model):,} parameters, "
                  f"{spec.train_tokens:,} tokens")
        with _following(tmp / "pretraining" / "metrics.jsonl", on_step):
            result = train.continue_pretraining(model, data, recipe, out_dir=tmp / "pretraining", progress=progress)
        if result.status != "completed":
            raise RuntimeError(f"pretraining {spec.name} did not complete: {result.reason}")
        probe = _probe(model, tokenizer)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "zoo.json", {
            "zoo_version": ZOO_VERSION, "spec": spec.model_dump(), "parameters": _count(model),
            "tokens": result.tokens, "final_val_loss": result.final_val_loss,
            "initial_val_loss": result.initial_val_loss, "tokens_per_s": result.tokens_per_s,
            "synth_acc": probe, "chance": chance_level(),
            "wall_s": time.perf_counter() - start, "precision": result.precision,
            "torch_threads": torch.get_num_threads()})
    return final


def recipe_of(spec: ZooSpec, eval_rows: int):
    """The :class:`ablate.train.TrainConfig` that pretrains ``spec`` (``eval_rows``: its held-out rows)."""
    return train.TrainConfig(tokens=spec.train_tokens, micro_batch_size=spec.micro_batch_size,
                             tokens_per_step=spec.tokens_per_step, lr=spec.lr, warmup=spec.warmup,
                             schedule=spec.schedule, warmup_tokens=spec.warmup_tokens, cooldown=spec.cooldown,
                             precision=spec.precision, seed=spec.seed, eval_every=10**9, eval_early=0,
                             eval_rows=eval_rows)


def data_args(spec: ZooSpec) -> dict:
    """The load_packed arguments of a spec's pretraining data (its cache key, with the tokenizer)."""
    return dict(seq_len=spec.seq_len, train_tokens=spec.train_tokens, val_tokens=spec.val_tokens,
                seed=spec.data_seed)


@contextlib.contextmanager
def _following(metrics: Path, on_step):
    """While the block runs, call ``on_step(step, tokens_per_s)`` with the last line of ``metrics``."""
    if on_step is None:
        yield
        return
    stop = threading.Event()

    def follow() -> None:
        while not stop.wait(POLL_S):
            with contextlib.suppress(OSError, ValueError, IndexError):  # not there yet, or no full line
                with open(metrics, "rb") as f:
                    f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))  # lines are ~200 bytes
                    record = json.loads(f.read().rsplit(b"\n", 2)[-2])
                on_step(record["step"], record.get("tokens_per_s", 0.0))

    thread = threading.Thread(target=follow, name="zoo-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def spec_of(name: str) -> ZooSpec:
    """The spec of zoo model ``name``; an unknown name is a one-line error listing the zoo."""
    if name not in ZOO:
        raise UserError(f"unknown zoo model {name!r}; choose from {', '.join(ZOO)}")
    return ZOO[name]


def _probe(model, tokenizer) -> dict[str, float]:
    """Accuracy per level on the study's default evaluation items (the calibration numbers)."""
    return {f"synth_k{k}": accuracy(model, tokenizer, eval_items(k, PROBE_ITEMS)) for k in DEFAULT_LEVELS}


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    # python -m ablate.zoo: the command lives in ablate.zoobuild, beside build_many, which it calls.
    # Run that module as the program rather than import it here: zoobuild imports this module, and
    # the package keeps no import cycle, not even through a script guard.
    import runpy

    runpy.run_module("ablate.zoobuild", run_name="__main__", alter_sys=True)
