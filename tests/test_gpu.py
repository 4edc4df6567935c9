"""CUDA checks of the surgery, CPT and evaluation paths (skipped without a GPU, so never in CI).

Each test builds on the GPU what a study builds there and compares it with something outside
the code under test: the same surgery done on CPU, the dense model an MoE came from, generation
without the KV cache, and a plain fp32 training loop (tests/test_train.py's reference). Run on a
GPU machine with ``python -m pytest -q -m gpu tests/test_gpu.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_train import random_data, read_metrics, reference_losses, small_config

from ablate.evaluate import perplexity
from ablate.moe import upcycle
from ablate.train import continue_pretraining
from ablate.upscale import depth_upscale

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def ids(batch: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _exact_fp32_matmuls():
    """TF32 would make GPU fp32 products differ from CPU ones by ~1e-3; the tests compare at 1e-5."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_surgery_on_the_gpu_equals_surgery_on_cpu(family):
    base = tiny_model(family, 4)
    on_cpu = depth_upscale(base, 1)
    on_gpu = depth_upscale(base.to(CUDA), 1)
    assert next(on_gpu.parameters()).device.type == "cuda"
    for (name, a), (_, b) in zip(on_cpu.state_dict().items(), on_gpu.state_dict().items(), strict=True):
        assert torch.equal(a, b.cpu()), name
    with torch.no_grad():
        torch.testing.assert_close(on_gpu(ids().to(CUDA)).logits.cpu(), on_cpu(ids()).logits,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_gpu_generation_with_and_without_cache_agree_past_the_window(family):
    variant = depth_upscale(tiny_model(family, 4).to(CUDA), 0)
    prompt = ids(1, 10).to(CUDA)  # 10 + 16 new tokens > the sliding window of 16
    kwargs = dict(max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True,
                  attention_mask=torch.ones_like(prompt), pad_token_id=0)
    with torch.no_grad():
        cached = variant.generate(prompt, use_cache=True, **kwargs)
        fresh = variant.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, fresh.sequences)
    for a, b in zip(cached.logits, fresh.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_moe_upcycled_on_the_gpu_computes_the_dense_function():
    dense = tiny_model("mistral", 3).to(CUDA)
    moe = upcycle(dense, num_experts=4, top_k=2, seed=7).eval()
    assert next(moe.parameters()).device.type == "cuda"
    x = ids().to(CUDA)
    with torch.no_grad():
        assert (moe(x).logits - dense(x).logits).abs().max().item() < 1e-5


def test_cpt_on_the_gpu_runs_bf16_and_tracks_a_plain_fp32_loop(tmp_path):
    """precision=auto picks bf16 on a bf16 GPU; its losses stay within bf16 tolerance of fp32's."""
    data, config = random_data(), small_config(precision="auto", lr=1e-2)
    expected = reference_losses(tiny_model(num_layers=2), data, config, steps=4)  # CPU, fp32
    model = tiny_model(num_layers=2)
    result = continue_pretraining(model, data, config, out_dir=tmp_path, progress=False)
    assert result.status == "completed" and result.device.startswith("cuda")
    assert result.precision == "bf16"
    got = [r["train_loss"] for r in read_metrics(tmp_path)[1:]]
    assert got == pytest.approx(expected, rel=3e-2)
    assert got[-1] < got[0] - 0.05


def test_perplexity_on_the_gpu_equals_cpu_and_auto_is_bf16_close():
    model = tiny_model(num_layers=2)
    rows = np.random.default_rng(0).integers(0, 96, (12, 32)).astype(np.int32)
    on_cpu = perplexity(model, rows, batch_size=5, precision="fp32")
    on_gpu = perplexity(model.to(CUDA), rows, batch_size=5, precision="fp32")
    assert on_gpu["val_loss"] == pytest.approx(on_cpu["val_loss"], rel=1e-5)
    auto = perplexity(model, rows, batch_size=5)  # bf16 autocast on a bf16 GPU
    assert auto["val_loss"] == pytest.approx(on_cpu["val_loss"], rel=2e-2)


def test_zoo_build_on_the_gpu_probes_on_the_gpu(tmp_path, monkeypatch):
    """A zoo build trains where CUDA is and scores its calibration probe there (the first GPU run
    of the study failed here: the probe's token ids stayed on the CPU)."""
    import json

    from ablate import zoo

    monkeypatch.setenv("ABLATE_HOME", str(tmp_path))
    folder = zoo.build(zoo.micro_spec(), progress=False)
    info = json.loads((folder / "zoo.json").read_text())
    assert info["precision"] == "bf16" and set(info["synth_acc"]) == {"synth_k1", "synth_k2", "synth_k3", "synth_k4"}


def test_synthetic_accuracy_on_the_gpu_equals_cpu(tiny_tokenizer):
    from ablate.synthetic import accuracy, eval_items

    model = tiny_model("llama", 2, vocab_size=len(tiny_tokenizer))
    items = eval_items(1, 40)
    on_cpu = accuracy(model, tiny_tokenizer, items, batch_size=16)
    assert accuracy(model.to(CUDA), tiny_tokenizer, items, batch_size=16) == on_cpu


def test_cpt_stays_on_the_cpu_when_asked(tmp_path):
    """A study's --device cpu on a CUDA machine: CPT must not move the variant to the GPU."""
    model = tiny_model(num_layers=2)
    result = continue_pretraining(model, random_data(), small_config(), progress=False, cpu=True)
    assert result.device == "cpu" and next(model.parameters()).device.type == "cpu"
