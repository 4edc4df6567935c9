"""Mixtral-style sparse upcycling of a dense Llama- or Mistral-family model.

Every MLP becomes ``num_experts`` experts that start as exact copies of it, plus a new
router that picks ``top_k`` experts per token (Komatsuzaki et al. 2022). Mixtral
renormalises the top-k router weights to sum to one, so with identical experts the
upcycled model computes exactly the dense model's function at initialisation, for any
router weights. The result is a transformers-native ``MixtralForCausalLM`` (loadable with
``AutoModelForCausalLM``, no custom code) with its load-balancing loss switched on.

In memory::

    from ablate.moe import upcycle
    moe = upcycle(model, num_experts=8, top_k=2)

On disk, streaming tensors (peak memory far below the checkpoint's size), with the
equivalent mergekit-moe recipe::

    python -m ablate.moe path/to/checkpoint --experts 8 --top-k 2 --out moe/
"""

from __future__ import annotations

import re

from ablate import export
from ablate.base import MOE_FAMILIES
from ablate.errors import UserError, cli
from ablate.exportcli import export_parser, run_export

__all__ = ["SUPPORTED", "moe_config", "router_init", "upcycle", "export_upcycled", "mergekit_moe_yaml", "main"]

SUPPORTED = MOE_FAMILIES  # one list, kept by the base resolver
# Mixtral-8x7B's released config uses 0.02 for the load-balancing loss (HF's class
# default is 0.001, too weak to keep a freshly upcycled router balanced).
AUX_LOSS_COEF = 0.02


def moe_config(dense, num_experts: int, top_k: int, *, aux_loss_coef: float = AUX_LOSS_COEF):
    """The ``MixtralConfig`` of ``dense`` upcycled to ``num_experts`` experts, ``top_k`` per token."""
    from transformers import MixtralConfig

    _check_experts(num_experts, top_k)
    family = getattr(dense, "model_type", None)
    if family not in SUPPORTED:
        raise UserError(f"MoE upcycling supports {', '.join(SUPPORTED)} models, not {family!r}")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(dense, flag, False):
            raise UserError(f"this {family} model has {flag}=True, which Mixtral layers cannot hold")
    if getattr(dense, "layer_types", None) and len(set(dense.layer_types)) > 1:
        raise UserError("models mixing sliding and full attention layers cannot be upcycled to Mixtral")
    config = MixtralConfig(
        vocab_size=dense.vocab_size,
        hidden_size=dense.hidden_size,
        intermediate_size=dense.intermediate_size,
        num_hidden_layers=dense.num_hidden_layers,
        num_attention_heads=dense.num_attention_heads,
        num_key_value_heads=dense.num_key_value_heads,
        head_dim=getattr(dense, "head_dim", None) or dense.hidden_size // dense.num_attention_heads,
        hidden_act=dense.hidden_act,
        max_position_embeddings=dense.max_position_embeddings,
        initializer_range=dense.initializer_range,
        rms_norm_eps=dense.rms_norm_eps,
        use_cache=dense.use_cache,
        pad_token_id=dense.pad_token_id,
        bos_token_id=dense.bos_token_id,
        eos_token_id=dense.eos_token_id,
        tie_word_embeddings=dense.tie_word_embeddings,
        sliding_window=getattr(dense, "sliding_window", None),
        attention_dropout=dense.attention_dropout,
        rope_parameters=dense.rope_parameters,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        output_router_logits=True,  # Mixtral adds the load-balancing loss to .loss only when set
        router_aux_loss_coef=aux_loss_coef,
    )
    if getattr(dense, "dtype", None) is not None:
        config.dtype = dense.dtype
    return config


def _check_experts(num_experts: int, top_k: int) -> None:
    if num_experts < 1 or top_k < 1:
        raise UserError(f"experts={num_experts} and top-k={top_k} must both be at least 1")
    if num_experts < top_k:
        raise UserError(f"top-k={top_k} exceeds experts={num_experts}; choose top-k <= experts")


