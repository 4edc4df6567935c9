"""The zoo: the tokenizer (deterministic, one token per reasoning symbol), the registry, a micro
build (an ordinary HF checkpoint plus zoo.json, reused without retraining), an interrupted build
that leaves nothing looking built, spec resolution (zoo name, local folder, hub id, unknown name)
and the CLI. Parallel builds (ablate.zoobuild.build_many): worker processes build bit-identical models to
in-process builds, a failing worker raises its UserError in the parent (one line from the CLI)
and leaves no folder, Ctrl-C stops every worker and leaves nothing behind, and a build another
process finished first is used, not an error. Every test builds
under a temporary ABLATE_HOME; none builds the real zoo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ablate import base, zoo, zoobuild
from ablate.errors import UserError


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ABLATE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def tokenizer():
    return zoo.zoo_tokenizer()


def test_tokenizer_is_deterministic_with_single_token_symbols(tokenizer):
    assert zoo.zoo_tokenizer().backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert tokenizer.eos_token == tokenizer.pad_token == zoo.EOS
    assert len(tokenizer) <= zoo.TOKENIZER_VOCAB
    for symbol in [*"0123456789", *"ABCD", "=", ";"]:
        assert len(tokenizer(" " + symbol)["input_ids"]) == 1, symbol
    ids = tokenizer("apply 7 A B = 3 ; the dogs that the cat sees run .")["input_ids"]
    assert len(ids) == 15  # every word and symbol is a single token


def test_registry_specs_make_models(tokenizer):
    from transformers import AutoModelForCausalLM

    assert len(zoo.ZOO) >= 2 and len({s.family for s in zoo.ZOO.values()}) >= 2
    for name, spec in zoo.ZOO.items():
        assert spec.name == name
        assert spec.tokens_per_step % (spec.micro_batch_size * spec.seq_len) == 0
        config = zoo.model_config(spec, len(tokenizer))
        model = AutoModelForCausalLM.from_config(config)
        assert config.model_type == spec.family
        assert len(model.model.layers) == spec.num_layers


def test_micro_build_is_a_checkpoint_and_is_reused(home, monkeypatch):
    import ablate.train
    from ablate.base import load_causal_lm

    spec = zoo.micro_spec()
    folder = zoo.build(spec, progress=False)
    assert folder == home / "zoo" / "micro" and zoo.is_built(spec)
    assert not zoo.is_built(zoo.micro_spec(lr=1e-3))  # another recipe under the same name: stale
    meta = json.loads((folder / "zoo.json").read_text())
    assert meta["spec"] == spec.model_dump() and meta["tokens"] == spec.train_tokens
    assert meta["final_val_loss"] < meta["initial_val_loss"]
    assert any(folder.glob("*.safetensors"))
    model, tok = load_causal_lm(folder)
    assert model.config.num_hidden_layers == 2 and tok.eos_token == zoo.EOS

    def no_training(*args, **kwargs):
        raise AssertionError("a built model was trained again")

    monkeypatch.setattr(ablate.train, "continue_pretraining", no_training)
    monkeypatch.setitem(zoo.ZOO, "micro", spec)
    model2, _ = base.load("micro")  # built already: loads, never trains
    assert all((a == b).all() for a, b in zip(model.parameters(), model2.parameters(), strict=True))


def test_interrupted_build_leaves_nothing_built(home, monkeypatch):
    import ablate.train

    real = ablate.train.continue_pretraining

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ablate.train, "continue_pretraining", interrupted)
    with pytest.raises(KeyboardInterrupt):
        zoo.build(zoo.micro_spec(), progress=False)
    assert not zoo.is_built(zoo.micro_spec())
    assert [p.name for p in (home / "zoo").iterdir()] == []  # no partial folder either
    monkeypatch.setattr(ablate.train, "continue_pretraining", real)
    monkeypatch.setitem(zoo.ZOO, "micro", zoo.micro_spec())
    model, tok = base.load("micro")  # not built: the first use builds it, starting clean
    assert zoo.is_built(zoo.micro_spec()) and model.config.num_hidden_layers == 2


def test_spec_resolution(tmp_path, tiny_tokenizer):
    from conftest import tiny_model

    with pytest.raises(UserError, match="llama-4l, mistral-6l"):  # the message lists the zoo
        base.resolve("no-such-model")
    base.resolve("HuggingFaceTB/SmolLM2-135M")  # looks like a hub id: left to the hub loader
    folder = tmp_path / "ckpt"
    tiny_model("llama", 2, vocab_size=len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    model, tok = base.load(str(folder))
    assert model.config.num_hidden_layers == 2 and len(tok) == len(tiny_tokenizer)


def test_cli(capsys):
    with pytest.raises(SystemExit) as exit_:
        zoobuild.main(["list"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in zoo.ZOO) and "not built" in out
    with pytest.raises(SystemExit) as exit_:
        zoobuild.main(["build", "no-such-model"])
    assert exit_.value.code == 2
    assert "unknown zoo model 'no-such-model'" in capsys.readouterr().err


def test_build_finished_meanwhile_by_another_process_is_used(home, monkeypatch, tmp_path):
    import shutil

    import ablate.train

    spec = zoo.micro_spec()
    theirs = tmp_path / "theirs"
    shutil.move(zoo.build(spec, threads=1, progress=False), theirs)
    real = ablate.train.continue_pretraining

    def racing(*args, **kwargs):  # the other process renames its complete build into place first
        result = real(*args, **kwargs)
        shutil.copytree(theirs, home / "zoo" / "micro")
        return result

    monkeypatch.setattr(ablate.train, "continue_pretraining", racing)
    assert zoo.build(spec, threads=1, progress=False) == home / "zoo" / "micro"  # no FileExistsError
    assert zoo.is_built(spec) and [p.name for p in (home / "zoo").iterdir()] == ["micro"]

def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _same_build(a: Path, b: Path) -> None:
    """Bit-identical weights and the same calibration numbers (wall time aside)."""
    import torch

    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    ma, mb = (json.loads((f / "zoo.json").read_text()) for f in (a, b))
    for key in ("final_val_loss", "synth_acc", "spec", "tokens", "torch_threads"):
        assert ma[key] == mb[key], key


@pytest.mark.slow  # ~15 s; the default tier keeps the second-process and failing-worker tests of build_many
def test_parallel_builds_match_in_process_builds(home, monkeypatch, tmp_path):
    specs = [zoo.micro_spec("micro-a"), zoo.micro_spec("micro-b", lr=1e-3, num_layers=3)]
    folders = zoobuild.build_many(specs, jobs=2, threads=1, progress=False)  # two worker processes
    assert folders == {s.name: home / "zoo" / s.name for s in specs} and all(map(zoo.is_built, specs))
    assert sorted(p.name for p in (home / "zoo").iterdir()) == ["micro-a", "micro-b"]  # no temporaries
    assert zoobuild.build_many(specs, jobs=2, progress=False) == folders  # built: nothing to do
    monkeypatch.setenv("ABLATE_HOME", str(tmp_path / "sequential"))
    for spec in specs:
        _same_build(folders[spec.name], zoo.build(spec, threads=1, progress=False))


def test_failing_worker_raises_and_leaves_nothing(home, monkeypatch, capsys):
    good, bad = zoo.micro_spec("good"), zoo.micro_spec("bad", tokens_per_step=500)  # not a multiple of 8 x 64
    monkeypatch.setitem(zoo.ZOO, "good", good)  # the parent sends specs, so workers need no registry
    monkeypatch.setitem(zoo.ZOO, "bad", bad)
    with pytest.raises(SystemExit) as exit_:
        zoobuild.main(["build", "good", "bad", "--jobs", "2", "--threads", "1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: tokens_per_step=500 is not a multiple")  # the UserError, one line
    assert any(line.startswith("bad failed: tokens_per_step=500") for line in err)
    assert zoo.is_built(good) and not zoo.is_built(bad)  # the build still running finished
    assert [p.name for p in (home / "zoo").iterdir()] == ["good"]
    with pytest.raises(UserError, match="jobs=0"):
        zoobuild.build_many(["mistral-6l"], jobs=0)  # not shipped: it would be built


def _alive(group: int) -> list[str]:
    """Command lines of the live (not zombie) processes of a process group."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            alive.append(stat.with_name("cmdline").read_bytes().replace(b"\0", b" ").decode())
    return alive


