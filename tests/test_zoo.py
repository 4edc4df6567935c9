"""The zoo: the tokenizer (deterministic, one token per reasoning symbol), the registry, a micro
build (an ordinary HF checkpoint plus zoo.json, reused without retraining), an interrupted build
that leaves nothing looking built, spec resolution (zoo name, local folder, hub id, unknown name)
and the CLI. Every test builds under a temporary ABLATE_HOME; none builds the real zoo."""

from __future__ import annotations

import json

import pytest

from ablate import zoo
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
    from ablate.checkpoint import load_causal_lm

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
    model2, _ = zoo.load_base("micro")  # built already: loads, never trains
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
    model, tok = zoo.load_base("micro")  # not built: the first use builds it, starting clean
    assert zoo.is_built(zoo.micro_spec()) and model.config.num_hidden_layers == 2


def test_spec_resolution(tmp_path, tiny_tokenizer):
    from conftest import tiny_model

    with pytest.raises(UserError, match="llama-4l, mistral-6l"):  # the message lists the zoo
        zoo.check_spec("no-such-model")
    zoo.check_spec("HuggingFaceTB/SmolLM2-135M")  # looks like a hub id: left to the hub loader
    folder = tmp_path / "ckpt"
    tiny_model("llama", 2, vocab_size=len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    model, tok = zoo.load_base(str(folder))
    assert model.config.num_hidden_layers == 2 and len(tok) == len(tiny_tokenizer)


def test_cli(capsys):
    with pytest.raises(SystemExit) as exit_:
        zoo.main(["list"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in zoo.ZOO) and "not built" in out
    with pytest.raises(SystemExit) as exit_:
        zoo.main(["build", "no-such-model"])
    assert exit_.value.code == 2
    assert "unknown zoo model 'no-such-model'" in capsys.readouterr().err