def router_init(num_layers: int, num_experts: int, hidden: int, *, std: float, seed: int):
    """Router weights for every layer, float32 on CPU, ``N(0, std^2)`` from ``seed``.

    ``std`` is the base model's ``initializer_range`` (0.02 for Llama and Mistral), the
    scale its own linear layers started from; mergekit-moe's ``random`` gate uses
    ``N(0, 1)``, whose logits are ~50x larger and route near-deterministically from the
    first step. Generated on the CPU so the in-memory and exported routers are equal.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_layers, num_experts, hidden, generator=g) * std


def upcycle(model, num_experts: int = 8, top_k: int = 2, *, router_std: float | None = None,
            expert_noise: float = 0.0, seed: int = 0, aux_loss_coef: float = AUX_LOSS_COEF):
    """Return a new ``MixtralForCausalLM`` whose experts copy ``model``'s MLPs; the input is untouched.

    ``expert_noise`` (off by default) adds ``N(0, (expert_noise * std(W))^2)`` to each
    expert's copy of each weight ``W`` to break the experts' symmetry; with noise the
    model is no longer exactly the dense one.
    """
    import torch
    from transformers import MixtralForCausalLM

    config = moe_config(model.config, num_experts, top_k, aux_loss_coef=aux_loss_coef)
    ref = next(model.parameters())
    with torch.device(ref.device):
        new = MixtralForCausalLM._from_config(config, dtype=ref.dtype)
    std = model.config.initializer_range if router_std is None else router_std
    routers = router_init(config.num_hidden_layers, num_experts, config.hidden_size, std=std, seed=seed)
    noise = torch.Generator().manual_seed(seed + 1)

    def copies(w):
        stacked = w.detach().unsqueeze(0).repeat(num_experts, *([1] * w.dim()))
        if expert_noise and w.device.type != "meta":
            scale = expert_noise * w.detach().float().std()
            stacked += (torch.randn(stacked.shape, generator=noise) * scale).to(stacked)
        return stacked

    state = {}
    for name, tensor in model.state_dict().items():
        match = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", name)
        if match is None:
            state[name] = tensor
    for i, layer in enumerate(model.model.layers):
        mlp, prefix = layer.mlp, f"model.layers.{i}.mlp."
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)
        state[prefix + "experts.gate_up_proj"] = copies(gate_up)
        state[prefix + "experts.down_proj"] = copies(mlp.down_proj.weight)
        state[prefix + "gate.weight"] = routers[i]
    with torch.no_grad():
        # On the meta device there is nothing to copy: assign the (meta) tensors instead.
        missing, unexpected = new.load_state_dict(state, strict=False, assign=ref.device.type == "meta")
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise UserError(
            f"cannot upcycle {type(model).__name__}: tensors without a Mixtral place {sorted(unexpected)[:3]}, "
            f"Mixtral tensors without a source {sorted(set(missing) - tied)[:3]}"
        )
    if new.generation_config is not None and getattr(model, "generation_config", None) is not None:
        new.generation_config = model.generation_config
    return new.train(model.training)


MLP_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
EXPERT_NAME = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}  # Mixtral's on-disk names
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def export_upcycled(src: str, num_experts: int, top_k: int, out: str, *, seed: int = 0,
                    router_std: float | None = None, force: bool = False, max_shard_size: str = "2GB",
                    progress: bool = True) -> dict:
    """Write upcycle(src) as a complete HF checkpoint in ``out`` by streaming tensors."""
    import torch

    _check_experts(num_experts, top_k)
    source = export.resolve_source(src)
    dense = export.load_config(source, supported=SUPPORTED)
    config = moe_config(dense, num_experts, top_k)
    others = [n for n in source.tensors if ".mlp." in n and not MLP_KEY.match(n)]
    if others:
        raise UserError(f"{src} has MLP tensors Mixtral cannot hold (e.g. {others[0]})")

    def rename(name: str) -> list[str]:
        match = MLP_KEY.match(name)
        if match is None:
            return [name]
        i, proj = match.groups()
        return [f"model.layers.{i}.block_sparse_moe.experts.{e}.{EXPERT_NAME[proj]}.weight" for e in range(num_experts)]

    tensors = export.renamed_tensors(source, rename)
    std = dense.initializer_range if router_std is None else router_std
    routers = router_init(config.num_hidden_layers, num_experts, config.hidden_size, std=std, seed=seed)
    dtype_code = source.tensors["model.layers.0.mlp.gate_proj.weight"].dtype
    dtype = getattr(torch, SAFETENSORS_DTYPES.get(dtype_code, "float32"))
    for i in range(config.num_hidden_layers):
        data = routers[i].to(dtype).contiguous().view(torch.uint8).numpy().tobytes()
        tensors[f"model.layers.{i}.block_sparse_moe.gate.weight"] = export.TensorBytes(
            dtype_code, (num_experts, config.hidden_size), data)
    record = {"method": "moe", "source": src, "n": config.num_hidden_layers, "experts": num_experts,
              "top_k": top_k, "seed": seed, "router_std": std}
    export.write_checkpoint(source, out, config, tensors,
                            extra_files={"mergekit-moe.yaml": mergekit_moe_yaml(src, num_experts, top_k, config)},
                            record=record, force=force, max_shard_size=max_shard_size, progress=progress)
    return record


def mergekit_moe_yaml(src: str, num_experts: int, top_k: int, config) -> str:
    """The mergekit-moe recipe of upcycle(src): ``mergekit-moe mergekit-moe.yaml OUT``."""
    import yaml

    recipe = {
        "base_model": src,
        "gate_mode": "random",
        "dtype": str(getattr(config, "dtype", None) or "float32").removeprefix("torch."),
        "experts_per_token": top_k,
        "experts": [{"source_model": src} for _ in range(num_experts)],
    }
    head = (f"# Mixtral-style upcycle of {src}: {num_experts} experts, top-{top_k}. "
            "Rebuild with mergekit-moe (its random gate is N(0,1), not ablate's N(0, initializer_range^2)).\n")
    return head + yaml.safe_dump(recipe, sort_keys=False)


@cli
def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    def options(parser) -> None:
        parser.add_argument("--experts", type=int, required=True, help="experts per layer (copies of the MLP)")
        parser.add_argument("--top-k", type=int, required=True, help="experts used per token (<= --experts)")

    parser = export_parser(
        prog or "python -m ablate.moe",
        description="Write a Mixtral-style MoE upcycle of a dense Llama/Mistral checkpoint, streaming its tensors.",
        example="./mistral-7b --experts 8 --top-k 2 --out ./mixtral-like",
        options=options,
        seed_help="seed of the router initialisation (default 0)",
    )
    return run_export(
        parser, argv,
        export=lambda a: export_upcycled(a.src, a.experts, a.top_k, a.out, seed=a.seed, force=a.force,
                                         max_shard_size=a.max_shard_size),
        report=lambda a, record: f"{a.experts} experts, top-{a.top_k}",
    )


if __name__ == "__main__":
    main()
