"""Shared fixtures: tiny Llama, Mistral and Qwen2 models built from configs, and a tiny tokenizer.

Nothing here downloads anything: models are random-initialised from small configs
(mergekit's ``make_picollama`` idea) and the tokenizer is trained in the session.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Test models are tiny: one thread per process is as fast, and keeps the processes that some
# tests start side by side (study workers) from fighting over the two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

# The tiny-study fixtures (kit, home) of tests/_studykit.py, for every test module.
pytest_plugins = ["_studykit"]

FAMILIES = ("llama", "mistral", "qwen2")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow to run")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords:
            import torch

            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason="needs CUDA"))


def tiny_config(family: str = "llama", num_layers: int = 4, *, vocab_size: int = 96, **overrides):
    """A tiny config of one family: hidden 32, 4 heads (2 KV heads), untied embeddings."""
    from transformers import AutoConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    if family == "mistral":
        kwargs["sliding_window"] = 16
    if family == "qwen2":
        # Qwen2 with a sliding window on the top layers exercises per-layer ``layer_types``.
        kwargs.update(use_sliding_window=True, sliding_window=16, max_window_layers=num_layers // 2)
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str = "llama", num_layers: int = 4, *, seed: int = 0, **overrides):
    """A random tiny causal LM in eval mode, fp32, on CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, num_layers, **overrides))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE fast tokenizer (about 300 tokens) trained on a few sentences.

    Models that read its ids need ``vocab_size=len(tiny_tokenizer)``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = ["the cat sat on the mat .", "a = 7 . b = a . b ?", "dogs run and cats sleep ."] * 20
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>",
    )
