"""Parameter accounting: total parameters, and active parameters used per token.

Works on models on the ``meta`` device, so 7B-scale configs can be counted without
weights. Tied tensors count once. For a Mixtral-style MoE, each token uses ``top_k`` of
``num_experts`` experts per layer, so the unused experts' weights are not active.
"""

from __future__ import annotations

__all__ = ["count_params", "training_flops_per_token", "inference_flops_per_token"]


def count_params(model) -> dict[str, int]:
    """``{"total": ..., "active": ...}`` parameters of ``model`` (active = used per token)."""
    total = sum(p.numel() for p in model.parameters())  # yields a tied tensor once
    inactive = 0
    for module in model.modules():
        experts, top_k = getattr(module, "experts", None), getattr(module, "top_k", None)
        num = getattr(experts, "num_experts", None)
        if num is None or top_k is None:
            continue
        per_expert = sum(p.numel() for p in experts.parameters()) // num
        inactive += per_expert * (num - top_k)
    return {"total": total, "active": total - inactive}


def _attention_width(config) -> int:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * head_dim


def inference_flops_per_token(config, active_params: int, seq_len: int) -> int:
    """Forward FLOPs per token: 2 per active parameter (a multiply and an add per weight) plus the
    attention scores and mixing, 2 x layers x context x attention width (Kaplan et al. 2020, eq. 2.2:
    ``2N + 2 n_layer n_ctx d_attn``, the whole context, as they count it)."""
    return 2 * active_params + 2 * config.num_hidden_layers * seq_len * _attention_width(config)


def training_flops_per_token(config, active_params: int, seq_len: int) -> int:
    """Training FLOPs per token: three times the forward (the backward pass costs two forwards), so
    ``6N + 6 n_layer n_ctx d_attn``. ``N`` counts every active parameter, embeddings included."""
    return 3 * inference_flops_per_token(config, active_params, seq_len)
