"""Depth up-scaling in memory: exactness at m = n/2, SOLAR's stack, independence of copies,
KV-cache consistency, per-layer config, HF save/load round trip, meta-device parameter counts; and the
same for every layer-plan operator (issue 16): zero-output blocks reproduce the base's logits exactly,
``depth_upscale`` is ``apply_plan`` of ``solar(m)``, LLaMA Pro 8B's parameter count on the meta device."""

import re

import pytest
import torch
from conftest import FAMILIES, tiny_config, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

from ablate.errors import UserError
from ablate.params import count_params
from ablate.plan import layer_plan, llama_pro, parse_plan, solar
from ablate.upscale import apply_plan, depth_upscale

N = 4


def inputs(seed=0, length=20, vocab=96):
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_half_depth_reproduces_the_base_exactly(family):
    base = tiny_model(family, N)
    variant = depth_upscale(base, N // 2)
    x = inputs()
    with torch.no_grad():
        assert torch.equal(variant(x).logits, base(x).logits)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("m", [0, 1, 3])
def test_layers_are_independent_copies_in_solar_order(family, m):
    base = tiny_model(family, N)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    variant = depth_upscale(base, m)
    plan = layer_plan(N, m)
    assert len(variant.model.layers) == variant.config.num_hidden_layers == 2 * (N - m)
    assert len(base.model.layers) == base.config.num_hidden_layers == N
    for j, i in enumerate(plan):
        got, want = variant.model.layers[j].state_dict(), base.model.layers[i].state_dict()
        assert got.keys() == want.keys()
        for key in got:
            assert torch.equal(got[key], want[key])
            assert got[key].data_ptr() != want[key].data_ptr()
        assert variant.model.layers[j].self_attn.layer_idx == j
    # Training one copy must not move another copy of the same base layer, nor the base.
    with torch.no_grad():
        variant.model.layers[0].mlp.up_proj.weight.add_(1.0)
    twin = plan.index(0, 1) if plan.count(0) > 1 else None
    if twin is not None:
        assert torch.equal(variant.model.layers[twin].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    for key, value in base.state_dict().items():
        assert torch.equal(value, before[key])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("m", [0, 1, 2, 3])
def test_kv_cache_generation_matches_full_forward(family, m):
    """Greedy decoding with the cache equals decoding without it, token for token and logit for logit.

    The prompt plus new tokens (26) exceed the sliding window (16) of the Mistral and Qwen2 configs.
    """
    variant = depth_upscale(tiny_model(family, N), m)
    prompt = inputs(1, 10)
    kwargs = dict(max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True,
                  attention_mask=torch.ones_like(prompt), pad_token_id=0)
    with torch.no_grad():
        cached = variant.generate(prompt, use_cache=True, **kwargs)
        fresh = variant.generate(prompt, use_cache=False, **kwargs)
        full = variant(cached.sequences).logits
    assert torch.equal(cached.sequences, fresh.sequences)
    for step, (a, b) in enumerate(zip(cached.logits, fresh.logits, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a, full[:, prompt.shape[1] - 1 + step], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_equals_a_model_built_with_that_many_layers(family):
    """A fresh model of the new config, loaded with the variant's weights, behaves identically."""
    variant = depth_upscale(tiny_model(family, N), 1)
    rebuilt = AutoModelForCausalLM.from_config(variant.config).eval()
    rebuilt.load_state_dict(variant.state_dict())
    x = inputs(2)
    with torch.no_grad():
        assert torch.equal(rebuilt(x).logits, variant(x).logits)


def test_qwen2_layer_types_follow_the_plan():
    base = tiny_model("qwen2", N)  # max_window_layers=2: layers 2, 3 use sliding attention
    assert base.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    variant = depth_upscale(base, 1)  # plan 0 1 2 1 2 3
    assert variant.config.layer_types == [base.config.layer_types[i] for i in [0, 1, 2, 1, 2, 3]]
    assert [layer.self_attn.sliding_window for layer in variant.model.layers] == [None, None, 16, None, 16, 16]
    assert base.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_round_trip(family, tmp_path):
    variant = depth_upscale(tiny_model(family, N), 0)
    variant.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_hidden_layers == 2 * N
    assert getattr(loaded.config, "layer_types", None) == getattr(variant.config, "layer_types", None)
    x = inputs(3)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, variant(x).logits)


def test_tied_embeddings_stay_tied_within_the_copy():
    base = tiny_model("llama", N, tie_word_embeddings=True)
    variant = depth_upscale(base, 1)
    assert variant.lm_head.weight is variant.model.embed_tokens.weight
    assert variant.lm_head.weight is not base.lm_head.weight


def test_keeps_dtype_and_device():
    base = tiny_model("llama", N).to(torch.bfloat16)
    variant = depth_upscale(base, 1)
    assert {p.dtype for p in variant.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in variant.parameters()} == {"cpu"}


def test_solar_parameter_count_on_the_meta_device():
    with torch.device("meta"):
        mistral = AutoModelForCausalLM.from_config(MistralConfig())
    assert count_params(mistral) == {"total": 7_241_732_096, "active": 7_241_732_096}
    solar = depth_upscale(mistral, 8)
    assert solar.config.num_hidden_layers == 48
    assert count_params(solar)["total"] == 10_731_524_096
    assert next(solar.parameters()).device.type == "meta"


@pytest.mark.parametrize("m", [-1, N, N + 3])
def test_out_of_range_m_is_a_user_error(m):
    with pytest.raises(UserError, match=f"m={m}.*n={N}"):
        depth_upscale(tiny_model("llama", N), m)


def test_unsupported_per_layer_config_field_is_refused():
    config = tiny_config("llama", N)
    config.mystery_per_layer = [1] * N
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UserError, match="mystery_per_layer"):
        depth_upscale(model, 1)


def test_model_without_decoder_layers_is_refused():
    class NotADecoder(torch.nn.Module):
        config = tiny_config("llama", N)

    with pytest.raises(UserError, match="model.model.layers"):
        depth_upscale(NotADecoder(), 1)


# ---------------------------------------------------------------------------------------------
# Every plan is a variant (issue 16): the same surgery builds every family.

MEASURED = {("angular", 1): [0.3, 0.1, 0.05, 0.2], ("gromov", 1): [0.3, 0.1, 0.05, 0.2],
            ("influence", 1): [0.4, 0.2, 0.1, 0.3]}
OPERATORS = ["solar(1)", "stack(2)", "llama_pro(2)", "llama_pro(4)", "mid(1, 2, 2)", "similar(1)",
             "prune(1, by=last)", "prune(1, by=angular)", "prune(2, by=influence)"]


def test_depth_upscale_is_apply_plan_of_solar():
    base = tiny_model("qwen2", N)
    for m in range(N):
        a, b = depth_upscale(base, m), apply_plan(base, solar(m))
        assert a.config.to_dict() == b.config.to_dict()
        assert a.state_dict().keys() == b.state_dict().keys()
        assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", OPERATORS)
def test_every_operator_builds_independent_copies_in_plan_order(family, spec):
    base = tiny_model(family, N)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    variant = apply_plan(base, spec, measured=MEASURED)
    plan = parse_plan(spec).plan(N, MEASURED)
    assert len(variant.model.layers) == variant.config.num_hidden_layers == len(plan)
    if getattr(base.config, "layer_types", None) is not None:
        assert variant.config.layer_types == [base.config.layer_types[i] for i in plan.sources]
    for j, (i, zero) in enumerate(zip(plan.sources, plan.zero, strict=True)):
        got, want = variant.model.layers[j].state_dict(), base.model.layers[i].state_dict()
        assert got.keys() == want.keys()
        for key in got:
            zeroed = zero and key.startswith(("self_attn.o_proj.", "mlp.down_proj."))
            assert torch.equal(got[key], torch.zeros_like(want[key]) if zeroed else want[key]), (j, key)
            assert got[key].data_ptr() != want[key].data_ptr()
        assert variant.model.layers[j].self_attn.layer_idx == j
    for key, value in base.state_dict().items():
        assert torch.equal(value, before[key])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("p", [1, 2, 4])
def test_zero_output_blocks_compute_exactly_the_base_at_init(family, p):
    """LLaMA Pro's blocks add nothing to the residual stream until trained: the logits are the base's, bit for bit."""
    base = tiny_model(family, N)
    grown = apply_plan(base, llama_pro(p))
    assert grown.config.num_hidden_layers == N + p
    x = inputs(4, 24)  # past the sliding window (16) of the Mistral and Qwen2 configs
    with torch.no_grad():
        assert torch.equal(grown(x).logits, base(x).logits)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", OPERATORS)
def test_kv_cache_generation_matches_uncached_for_every_operator(family, spec):
    variant = apply_plan(tiny_model(family, N), spec, measured=MEASURED)
    prompt = inputs(1, 10)
    kwargs = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True,
                  attention_mask=torch.ones_like(prompt), pad_token_id=0)
    with torch.no_grad():
        cached = variant.generate(prompt, use_cache=True, **kwargs)
        fresh = variant.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, fresh.sequences)
    for a, b in zip(cached.logits, fresh.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_grown_model_save_pretrained_round_trip(family, tmp_path):
    grown = apply_plan(tiny_model(family, N), "llama_pro(2)")
    with torch.no_grad():  # train the new blocks a little, so the round trip carries non-zero copies too
        grown.model.layers[2].mlp.down_proj.weight.normal_()
    grown.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_hidden_layers == N + 2
    assert getattr(loaded.config, "layer_types", None) == getattr(grown.config, "layer_types", None)
    x = inputs(3)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, grown(x).logits)


