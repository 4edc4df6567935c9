"""A tiny study for tests: a 4-layer Llama checkpoint (hidden 32), its tokenizer and a text corpus.

Everything is built once per test session under pytest's base temp folder; a trial of the
study takes about a second on two CPU cores. Helpers run ``python -m ablate.study`` in a
subprocess (for kills and concurrent workers) or in-process, and wait on a study's state.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

WORDS = ("the cat dog sat ran on under a big small red blue tree mat and sleeps runs "
         "over near one two three seven").split()
N_LAYERS = 4  # m in 0..2 plus the MoE upcycle: 4 configurations per repeat


@dataclass(frozen=True)
class Kit:
    root: Path
    base: Path
    corpus: Path
    home: Path  # ABLATE_HOME: the shared data cache

    def tree(self, name: str = "tiny-study", **overrides) -> dict:
        """A study config (a dict) over the tiny base; ``overrides`` replace top-level sections."""
        tree = {
            "name": name,
            "bases": [{"model": str(self.base), "label": "tiny"}],
            "methods": {"dus": True, "moe": {"experts": 2, "top_k": 1}},
            "data": {"source": str(self.corpus), "seq_len": 32, "val_tokens": 256},
            # 2 optimizer steps of 256 tokens, the held-out loss after each
            "train": {"tokens": 512, "tokens_per_step": 256, "micro_batch_size": 8, "lr": 1e-3,
                      "eval_every": 1, "eval_rows": 8, "precision": "fp32"},
            "eval": {"synthetic_tasks": False},
            "pruner": {"kind": "none"},
        }
        tree.update(overrides)
        return tree

    def write(self, folder: Path, name: str = "tiny-study", **overrides) -> Path:
        """Write :meth:`tree` as ``folder/<name>.yaml``; return its path."""
        path = Path(folder) / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.tree(name, **overrides), sort_keys=False))
        return path

    def env(self, **extra) -> dict:
        """Environment of a study subprocess: offline, one thread, the shared cache."""
        env = dict(os.environ, ABLATE_HOME=str(self.home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def start(self, args: list[str], cwd: Path, **env) -> subprocess.Popen:
        """Start ``python -m ablate.study ARGS`` (stdout and stderr to files in ``cwd``)."""
        cwd.mkdir(parents=True, exist_ok=True)
        tag = f"{time.monotonic_ns()}"
        logs = (cwd / f"stdout-{tag}.txt", cwd / f"stderr-{tag}.txt")
        with open(logs[0], "w") as out, open(logs[1], "w") as err:  # the child keeps its own copies
            proc = subprocess.Popen([sys.executable, "-m", "ablate.study", *args], cwd=cwd, env=self.env(**env),
                                    stdout=out, stderr=err)
        proc.logs = logs  # type: ignore[attr-defined]
        return proc

    def run(self, args: list[str], cwd: Path, timeout: float = 240, **env) -> subprocess.CompletedProcess:
        """Run ``python -m ablate.study ARGS`` to the end."""
        proc = self.start(args, cwd, **env)
        return finish(proc, timeout)


def finish(proc: subprocess.Popen, timeout: float = 240) -> subprocess.CompletedProcess:
    """Wait for a process from :meth:`Kit.start`; its output as a CompletedProcess."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    out, err = (p.read_text() for p in proc.logs)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def save_checkpoint(folder: Path, tokenizer, *, family: str = "llama", vocab_size: int | None = None,
                    num_layers: int = N_LAYERS, seed: int = 0, **overrides) -> Path:
    """Save a random tiny causal LM of ``family`` with ``tokenizer`` as a safetensors checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(vocab_size=vocab_size or len(tokenizer), hidden_size=32, intermediate_size=64,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, tie_word_embeddings=False)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kwargs))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def corpus_text(paragraphs: int = 600, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) + " ."
                       for _ in range(paragraphs)) + "\n"


def make_kit(base_temp: Path) -> Kit:
    """The session's kit under ``base_temp`` (built on first call, reused after)."""
    root = Path(base_temp) / "studykit"
    kit = Kit(root=root, base=root / "base", corpus=root / "corpus.txt", home=root / "home")
    if (root / "done").is_file():
        return kit
    root.mkdir(parents=True, exist_ok=True)
    text = corpus_text()
    kit.corpus.write_text(text)
    save_checkpoint(kit.base, _tokenizer(text.split("\n\n")[:200]))
    (root / "done").write_text("")
    return kit


def tokenizer_of(kit: Kit):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(kit.base)


