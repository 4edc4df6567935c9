"""Parameter accounting: total parameters, and active parameters used per token.

Works on models on the ``meta`` device, so 7B-scale configs can be counted without
weights. Tied tensors count once. For a Mixtral-style MoE, each token uses ``top_k`` of
``num_experts`` experts per layer, so the unused experts' weights are not active.
"""

from __future__ import annotations

__all__ = ["count_params"]


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
