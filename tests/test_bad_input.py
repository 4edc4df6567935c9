"""Bad input to every user-facing command: one line naming the problem (and the fix), exit code 2,
no traceback, and nothing created or changed (no study folder, no export, the inputs untouched).

Most cases call ``main(argv)`` in-process; a few run as real subprocesses. Study configs are
checked before the study folder exists, so a budget smaller than one step, a tokenizer that
does not fit the model or an empty corpus fail at once, not at the first trial.
"""

import importlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from _studykit import make_kit, save_checkpoint, tokenizer_of


@dataclass(frozen=True)
class Case:
    id: str
    command: str  # ablate.<command>
    argv: object  # callable(Inputs) -> list[str]
    expect: str  # a fragment of the one-line message
    subprocess: bool = False


class Inputs:
    """Bad inputs, built once: broken checkpoints, corpora and configs."""

    def __init__(self, kit, root: Path):
        self.kit, self.root = kit, root
        tok = tokenizer_of(kit)
        from transformers import AutoConfig, AutoModelForCausalLM

        AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2,
                                                              vocab_size=len(tok))).save_pretrained(root / "gpt2")
        tok.save_pretrained(root / "gpt2")
        save_checkpoint(root / "small-vocab", tok, vocab_size=100)  # the tokenizer has 300 tokens
        save_checkpoint(root / "qwen", tok, family="qwen2")
        (root / "not-a-checkpoint").mkdir()
        (root / "unknown-arch").mkdir()
        (root / "unknown-arch" / "config.json").write_text(json.dumps({"model_type": "foo", "num_hidden_layers": 2}))
        shutil.copy(kit.base / "model.safetensors", root / "unknown-arch")
        (root / "pickled").mkdir()
        shutil.copy(kit.base / "config.json", root / "pickled")
        (root / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
        (root / "empty.txt").write_text("")
        (root / "no-text.jsonl").write_text('{"body": "the cat sat"}\n' * 50)
        (root / "malformed.yaml").write_text("name: [unclosed\nbases: []\n")
        (root / "unsafe.yaml").write_text('name: !!python/object/apply:os.system ["echo pwned"]\n')
        (root / "export-exists").mkdir()
        (root / "export-exists" / "keep.txt").write_text("keep")
        (root / "a-file").write_text("not a folder")

    def config(self, name: str, **overrides) -> str:
        return str(self.kit.write(self.root / "configs", name, **overrides))

    def named(self, filename: str, name: str) -> str:
        """A config file whose study name is ``name`` (the file name is safe)."""
        path = self.root / "configs" / f"{filename}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump({**self.kit.tree(), "name": name}))
        return str(path)

    def base(self, path: str, **extra) -> str:
        return self.config(Path(path).name, bases=[{"model": str(self.root / path), **extra}])

    def train(self, name: str, **fields) -> str:
        return self.config(name, train={**self.kit.tree()["train"], **fields})

    def data(self, name: str, **fields) -> str:
        return self.config(name, data={**self.kit.tree()["data"], **fields})

    def m(self, name: str, values) -> str:
        return self.config(name, bases=[{"model": str(self.kit.base), "label": "tiny", "m": values}])


def study(*extra):
    return lambda i: ["--config", i.config("ok"), *extra]


CASES = [
    # ablate.study: the config file
    Case("malformed-yaml", "study", lambda i: ["--config", str(i.root / "malformed.yaml")],
         "is not valid YAML at line 2", subprocess=True),
    Case("unsafe-yaml-tag", "study", lambda i: ["--config", str(i.root / "unsafe.yaml")],
         "could not determine a constructor for the tag"),
    Case("missing-config", "study", lambda i: ["--config", str(i.root / "nope.yaml")], "nope.yaml does not exist"),
    Case("unknown-top-level-key", "study", lambda i: ["--config", i.config("typo", trainn=1)], "trainn: unknown key"),
    Case("unknown-nested-key", "study", lambda i: ["--config", i.train("lrr", lrr=1e-3)], "train.lrr: unknown key"),
    Case("wrong-type", "study", lambda i: ["--config", i.train("lots", tokens="lots")],
         "train.tokens: Input should be a valid integer"),
    Case("nan-learning-rate", "study", lambda i: ["--config", i.train("nan", lr=float("nan"))],
         "train.lr: every lr must be a positive finite number (got nan)"),
    Case("nan-learning-rate-set", "study", study("--set", "train.lr=.nan"),
         "train.lr: every lr must be a positive finite"),
    Case("fsdp-without-a-launcher", "study", study("--set", "train.distributed=fsdp"),
         "train.distributed: fsdp shards a trial over several processes; launch the study with torchrun"),
    Case("plan-memory-without-gpus", "memory", lambda i: [i.config("ok"), "--gpus", "0"], "--gpus 0: give the number"),
    Case("plan-memory-missing-config", "memory", lambda i: [str(i.root / "nope.yaml")], "nope.yaml does not exist"),
    Case("unknown-distributed-mode", "study", study("--set", "train.distributed=zero3"),
         "train.distributed: Input should be 'ddp' or 'fsdp'"),
    Case("malformed-set", "study", study("--set", "train.lr"), "is not key.path=value"),
    Case("top-k-above-experts", "study",
         lambda i: ["--config", i.config("topk", methods={"dus": True, "moe": {"experts": 2, "top_k": 3}})],
         "top_k=3 exceeds experts=2"),
    # ablate.study: m and trials
    Case("negative-m", "study", lambda i: ["--config", i.m("neg", [-1])],
         "[-1] out of range for n=4; choose 0 <= m < 4"),
    Case("m-at-least-n", "study", lambda i: ["--config", i.m("big", [1, 4])], "[4] out of range for n=4"),
    Case("empty-m-range", "study", lambda i: ["--config", i.m("empty", [])], "the m list is empty"),
    Case("zero-trials", "study", study("--trials", "0"), "--trials 0: a study needs at least one trial",
         subprocess=True),
    Case("negative-trials", "study", study("--trials", "-3"), "--trials -3: a study needs at least one trial"),
    # ablate.study: bases
    Case("unknown-base-name", "study", lambda i: ["--config", i.config("unk", bases=[{"model": "no-such-model"}])],
         "unknown base model 'no-such-model'"),
    Case("not-a-checkpoint", "study", lambda i: ["--config", i.base("not-a-checkpoint")],
         "is not a Hugging Face checkpoint: it has no config.json"),
    Case("unsupported-architecture", "study", lambda i: ["--config", i.base("gpt2")],
         "unsupported architecture 'gpt2'"),
    Case("unknown-architecture", "study", lambda i: ["--config", i.base("unknown-arch")],
         "does not know the architecture 'foo'"),
    Case("pickled-weights", "study", lambda i: ["--config", i.base("pickled")], "holds only pickled weights"),
    Case("moe-of-unsupported-family", "study", lambda i: ["--config", i.base("qwen")],
         "the MoE upcycle supports llama, mistral models, not 'qwen2'; set moe: false"),
    Case("tokenizer-vocab-mismatch", "study", lambda i: ["--config", i.base("small-vocab")],
         "its tokenizer has 300 tokens but the model's vocab_size is 100"),
    Case("trust-remote-code-without-flag", "study", lambda i: ["--config", i.config("trc", trust_remote_code=True)],
         "pass --trust-remote-code"),
    # ablate.study: data and budget
    Case("empty-corpus", "study", lambda i: ["--config", i.data("empty", source=str(i.root / "empty.txt"))],
         "is empty; remove it or fill it with text"),
    Case("corpus-without-text-field", "study",
         lambda i: ["--config", i.data("notext", source=str(i.root / "no-text.jsonl"))], "has no field 'text'"),
    Case("corpus-too-small", "study", lambda i: ["--config", i.train("much", tokens=10_000_000)], "ran out of text"),
    Case("budget-below-one-step", "study", lambda i: ["--config", i.train("budget", tokens=128)],
         "tokens=128 is smaller than one step"),
    Case("step-not-a-multiple", "study", lambda i: ["--config", i.train("mult", tokens_per_step=300)],
         "tokens_per_step=300 is not a multiple"),
    Case("eval-rows-above-held-out", "study", lambda i: ["--config", i.train("rows", eval_rows=64)],
         "train.eval_rows=64 but data.val_tokens=256"),
    # ablate.study: where results go
    Case("unreachable-storage", "study", study("--storage", "postgresql://bob:s3cr3t-pw@127.0.0.1:1/db"),
         "cannot open storage postgresql://bob:***@127.0.0.1:1/db"),
    Case("mistyped-storage", "study", study("--storage", "postgress://bob:s3cr3t-pw@127.0.0.1/db"),
         "is not a supported URL"),
    Case("storage-folder-missing", "study", study("--storage", "sqlite:////nonexistent-dir/x.db"),
         "SQLite storage folder /nonexistent-dir does not exist"),
    Case("study-name-with-separator", "study", study("--study", "../escape"), "no path separators"),
    Case("study-name-in-config-with-separator", "study", lambda i: ["--config", i.named("sep", "a/../../b")],
         "no path separators"),
    Case("unwritable-out", "study", study("--out", "/proc/ablate-out"), "cannot write to /proc"),
    Case("out-under-a-file", "study", lambda i: ["--config", i.config("ok"), "--out", str(i.root / "a-file")],
         "is a file, not a folder"),
    Case("cuda-without-cuda", "study", study("--device", "cuda"), "CUDA is not available here"),
    # ablate.upscale / ablate.moe (exports)
    Case("upscale-negative-m", "upscale", lambda i: [str(i.kit.base), "--m", "-1", "--out", i.out],
         "m=-1 is out of range for n=4", subprocess=True),
    Case("upscale-m-at-least-n", "upscale", lambda i: [str(i.kit.base), "--m", "4", "--out", i.out],
         "m=4 is out of range"),
    Case("upscale-existing-out", "upscale", lambda i: [str(i.kit.base), "--m", "1", "--out",
                                                       str(i.root / "export-exists")], "already exists"),
    Case("upscale-not-a-checkpoint", "upscale",
         lambda i: [str(i.root / "not-a-checkpoint"), "--m", "1", "--out", i.out], "has no config.json"),
    Case("upscale-unsupported-architecture", "upscale", lambda i: [str(i.root / "gpt2"), "--m", "1", "--out", i.out],
         "has no model.layers"),
    Case("upscale-pickled-weights", "upscale", lambda i: [str(i.root / "pickled"), "--m", "1", "--out", i.out],
         "holds only pickled weights"),
    Case("moe-top-k-above-experts", "moe",
         lambda i: [str(i.kit.base), "--experts", "2", "--top-k", "3", "--out", i.out], "top-k=3 exceeds experts=2"),
    Case("moe-zero-experts", "moe", lambda i: [str(i.kit.base), "--experts", "0", "--top-k", "1", "--out", i.out],
         "must both be at least 1"),
    Case("moe-unsupported-family", "moe", lambda i: [str(i.root / "qwen"), "--experts", "2", "--top-k", "1",
                                                     "--out", i.out], "supported architectures: llama, mistral"),
    Case("moe-existing-out", "moe", lambda i: [str(i.kit.base), "--experts", "2", "--top-k", "1", "--out",
                                               str(i.root / "export-exists")], "already exists"),
    # ablate.zoo, ablate.figures, ablate.check
    Case("zoo-unknown-model", "zoo", lambda i: ["build", "no-such"], "unknown zoo model 'no-such'", subprocess=True),
    Case("figures-not-a-study", "figures", lambda i: ["--study", str(i.root / "not-a-checkpoint"), "--out", i.out],
         "is a study folder with a study.json"),
    Case("figures-zero-rows", "figures", lambda i: ["--study", "x", "--out", i.out, "--rows", "0"], "--rows 0"),
    Case("check-not-a-study", "check", lambda i: [str(i.root / "not-a-checkpoint")], "is not a study folder"),
    # issue 12, items 5 and 13: passwords holding URL characters, storage files that are not storages
    Case("unreachable-storage-password-with-space", "study",
         study("--storage", "postgresql://bob:s3cr3t pw@127.0.0.1:1/db"),
         "cannot open storage postgresql://bob:***@127.0.0.1:1/db"),
    Case("storage-password-with-unescaped-at", "study", study("--storage", "postgresql://bob:s3cr3t@pw@127.0.0.1:1/db"),
         "holds an unescaped '@'"),
    Case("sqlite-url-with-password", "study", study("--storage", "sqlite://bob:s3cr3t@/x.db"), "give an SQLite file"),
    Case("empty-journal-storage", "study", study("--storage", "journal:"), "names no file"),
    Case("journal-storage-is-a-folder", "study",
         lambda i: ["--config", i.config("ok"), "--storage", f"journal:{i.root / 'not-a-checkpoint'}"], "is a folder"),
    Case("journal-storage-is-garbage", "study",
         lambda i: ["--config", i.config("ok"), "--storage", f"journal:{i.root / 'a-file'}"],
         "is not an Optuna journal"),
    Case("sqlite-storage-is-garbage", "study",
         lambda i: ["--config", i.config("ok"), "--storage", f"sqlite:///{i.root / 'a-file'}"],
         "is not an SQLite database"),
    # issue 12, items 11, 15-18: names, values and config files that only look valid
    Case("study-name-ending-in-newline", "study", study("--set", 'name="evil\\n"'), "study name 'evil\\n' must be"),
    Case("moe-router-std-inf", "study", study("--set", "methods.moe.router_std=.inf"),
         "methods.moe.router_std: Input should be a finite number"),
    Case("moe-expert-noise-nan", "study", study("--set", "methods.moe.expert_noise=.nan"),
         "methods.moe.expert_noise: Input should be a finite number"),
    Case("repeats-beyond-the-bound", "study", study("--set", "repeats=100000000"),
         "repeats: Input should be less than or equal to 1000"),
    Case("tokens-true", "study", lambda i: ["--config", i.train("booltok", tokens=True)],
         "train.tokens: expected a number, got true"),
    Case("hub-source-without-name", "study", study("--set", "data.source=hf:"), "names no dataset"),
    Case("config-is-a-folder", "study", lambda i: ["--config", str(i.root / "not-a-checkpoint")], "is a folder"),
    Case("binary-config", "study", lambda i: ["--config", _file(i.root / "configs" / "binary.yaml", bytes(range(256)))],
         "is not a UTF-8 text file"),
    Case("yaml-bomb", "study", lambda i: ["--config", _file(i.root / "configs" / "bomb.yaml", YAML_BOMB)],
         "a YAML bomb?"),
    Case("yaml-recursive-anchor", "study",
         lambda i: ["--config", _file(i.root / "configs" / "rec.yaml", b"a: &a [*a]\n")],
         "refers to its own anchor"),
]
CASES += [  # issue 13: the budget axis's pruners, the lr grid and the no-CPT reference in the search space
    Case("hyperband-without-budget-points", "study", study("--set", "pruner.kind=hyperband"),
         "pruner.kind hyperband needs train.schedule: wsd with at least 2 train.budgets"),
    Case("hyperband-that-never-prunes", "study",
         study("--set", "train.schedule=wsd", "--set", "train.warmup_tokens=0", "--set", "train.budgets=[256,512]",
               "--set", "pruner.kind=hyperband", "--set", "pruner.min_fraction=0.75"),
         "pruner.kind hyperband would never prune: its rungs fall at budget points [256]"),
    Case("pruner-min-fraction-above-one", "study", study("--set", "pruner.min_fraction=2"),
         "pruner.min_fraction: Input should be less than or equal to 1"),
    Case("base-without-an-arm", "study", study("--set", "methods.dus=false", "--set", "bases.0.moe=false"),
         "'tiny' has no arm to run (methods.dus is off and its moe is false)"),
    Case("answer-loss-without-synthetic-tasks", "study", study("--set", "eval.objective.kind=answer_loss"),
         "eval.objective kind answer_loss is measured on the synthetic tasks; set eval.synthetic_tasks: true"),
    Case("budget-point-below-one-step", "study",
         study("--set", "train.schedule=wsd", "--set", "train.warmup_tokens=0", "--set", "train.budgets=[100,512]"),
         "the budget point 100 is smaller than one step (tokens_per_step=256)"),
    Case("lr-grid-beyond-the-configuration-bound", "study",
         study("--set", "repeats=1000", "--set", "train.lr=[" + ",".join(str(i / 10_000) for i in range(1, 27)) + "]"),
         "the study has 104,001 configurations, over 100,000; lower repeats, narrow the m lists or shorten the lr"),
]
CASES += [  # issue 16: layer plans on the export command (the base has 4 layers)
    Case("upscale-plan-misspelt", "upscale", lambda i: [str(i.kit.base), "--plan", "lama_pro(2)", "--out", i.out],
         "unknown plan family 'lama_pro' in 'lama_pro(2)'; did you mean llama_pro?", subprocess=True),
    Case("upscale-plan-without-parentheses", "upscale",
         lambda i: [str(i.kit.base), "--plan", "llama_pro 2", "--out", i.out], "(did you mean llama_pro(...)?)"),
    Case("upscale-llama-pro-p-not-dividing-n", "upscale",
         lambda i: [str(i.kit.base), "--plan", "llama_pro(3)", "--out", i.out],
         "p must divide n=4; choose p in [1, 2, 4]"),
    Case("upscale-mid-window-outside", "upscale", lambda i: [str(i.kit.base), "--plan", "mid(3, 2, 2)", "--out", i.out],
         "the block 3..4 lies outside a model of n=4 layers"),
    Case("upscale-prune-k-at-least-n", "upscale",
         lambda i: [str(i.kit.base), "--plan", "prune(4, by=last)", "--out", i.out],
         "must leave one; choose 0 <= k < 4"),
    Case("upscale-prune-without-by", "upscale", lambda i: [str(i.kit.base), "--plan", "prune(1)", "--out", i.out],
         "lacks by; write prune(k, by=angular|influence|last)"),
    Case("upscale-measured-plan", "upscale",
         lambda i: [str(i.kit.base), "--plan", "prune(1, by=angular)", "--out", i.out],
         "an export only copies tensors"),
    Case("upscale-plan-and-m", "upscale", lambda i: [str(i.kit.base), "--plan", "stack(2)", "--m", "1", "--out", i.out],
         "not both"),
    # the same plans as arms of a study (methods.operators)
    Case("study-operator-misspelt", "study", study("--set", "methods.operators=[lama_pro(2)]"),
         "methods.operators: unknown plan family 'lama_pro' in 'lama_pro(2)'; did you mean llama_pro?"),
    Case("study-operator-p-not-dividing-n", "study", study("--set", "methods.operators=[llama_pro(3)]"),
         "methods.operators: base 'tiny': llama_pro(3) inserts a block after every n/p base blocks, so p must divide "
         "n=4; choose p in [1, 2, 4]"),
    Case("study-operator-prune-k-at-least-n", "study",
         lambda i: ["--config", i.config("prune", methods={"dus": True, "operators": ["prune(4, by=angular)"]})],
         "methods.operators: base 'tiny': prune(4, by=angular) removes 4 of n=4 layers and must leave one"),
    Case("study-operator-window-outside", "study", study("--set", 'methods.operators=["mid(3, 2, 2)"]'),
         "the block 3..4 lies outside a model of n=4 layers"),
    Case("study-operators-split-by-yaml", "study", study("--set", "methods.operators=[mid(3, 2, 2)]"),
         "YAML splits an unquoted [...] list at every comma, so quote each operator"),
    Case("study-operator-that-is-dus", "study", study("--set", "methods.operators=[solar(1)]"),
         "solar(1) is DUS: set methods.dus: true and list m=1 in bases[].m"),
]
CASES += [  # issue 17: kept variants and trackers (a tracker that is not installed: tests/test_trackers.py)
    Case("keep-unknown-value", "study", study("--keep", "bestest"),
         "keep: Input should be 'best', 'all' or 'none' (got 'bestest')"),
    Case("log-with-unknown-tracker", "study", study("--log-with", "tensorbored"),
         "log_with: Input should be 'tensorboard', 'wandb' or 'mlflow' (got 'tensorbored')"),
]
YAML_BOMB = ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefghi", "bcdefghij", strict=False))).encode()


def _file(path: Path, content: bytes) -> str:
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    return str(path)
EXPORT_UNWRITABLE = [  # see the report: ablate/export.py lets the OSError of an unwritable --out through
    Case("upscale-unwritable-out", "upscale", lambda i: [str(i.kit.base), "--m", "1", "--out", "/proc/ablate-x"],
         "/proc"),
    Case("moe-unwritable-out", "moe", lambda i: [str(i.kit.base), "--experts", "2", "--top-k", "1", "--out",
                                                 "/proc/ablate-y"], "/proc"),
]
def _hostile(i: Inputs, name: str) -> str:
    """A broken copy of the kit's base under ``i.root`` (made on first use): weights that are not what
    the config says, or pickled weights behind an index."""
    folder = i.root / name
    if folder.exists():
        return str(folder)
    from safetensors.torch import load_file

    shutil.copytree(i.kit.base, folder)
    cfg = json.loads((folder / "config.json").read_text())
    if name == "more-layers":  # the config lists 6 layers, the weights hold 4
        (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 6}))
    elif name == "pickle-bypass":  # an index naming a pickle, beside an unrelated safetensors file
        (folder / "model.safetensors").rename(folder / "unrelated.safetensors")
        names = load_file(folder / "unrelated.safetensors").keys()
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": dict.fromkeys(names, "pytorch_model.bin")}))
    elif name == "remote-code":  # asks for its own configuration class
        (folder / "configuration_x.py").write_text("raise SystemExit('remote code ran')\n")
        (folder / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoConfig": "configuration_x.XConfig"}}))
    return str(folder)


def _hostile_base(name: str):
    return lambda i: ["--config", i.config(name, bases=[{"model": _hostile(i, name), "label": "h"}])]


BASE_CASES = [  # issue 12 items 1-4, 8-10, 17: each file check, through every command that reads a base
    Case("base-config-more-layers-than-weights", "study", _hostile_base("more-layers"), "no tensors for layers 4-5"),
    Case("base-pickle-behind-an-index", "study", _hostile_base("pickle-bypass"), "points at 'pytorch_model.bin'"),
    Case("base-remote-code-with-flag-only", "study",
         lambda i: [*_hostile_base("remote-code")(i), "--trust-remote-code"], "ships its own model code"),
    Case("study-device-gpu", "study", study("--device", "gpu"), "--device 'gpu' is not a device"),
    Case("upscale-config-more-layers", "upscale", lambda i: [_hostile(i, "more-layers"), "--m", "1", "--out", i.out],
         "no tensors for layers 4-5"),
    Case("moe-pickle-behind-an-index", "moe", lambda i: [_hostile(i, "pickle-bypass"), "--experts", "2", "--top-k",
                                                         "1", "--out", i.out], "points at 'pytorch_model.bin'"),
    Case("upscale-force-onto-the-source-s-folder", "upscale",
         lambda i: [str(i.kit.base), "--m", "1", "--out", str(i.kit.base.parent), "--force"], "contains the source"),
    Case("upscale-force-onto-a-foreign-folder", "upscale",
         lambda i: [str(i.kit.base), "--m", "1", "--out", str(i.root / "export-exists"), "--force"],
         "is not an earlier export"),
    Case("figures-out-is-a-file", "figures", lambda i: ["--study", str(Path(__file__).parents[1] / "paper" / "study"),
                                                        "--out", str(i.root / "a-file")], "is a file, not a folder"),
]
CASES += BASE_CASES


def _corrupt_study(i: Inputs) -> str:
    folder = i.root / "corrupt-study"
    if not folder.exists():
        folder.mkdir()
        (folder / "study.json").write_bytes(b"\x00\xffnot json")
    return str(folder)


CASES += [  # issue 12 item 17: a corrupt study.json, read by every command that opens a study folder
    Case("check-corrupt-study-json", "check", lambda i: [_corrupt_study(i)], "study.json is not valid JSON"),
    Case("figures-corrupt-study-json", "figures", lambda i: ["--study", _corrupt_study(i), "--out", i.out],
         "study.json is not valid JSON"),
]
COMMANDS = {c.command for c in CASES}


@pytest.fixture(scope="session")
def inputs(tmp_path_factory):
    kit = make_kit(tmp_path_factory.getbasetemp())
    return Inputs(kit, tmp_path_factory.mktemp("bad-input"))


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def argv_of(case: Case, inputs: Inputs, tmp_path: Path) -> list[str]:
    inputs.out = str(tmp_path / "out")
    argv = case.argv(inputs)
    if case.command == "study":
        argv = [*argv, "--out", str(tmp_path / "out")] if "--out" not in argv else argv
        argv = [*argv, "--quiet"]
    return argv


def run_case(case: Case, argv: list[str], inputs: Inputs, tmp_path: Path, capsys, monkeypatch) -> tuple[int, str]:
    if case.subprocess:
        done = subprocess.run([sys.executable, "-m", f"ablate.{case.command}", *argv], cwd=tmp_path,
                              env=inputs.kit.env(), capture_output=True, text=True, timeout=120)
        return done.returncode, done.stderr
    monkeypatch.setenv("ABLATE_HOME", str(inputs.kit.home))
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(f"ablate.{case.command}")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    return exit_info.value.code, capsys.readouterr().err


def check_case(case: Case, inputs: Inputs, tmp_path: Path, capsys, monkeypatch) -> None:
    argv = argv_of(case, inputs, tmp_path)
    before = snapshot(inputs.root)
    code, err = run_case(case, argv, inputs, tmp_path, capsys, monkeypatch)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert case.expect in lines[0], lines[0]
    assert "Traceback" not in err and "s3cr3t" not in err
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []
    assert snapshot(inputs.root) == before  # configs, checkpoints, corpora and existing exports untouched


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, inputs, tmp_path, capsys, monkeypatch):
    check_case(case, inputs, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("case", EXPORT_UNWRITABLE, ids=[c.id for c in EXPORT_UNWRITABLE])
def test_bad_export_folder(case, inputs, tmp_path, capsys, monkeypatch):
    check_case(case, inputs, tmp_path, capsys, monkeypatch)


def test_a_study_run_with_another_config_is_left_alone(inputs, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "out" / "ok"
    folder.mkdir(parents=True)
    (folder / "study.json").write_text(json.dumps({"name": "ok", "storage": None, "config": {"other": 1}}))
    before = snapshot(tmp_path)
    case = Case("resume-with-other-config", "study", study(), "was run with another config")
    argv = argv_of(case, inputs, tmp_path)
    code, err = run_case(case, argv, inputs, tmp_path, capsys, monkeypatch)
    assert code == 2 and "was run with another config" in err and len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before


def test_every_command_has_cases():
    modules = {p.stem for p in Path(importlib.import_module("ablate").__file__).parent.glob("*.py")}
    assert {"study", "upscale", "moe"} <= COMMANDS
    assert {m for m in ("zoo", "figures") if m in modules} <= COMMANDS
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
