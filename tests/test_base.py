"""The base resolver (ablate.base): one place that resolves, validates and loads a base model.

Hostile checkpoints: pickled weights behind an index beside an unrelated safetensors file,
configs that list more layers than the weights, missing shards and tensors, a config that
ships its own code. Each must be refused in one line by every path that reads a base (the
study's preflight, the loader, the figures' redundancy loader, the exports), and nothing in
them may ever run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file

from ablate import base, export
from ablate.errors import UserError
from ablate.preflight import resolve_device, validate_study
from ablate.redundancy import _default_loader
from ablate.upscale import export_upscaled


class Marker:
    """Unpickling this creates ``path``: proof that a pickle was loaded."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture()
def good(tmp_path, tiny_tokenizer) -> Path:
    folder = tmp_path / "good"
    tiny_model("llama", 4, vocab_size=len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_a_good_folder_resolves_inspects_and_loads(good):
    ref = base.resolve(str(good))
    assert (ref.kind, ref.folder) == ("local", good)
    info = base.inspect(str(good), moe=True)
    assert info.depth == 4 == base.depth(str(good)) and info.config.model_type == "llama"
    model, tok = base.load(str(good))
    assert len(model.model.layers) == 4 and tok is not None
    assert base.resolve("org/name").kind == "hub" and base.resolve("llama-4l").kind == "zoo"


def test_pickle_behind_an_index_never_loads(good, tmp_path):
    """pytorch_model.bin, an index naming it and an unrelated *.safetensors: refused, the pickle never read."""
    bad = _copy(good, tmp_path / "pickle-bypass")
    (bad / "model.safetensors").rename(bad / "unrelated.safetensors")
    marker = tmp_path / "pickle-ran"
    torch.save({"x": Marker(marker)}, bad / "pytorch_model.bin")
    names = load_file(bad / "unrelated.safetensors").keys()
    (bad / base.INDEX).write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(names,
                                                                                          "pytorch_model.bin")}))
    for attempt in (lambda: base.load(str(bad)), lambda: base.inspect(str(bad)),
                    lambda: export.resolve_source(str(bad)), lambda: base.weight_files(bad)):
        with pytest.raises(UserError, match="points at 'pytorch_model.bin'"):
            attempt()
    (bad / base.INDEX).unlink()
    with pytest.raises(UserError, match="holds only pickled weights"):  # another *.safetensors is never read
        base.load(str(bad))
    assert not marker.exists()


def test_weights_must_cover_the_config(good, tmp_path):
    more = _copy(good, tmp_path / "more-layers")
    _config(more, num_hidden_layers=6)
    fewer = _copy(good, tmp_path / "fewer-layers")
    _config(fewer, num_hidden_layers=2)
    no_norm = _copy(good, tmp_path / "no-norm")
    tensors = load_file(no_norm / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, no_norm / "model.safetensors", metadata={"format": "pt"})
    cases = [(more, "no tensors for layers 4-5"), (fewer, "have layers up to 3 but the config only 2"),
             (no_norm, "lack 1 tensor the config needs (e.g. model.norm.weight)")]
    for folder, message in cases:
        for attempt in (base.load, base.inspect,
                        lambda spec: export_upscaled(spec, 1, str(tmp_path / "out"), progress=False)):
            with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
                attempt(str(folder))
        assert not (tmp_path / "out").exists()


def test_a_missing_shard_is_named(good, tmp_path):
    sharded = tmp_path / "sharded"
    model, tok = base.load(str(good))
    model.save_pretrained(sharded, max_shard_size="20KB")
    tok.save_pretrained(sharded)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2
    assert base.load(str(sharded))[0].config.num_hidden_layers == 4  # whole: loads
    shards[1].unlink()
    for attempt in (lambda: base.load(str(sharded)), lambda: base.inspect(str(sharded)),
                    lambda: export.resolve_source(str(sharded))):
        with pytest.raises(UserError, match=f"shard {shards[1].name} named by model.safetensors.index.json is "
                                            "missing"):
            attempt()


