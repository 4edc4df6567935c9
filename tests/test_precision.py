"""precision: auto for CPT: the rule per device, and the timed choice on CPUs with native bf16,
cached per model shape (the timing itself is replaced here: no test asserts on wall time)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

from ablate import precision
from ablate.errors import UserError

CPU = torch.device("cpu")


def test_explicit_and_cpu_without_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert precision.choose("fp32", CPU).precision == "fp32"
    assert precision.choose("bf16", CPU).precision == "bf16"  # asked for: honoured, even if slow
    auto = precision.choose("auto", CPU, tiny_model())
    assert (auto.precision, auto.fp32_tokens_per_s) == ("fp32", None) and "emulates bf16" in auto.reason
    with pytest.raises(UserError, match="precision must be one of"):
        precision.choose("fp16", CPU)


@pytest.mark.parametrize(("fp32", "bf16", "pick"), [(17_127.0, 11_389.0, "fp32"), (300.0, 900.0, "bf16")])
def test_native_bf16_cpu_times_each_shape_once(monkeypatch, tmp_path, fp32, bf16, pick):
    """The faster precision wins (the width-64 numbers measured on an AVX512-BF16 machine pick fp32),
    the choice is cached per shape, and another shape is timed again."""
    monkeypatch.setenv("ABLATE_HOME", str(tmp_path))
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    calls = []

    def fake_measure(model, device, micro_batch, seq_len):
        calls.append((model.config.num_hidden_layers, micro_batch, seq_len))
        return fp32, bf16

    monkeypatch.setattr(precision, "measure", fake_measure)
    first = precision.choose("auto", CPU, tiny_model(num_layers=4), micro_batch=8, seq_len=128)
    again = precision.choose("auto", CPU, tiny_model(num_layers=4), micro_batch=8, seq_len=128)
    other = precision.choose("auto", CPU, tiny_model(num_layers=2), micro_batch=8, seq_len=128)
    assert first.precision == again.precision == other.precision == pick
    assert (first.cached, again.cached, other.cached) == (False, True, False)
    assert calls == [(4, 8, 128), (2, 8, 128)]
    assert "timed on this model" in first.reason and again.fp32_tokens_per_s == fp32
    assert len(json.loads(precision.cache_path().read_text())) == 2
    precision.cache_path().write_text("{damaged")  # a damaged cache is timed again, then rewritten
    assert precision.choose("auto", CPU, tiny_model(num_layers=4), micro_batch=8, seq_len=128).cached is False


def test_measure_leaves_the_model_and_rng_as_they_were():
    model = tiny_model(num_layers=2).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fp32, bf16 = precision.measure(model, CPU, 2, 16)
    assert fp32 > 0 and bf16 > 0
    assert torch.equal(torch.rand(3), expected)
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_trial_record_says_why(monkeypatch):
    from test_train import random_data, small_config

    from ablate.train import continue_pretraining

    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    result = continue_pretraining(tiny_model(num_layers=2), random_data(), small_config(precision="auto"),
                                  progress=False)
    assert result.precision == "fp32" and "emulates bf16" in result.precision_choice["reason"]