@pytest.mark.slow  # ~14 s; the default tier keeps test_failing_worker_raises_and_leaves_nothing
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_ctrl_c_stops_every_worker(home):
    code = ("from ablate import zoo, zoobuild\n"  # two builds of ~10 s each
            "zoobuild.build_many([zoo.micro_spec('a', train_tokens=1 << 18), "
            "zoo.micro_spec('b', train_tokens=(1 << 18) + 512)], jobs=2, threads=1)")
    root = str(Path(zoo.__file__).parents[1])
    env = dict(os.environ, ABLATE_HOME=str(home), PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    # a session of its own: the signal goes to its whole process group, as Ctrl-C in a terminal does
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(list((home / "zoo").glob(".*/pretraining/metrics.jsonl"))) < 2:  # both workers training
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) != 0
        deadline = time.monotonic() + 10
        while _alive(proc.pid) and time.monotonic() < deadline:  # a straggler gets a moment to exit
            time.sleep(0.1)
        assert _alive(proc.pid) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "KeyboardInterrupt" in proc.stderr.read()
    assert list((home / "zoo").iterdir()) == []  # neither a model nor a temporary folder


def test_a_second_process_waits_for_the_first_builder_and_builds_nothing(home, monkeypatch, capsys):
    """Two study workers started together on one machine share one zoo build."""
    spec = zoo.micro_spec("shared", train_tokens=1 << 17)  # a few seconds
    code = ("from ablate import zoo, zoobuild\n"
            "zoobuild.build_many([zoo.micro_spec('shared', train_tokens=1 << 17)], jobs=1, threads=1, progress=False)")
    root = str(Path(zoo.__file__).parents[1])
    env = dict(os.environ, ABLATE_HOME=str(home), PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    first = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list((home / "zoo").glob(".*/pretraining/metrics.jsonl")):  # the first one is training
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.05)
        monkeypatch.setattr(zoobuild, "build", lambda *a, **k: pytest.fail("the second process built too"))
        assert zoobuild.build_many([spec], jobs=1) == {"shared": home / "zoo" / "shared"}
        assert "another process is building the zoo" in capsys.readouterr().out
        assert first.wait(timeout=60) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
    assert zoo.is_built(spec)