def test_llama_pro_parameter_count_on_the_meta_device():
    """LLaMA Pro 8B's shape: Llama-2-7B (32 layers) plus 8 blocks, 40 layers."""
    with torch.device("meta"):
        llama = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=32000, hidden_size=4096,
                                                             intermediate_size=11008, num_hidden_layers=32))
    assert count_params(llama)["total"] == 6_738_415_616
    grown = apply_plan(llama, "llama_pro(8)")
    assert grown.config.num_hidden_layers == 40
    assert count_params(grown) == {"total": 8_357_482_496, "active": 8_357_482_496}
    assert next(grown.parameters()).device.type == "meta"
    assert count_params(apply_plan(llama, "prune(8, by=last)"))["total"] == 6_738_415_616 - 8 * 202_383_360


def test_tied_embeddings_stay_tied_for_a_grown_model():
    base = tiny_model("llama", N, tie_word_embeddings=True)
    grown = apply_plan(base, "stack(2)")
    assert grown.lm_head.weight is grown.model.embed_tokens.weight
    assert grown.lm_head.weight is not base.lm_head.weight


@pytest.mark.parametrize("spec,message", [
    ("llama_pro(3)", "p must divide n=4; choose p in [1, 2, 4]"),
    ("mid(3, 2, 2)", "the block 3..4 lies outside a model of n=4 layers"),
    ("prune(4, by=last)", "must leave one; choose 0 <= k < 4"),
    ("prune(1, by=angular)", "got no gromov measurement"),
    ("lama_pro(2)", "did you mean llama_pro?"),
])
def test_bad_plans_are_user_errors(spec, message):
    with pytest.raises(UserError, match=re.escape(message)):
        apply_plan(tiny_model("llama", N), spec)