def test_a_truncated_or_garbage_safetensors_file_is_one_line(good, tmp_path):
    cut = _copy(good, tmp_path / "cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable safetensors file"):
        base.inspect(str(cut))
    with pytest.raises(UserError, match="truncated: tensor"):
        export.resolve_source(str(cut))
    (cut / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(UserError, match="not a safetensors file"):
        export.resolve_source(str(cut))


@pytest.fixture()
def remote_code(good, tmp_path) -> tuple[Path, Path]:
    """A base whose config asks for its own configuration class; running that file creates a marker."""
    folder = _copy(good, tmp_path / "remote")
    marker = tmp_path / "remote-code-ran"
    (folder / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaConfig\n\nclass EvilConfig(LlamaConfig):\n    model_type = 'llama'\n")
    _config(folder, auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    return folder, marker


def test_remote_code_needs_the_study_and_the_command_line(remote_code, tmp_path):
    """trust_remote_code: false in the study and --trust-remote-code on the command line: still refused."""
    from _studykit import make_kit

    from ablate.config import parse_config

    folder, marker = remote_code
    kit = make_kit(tmp_path / "kit")
    config = parse_config(kit.tree(bases=[{"model": str(folder), "label": "remote"}]))
    assert config.trust_remote_code is False
    for flag in (False, True):  # the flag alone is not enough
        with pytest.raises(UserError, match="ships its own model code"):
            validate_study(config, trust_remote_code=flag, progress=False)
    with pytest.raises(UserError, match="ships its own model code"):
        base.load(str(folder))
    assert not marker.exists()


def test_figures_never_run_a_shared_study_s_remote_code(remote_code):
    """The redundancy loader ignores a recorded trust_remote_code: true."""
    folder, marker = remote_code
    load = _default_loader({"trust_remote_code": True, "data": {}, "train": {}}, "cpu")
    with pytest.raises(UserError, match="ships its own model code"):
        load(str(folder))
    assert not marker.exists()


@pytest.mark.parametrize("where", ["parent-of-source", "source", "inside-source", "foreign", "file"])
def test_force_replaces_only_an_earlier_export(good, tmp_path, where):
    root = tmp_path / "p"
    src = _copy(good, root / "src")
    (root / "n.txt").write_text("x")
    out = {"parent-of-source": root, "source": src, "inside-source": src / "sub", "foreign": tmp_path / "foreign",
           "file": tmp_path / "a-file"}[where]
    if where == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        (out / "ablate.json").write_text("{}")  # not an export's record
    if where == "file":
        out.write_text("data")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(UserError, match="the source checkpoint|not an earlier export|not a folder"):
        export_upscaled(str(src), 1, str(out), force=True, progress=False)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_force_replaces_an_earlier_export(good, tmp_path):
    out = tmp_path / "out"
    export_upscaled(str(good), 1, str(out), progress=False)
    export_upscaled(str(good), 2, str(out), force=True, progress=False)
    assert json.loads((out / "ablate.json").read_text())["m"] == 2


@pytest.mark.parametrize("choice", ["gpu", "cuda:0", "tpu", "mps", "cuda:x"], ids=lambda c: f"device={c}")
def test_a_device_that_is_not_here_is_refused_before_the_study(choice, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--device"):
        resolve_device(choice)
    assert resolve_device("auto") == "cpu" == resolve_device("cpu")


def test_a_config_with_zero_layers_says_so(good, tmp_path):
    """Issue 12 item 18: 0 layers was reported as having no num_hidden_layers."""
    zero = _copy(good, tmp_path / "zero")
    _config(zero, num_hidden_layers=0)
    for attempt in (base.depth, base.inspect):
        with pytest.raises(UserError, match="num_hidden_layers=0; a base needs at least one decoder layer"):
            attempt(str(zero))