def wait_for(predicate, timeout: float = 120, every: float = 0.05, proc: subprocess.Popen | None = None):
    """Poll ``predicate()`` until it returns something truthy; fail on timeout or when ``proc`` ends."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out = finish(proc)
            raise AssertionError(f"process ended (rc {proc.returncode}) before the condition:\n{out.stdout}\n"
                                 f"{out.stderr}")
        time.sleep(every)
    raise AssertionError("timed out waiting")


def running_partial(study_dir: Path, number: int | None = None) -> Path | None:
    """A trial folder being written (``trials/.N.partial-*``): a trial is running."""
    pattern = f".{number}.partial-*" if number is not None else ".*.partial-*"
    found = sorted((Path(study_dir) / "trials").glob(pattern))
    return found[0] if found else None


def freeze_when(procs, predicate, timeout: float = 120):
    """Stop the process(es) ``procs`` (SIGSTOP) at a moment ``predicate()`` holds; return its value.

    Looking while the processes are frozen makes "kill it while a trial runs" exact: the state
    seen is the state the victim dies in. They stay stopped: :func:`kill` the victim, :func:`thaw`
    the others.
    """
    procs = procs if isinstance(procs, (list, tuple)) else [procs]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        alive = [p for p in procs if p.poll() is None]
        if not alive:
            outs = [finish(p) for p in procs]
            raise AssertionError("every process ended first:\n" + "\n".join(o.stdout + o.stderr for o in outs))
        if predicate():  # looks likely: freeze and look again
            for p in alive:
                p.send_signal(signal.SIGSTOP)
            value = predicate()
            if value:
                return value
            thaw(alive)
        time.sleep(0.02)
    raise AssertionError("timed out waiting")


def thaw(procs) -> None:
    for p in procs:
        p.send_signal(signal.SIGCONT)


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> subprocess.CompletedProcess:
    """Send ``sig`` (to a running or frozen process) and wait for it to end."""
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)  # a frozen process acts on SIGINT only once it runs again
    return finish(proc, timeout=60)


class Watcher:
    """Reads a study's trials again and again through one storage connection (cheap polling)."""

    def __init__(self, study_dir: Path, storage: str | None = None):
        self.study_dir, self.url, self.study = Path(study_dir), storage, None

    def trials(self) -> list:
        if self.study is None:
            if not (self.study_dir / "study.json").is_file():
                return []
            import json

            import optuna

            from ablate.storage import open_storage

            info = json.loads((self.study_dir / "study.json").read_text())
            self.study = optuna.load_study(study_name=info["name"], storage=open_storage(self.url or info["storage"]))
        return self.study.get_trials(deepcopy=True)

    def running(self):
        """A trial that has its configuration and runs, or None."""
        return next((t for t in self.trials() if t.state.name == "RUNNING" and "repeat" in t.user_attrs), None)


def load_trials(study_dir: Path, storage: str | None = None):
    """The study's trials from its storage (``study.json``'s URL unless ``storage`` is given)."""
    import json

    import optuna

    from ablate.storage import open_storage

    info = json.loads((Path(study_dir) / "study.json").read_text())
    study = optuna.load_study(study_name=info["name"], storage=open_storage(storage or info["storage"]))
    return study.get_trials(deepcopy=False)


def finished_arms(trials) -> list[tuple]:
    """(base, method, m, repeat) of the complete or pruned trials, in trial order."""
    return [(t.user_attrs["base"], t.user_attrs["method"], t.user_attrs.get("m"), t.user_attrs["repeat"])
            for t in trials if t.state.name in ("COMPLETE", "PRUNED")]


@pytest.fixture(scope="session")
def kit(tmp_path_factory):
    """The tiny study kit, built once per session (import this fixture into a test module)."""
    return make_kit(tmp_path_factory.getbasetemp())


@pytest.fixture
def home(kit, monkeypatch):
    """The kit for in-process runs: its data cache, and one torch thread (tiny matrices gain nothing
    from two, and lose much when other processes share the cores)."""
    import torch

    monkeypatch.setenv("ABLATE_HOME", str(kit.home))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield kit
    torch.set_num_threads(threads)


def kill_one_of_three(kit: Kit, args: list[str], cwd: Path, study_dir: Path, storage: str):
    """Start three workers, SIGKILL the one running a trial mid-trial, let the others finish.

    Returns ``(victim trial, survivors' completed processes)``; asserts both survivors exit 0.
    """
    from ablate.storage import WORKER_ATTR

    workers = [kit.start(args, cwd) for _ in range(3)]
    victim = freeze_when(workers, Watcher(study_dir, storage).running)
    killed = next(w for w in workers if w.pid == victim.system_attrs[WORKER_ATTR]["pid"])
    kill(killed)
    thaw(workers)
    survivors = [finish(w) for w in workers if w is not killed]
    assert [s.returncode for s in survivors] == [0, 0], [s.stderr for s in survivors]
    return victim, survivors
