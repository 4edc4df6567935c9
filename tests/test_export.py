"""Streaming exports (``python -m ablate.upscale`` / ``ablate.moe``): the written checkpoint loads with
``AutoModelForCausalLM`` and equals the in-memory surgery; shards, tokenizer, mergekit recipe, atomicity,
and one-line errors with exit code 2 for bad input; every layer plan's export (issue 16) against the in-memory
surgery and against its mergekit recipe read the way mergekit's passthrough reads it."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from ablate import export
from ablate.moe import export_upcycled, upcycle
from ablate.moe import main as moe_main
from ablate.plan import parse_plan
from ablate.upscale import apply_plan, depth_upscale, export_plan, export_upscaled
from ablate.upscale import main as upscale_main


@pytest.fixture
def checkpoint(tmp_path, tiny_tokenizer):
    """A tiny Llama saved in bf16 over several safetensors shards, with its tokenizer."""
    model = tiny_model("llama", 4, vocab_size=len(tiny_tokenizer)).to(torch.bfloat16)
    path = tmp_path / "base"
    model.save_pretrained(path, max_shard_size="20KB")
    tiny_tokenizer.save_pretrained(path)
    assert len(list(path.glob("*.safetensors"))) > 1
    # Reload, so buffers (rotary frequencies) are what from_pretrained makes, not a cast of fp32 ones.
    return path, AutoModelForCausalLM.from_pretrained(path).eval()


def ids(n=16, vocab=200):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("m", [0, 1, 3])
def test_dus_export_equals_in_memory_surgery(checkpoint, tmp_path, m):
    src, model = checkpoint
    out = tmp_path / f"dus{m}"
    record = export_upscaled(str(src), m, str(out), max_shard_size="30KB", progress=False)
    assert record["plan"] == list(range(4 - m)) + list(range(m, 4))
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    expected = depth_upscale(model, m)
    assert loaded.dtype == torch.bfloat16
    assert loaded.state_dict().keys() == expected.state_dict().keys()
    for key, value in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, expected(ids()).logits)
    assert (out / "model.safetensors.index.json").exists()
    assert AutoTokenizer.from_pretrained(out)("the cat").input_ids
    recipe = yaml.safe_load((out / "mergekit.yaml").read_text())
    assert recipe["merge_method"] == "passthrough"
    assert [s["sources"][0]["layer_range"] for s in recipe["slices"]] == [[0, 4 - m], [m, 4]]
    assert json.loads((out / "ablate.json").read_text())["s"] == 2 * (4 - m)


def test_qwen2_export_keeps_layer_types(tmp_path):
    tiny_model("qwen2", 4).save_pretrained(tmp_path / "q")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    export_upscaled(str(tmp_path / "q"), 1, str(tmp_path / "out"), progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    expected = depth_upscale(model, 1)
    assert loaded.config.layer_types == expected.config.layer_types
    with torch.no_grad():
        assert torch.equal(loaded(ids(vocab=96)).logits, expected(ids(vocab=96)).logits)


def test_moe_export_equals_in_memory_upcycle(checkpoint, tmp_path):
    src, model = checkpoint
    out = tmp_path / "moe"
    export_upcycled(str(src), 4, 2, str(out), seed=5, progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    expected = upcycle(model, 4, 2, seed=5).eval()
    for key, value in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, expected(ids()).logits)
    recipe = yaml.safe_load((out / "mergekit-moe.yaml").read_text())
    assert recipe["experts_per_token"] == 2 and len(recipe["experts"]) == 4


def test_interrupted_export_leaves_nothing_that_looks_complete(checkpoint, tmp_path, monkeypatch):
    src, _ = checkpoint
    calls = []

    def dying_write(*args, **kwargs):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "_write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        export_upscaled(str(src), 1, str(tmp_path / "out"), progress=False)
    assert calls and not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["base"]  # no partial folder left behind


def run_cli(main, argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip()
    return info.value.code, err


def bad_inputs(root, src):
    (root / "empty").mkdir()
    (root / "pickled").mkdir()
    (root / "pickled" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (root / "pickled" / "pytorch_model.bin").write_bytes(b"not really")
    (root / "exists").mkdir()
    qwen = root / "qwen"
    tiny_model("qwen2", 2).save_pretrained(qwen)
    return [
        (upscale_main, [str(src), "--m", "4", "--out", str(root / "o1")], "m=4 is out of range for n=4"),
        (upscale_main, [str(src), "--m", "-1", "--out", str(root / "o2")], "m=-1"),
        (upscale_main, [str(root / "missing"), "--m", "1", "--out", str(root / "o3")], "does not exist"),
        (upscale_main, [str(root / "empty"), "--m", "1", "--out", str(root / "o4")], "no config.json"),
        (upscale_main, [str(root / "pickled"), "--m", "1", "--out", str(root / "o5")], "pickled weights"),
        (upscale_main, [str(src), "--m", "1", "--out", str(root / "exists")], "already exists"),
        (upscale_main, [str(src), "--m", "1", "--out", "/sys/ablate-out"], "cannot write"),
        (upscale_main, [str(src), "--plan", "llama_pro(3)", "--out", str(root / "o8")], "p must divide n=4"),
        (upscale_main, [str(src), "--plan", "similar(1)", "--out", str(root / "o9")], "an export only copies tensors"),
        (upscale_main, [str(src), "--plan", "stack(2)", "--m", "1", "--out", str(root / "o10")], "not both"),
        (upscale_main, [str(src), "--out", str(root / "o11")], "--plan SPEC"),
        (moe_main, [str(src), "--experts", "2", "--top-k", "3", "--out", str(root / "o6")], "top-k=3 exceeds"),
        (moe_main, [str(qwen), "--experts", "4", "--top-k", "2", "--out", str(root / "o7")], "supported architectures"),
    ]


def test_bad_input_gives_one_line_and_exit_2(checkpoint, tmp_path, capsys):
    src, _ = checkpoint
    cases = bad_inputs(tmp_path, src)
    capsys.readouterr()  # drop the set-up's progress output
    for main, argv, expected in cases:
        before = sorted(p.name for p in tmp_path.iterdir())
        code, err = run_cli(main, argv, capsys)
        assert code == 2, (argv, err)
        assert err.startswith("error: ") and "\n" not in err and expected in err, (argv, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, argv  # nothing created


def test_cli_subprocess_has_no_traceback(checkpoint, tmp_path):
    src, _ = checkpoint
    done = subprocess.run([sys.executable, "-m", "ablate.upscale", str(src), "--m", "9", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stderr.strip().count("\n") == 0
    ok = subprocess.run([sys.executable, "-m", "ablate.upscale", str(src), "--m", "2", "--out", str(tmp_path / "o")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "o").config.num_hidden_layers == 4


# ---------------------------------------------------------------------------------------------
# Every plan exports (issue 16): tensor for tensor the in-memory surgery, and a mergekit recipe that rebuilds it.


def mergekit_passthrough(recipe: dict, base_state: dict) -> dict:
    """mergekit's passthrough, as its code reads (slices stacked in order, each tensor of a source times the
    ``scale`` of the first filter its name contains, or of the filterless default), on in-memory tensors."""
    out, j = {}, 0
    for piece in recipe["slices"]:
        (source,) = piece["sources"]
        rules = source.get("parameters", {}).get("scale", [{"value": 1.0}])
        a, b = source["layer_range"]
        for i in range(a, b):
            prefix = f"model.layers.{i}."
            for name, value in base_state.items():
                if name.startswith(prefix):
                    rest = name[len(prefix):]
                    scale = next(r["value"] for r in rules if "filter" not in r or r["filter"] in rest)
                    out[f"model.layers.{j}.{rest}"] = value * scale
            j += 1
    out.update({k: v for k, v in base_state.items() if not k.startswith("model.layers.")})
    return out


@pytest.mark.parametrize("spec", ["llama_pro(2)", "stack(2)", "mid(1, 2, 3)", "prune(2, by=last)", "solar(1)"])
def test_plan_export_equals_in_memory_surgery_and_its_mergekit_recipe(checkpoint, tmp_path, spec):
    src, model = checkpoint
    out = tmp_path / "grown"
    record = export_plan(str(src), spec, str(out), max_shard_size="30KB", progress=False)
    plan = parse_plan(spec).plan(4)
    assert record["operator"] == spec and record["plan"] == list(plan.sources)
    assert record["zero_output"] == plan.zero_layers and record["s"] == len(plan)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    expected = apply_plan(model, spec)
    assert loaded.config.num_hidden_layers == len(plan) and loaded.dtype == torch.bfloat16
    assert loaded.state_dict().keys() == expected.state_dict().keys()
    for key, value in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, expected(ids()).logits)
    recipe = yaml.safe_load((out / "mergekit.yaml").read_text())
    assert recipe["merge_method"] == "passthrough"
    rebuilt = mergekit_passthrough(recipe, model.state_dict())
    for key, value in expected.state_dict().items():
        if key in rebuilt:  # rotary buffers are not weights
            assert torch.equal(rebuilt[key], value), key


def test_zero_output_export_streams_zeros(checkpoint, tmp_path):
    src, model = checkpoint
    export_plan(str(src), "llama_pro(4)", str(tmp_path / "o"), progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "o").eval()
    for j in (1, 3, 5, 7):
        layer = loaded.model.layers[j]
        assert not layer.self_attn.o_proj.weight.any() and not layer.mlp.down_proj.weight.any()
        assert torch.equal(layer.mlp.up_proj.weight, model.model.layers[j // 2].mlp.up_proj.weight)
    with torch.no_grad():  # the grown checkpoint computes the base's function
        assert torch.equal(loaded(ids()).logits, model(ids()).logits)


def test_cli_takes_a_plan(checkpoint, tmp_path, capsys):
    src, _ = checkpoint
    with pytest.raises(SystemExit) as info:
        upscale_main([str(src), "--plan", "llama_pro(2)", "--out", str(tmp_path / "o")])
    assert info.value.code == 0
    assert "4 -> 6 layers (llama_pro(2))" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "o").config.num_hidden_layers == 6
    assert json.loads((tmp_path / "o" / "ablate.json").read_text())["method"] == "plan"
    with pytest.raises(SystemExit) as info:
        upscale_main([str(src), "--m", "1", "--out", str(tmp_path / "m")])
    assert info.value.code == 0
    record = json.loads((tmp_path / "m" / "ablate.json").read_text())
    assert record["method"] == "dus" and record["m"] == 1 and record["operator"] == "solar(1)"
