"""MoE upcycling in memory: exact equality with the dense model for any router, Mixtral 8x7B's
parameter counts, the load-balancing loss, save/load round trip, symmetry-breaking noise, errors."""

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM, MistralConfig, MixtralForCausalLM

from ablate.errors import UserError
from ablate.moe import upcycle
from ablate.params import count_params


def inputs(seed=0, length=24):
    return torch.randint(0, 96, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("router_std", [None, 1.0, 30.0])
def test_upcycled_model_computes_the_dense_function(family, router_std):
    dense = tiny_model(family, 3)
    moe = upcycle(dense, num_experts=4, top_k=2, router_std=router_std, seed=7).eval()
    assert isinstance(moe, MixtralForCausalLM)
    x = inputs()
    with torch.no_grad():
        diff = (moe(x).logits - dense(x).logits).abs().max().item()
    assert diff < 1e-5


def test_router_weights_are_what_the_logits_test_varies():
    dense = tiny_model("llama", 2)
    a, b = upcycle(dense, 4, 2, seed=0), upcycle(dense, 4, 2, seed=1)
    ra, rb = a.model.layers[0].mlp.gate.weight, b.model.layers[0].mlp.gate.weight
    assert not torch.equal(ra, rb)
    assert 0.01 < ra.std().item() < 0.04  # initializer_range 0.02, not mergekit's N(0, 1)


def test_experts_are_copies_and_input_untouched():
    dense = tiny_model("llama", 2)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    moe = upcycle(dense, 3, 1)
    experts = moe.model.layers[1].mlp.experts
    mlp = dense.model.layers[1].mlp
    for e in range(3):
        assert torch.equal(experts.gate_up_proj[e], torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        assert torch.equal(experts.down_proj[e], mlp.down_proj.weight)
    with torch.no_grad():
        moe.model.layers[0].self_attn.q_proj.weight.add_(1)
    for key, value in dense.state_dict().items():
        assert torch.equal(value, before[key])


def test_training_loss_includes_the_load_balancing_loss():
    moe = upcycle(tiny_model("mistral", 2), 4, 2).train()
    assert moe.config.output_router_logits
    x = inputs(1)
    out = moe(x, labels=x)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    plain = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    torch.testing.assert_close(out.loss, plain + moe.config.router_aux_loss_coef * out.aux_loss)


def test_save_pretrained_round_trip(tmp_path):
    moe = upcycle(tiny_model("llama", 2), 4, 2).eval()
    moe.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MixtralForCausalLM)
    x = inputs(2)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, moe(x).logits)


def test_kv_cache_generation_matches_no_cache():
    moe = upcycle(tiny_model("mistral", 2), 4, 2, expert_noise=0.1).eval()
    prompt = inputs(3, 8)
    kwargs = dict(max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(moe.generate(prompt, use_cache=True, **kwargs),
                           moe.generate(prompt, use_cache=False, **kwargs))


def test_expert_noise_breaks_symmetry_reproducibly():
    dense = tiny_model("llama", 2)
    a, b = upcycle(dense, 4, 2, expert_noise=0.05, seed=3), upcycle(dense, 4, 2, expert_noise=0.05, seed=3)
    w = a.model.layers[0].mlp.experts.down_proj
    assert not torch.equal(w[0], w[1])
    assert torch.equal(w, b.model.layers[0].mlp.experts.down_proj)


def test_mixtral_8x7b_parameter_counts_on_the_meta_device():
    with torch.device("meta"):
        mistral = AutoModelForCausalLM.from_config(MistralConfig())
    mixtral = upcycle(mistral, 8, 2)
    assert count_params(mixtral) == {"total": 46_702_792_704, "active": 12_879_925_248}


def test_tied_embeddings_stay_tied():
    moe = upcycle(tiny_model("llama", 2, tie_word_embeddings=True), 2, 1)
    assert moe.lm_head.weight is moe.model.embed_tokens.weight


@pytest.mark.parametrize("experts,top_k,match", [(2, 3, "top-k=3 exceeds experts=2"), (0, 0, "at least 1")])
def test_bad_expert_counts(experts, top_k, match):
    with pytest.raises(UserError, match=match):
        upcycle(tiny_model("llama", 2), experts, top_k)


def test_other_families_are_refused_with_the_supported_list():
    with pytest.raises(UserError, match="supports llama, mistral"):
        upcycle(tiny_model("qwen2", 2), 4, 2)