def test_a_shipped_build_is_installed_checked_and_rebuilt_to_the_same_bits(home, monkeypatch, tmp_path):
    """ship() copies a build into the package's shipped builds with sha256s; build() then installs it
    without pretraining; a damaged file is a one-line error; --force pretrains it again, to the same
    bytes (a CPU build is deterministic); a shipped build of another recipe is ignored."""
    import ablate.train

    monkeypatch.setattr(zoo, "SHIPPED", tmp_path / "shipped")
    spec = zoo.micro_spec(schedule="wsd", warmup_tokens=512, precision="fp32")
    monkeypatch.setitem(zoo.ZOO, "micro", spec)
    built = zoo.build(spec, progress=False)
    first = zoo._sha256(built / "model.safetensors")
    target = zoo.ship(spec)
    info = json.loads((target / "zoo.json").read_text())
    assert info["sha256"]["model.safetensors"] == first and set(info["sha256"]) >= {"config.json", "tokenizer.json"}

    real_training = ablate.train.continue_pretraining

    def no_training(*args, **kwargs):
        raise AssertionError("a shipped model was pretrained")

    import shutil

    shutil.rmtree(built)
    monkeypatch.setattr(ablate.train, "continue_pretraining", no_training)
    assert zoo.build("micro", progress=False) == built and zoo.is_built(spec)
    assert zoo._sha256(built / "model.safetensors") == first
    shutil.rmtree(built)
    zoobuild.build_many(["micro"], progress=False)  # the study's path installs it too
    assert zoo.is_built(spec)

    (target / "model.safetensors").write_bytes(b"damaged")
    shutil.rmtree(built)
    with pytest.raises(UserError, match="shipped with ablate is damaged .*model.safetensors"):
        zoo.build("micro", progress=False)
    assert not built.exists()

    monkeypatch.setattr(ablate.train, "continue_pretraining", real_training)
    rebuilt = zoo.build(spec, progress=False, force=True)  # --force: from the recipe, never the shipped copy
    assert zoo._sha256(rebuilt / "model.safetensors") == first

    other = zoo.micro_spec(schedule="wsd", warmup_tokens=512, precision="fp32", lr=1e-3)
    assert zoo.shipped(other) is None  # another recipe under the same name: not this build


@pytest.mark.parametrize("name", ["llama-2l", "llama-4l"])
def test_the_shipped_default_bases(name, tokenizer):
    """The default study's bases ship with the package: their zoo.json names the current spec, every
    file matches its sha256, the checkpoint loads, and it scores the accuracy per level its build
    recorded on the same items."""
    from transformers import AutoModelForCausalLM

    spec = zoo.ZOO[name]
    folder = zoo.shipped(spec)
    assert folder is not None, f"{name}: no shipped build of the current spec"
    info = json.loads((folder / "zoo.json").read_text())
    assert all(zoo._sha256(folder / f) == h for f, h in info["sha256"].items())
    assert info["tokens"] == spec.train_tokens and info["curve"][-1]["tokens"] == spec.train_tokens
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.config.num_hidden_layers == spec.num_layers
    assert zoo._probe(model, tokenizer) == info["synth_acc"]
