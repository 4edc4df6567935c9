"""Memory per GPU of a study's trials, from its config alone: ``ablate plan-memory studies/solar.yaml --gpus 8``.

Pure arithmetic on parameter counts (:mod:`ablate.params`, on the meta device: no weights are read)
for the largest arms of each base (the deepest DUS variant, the MoE upcycle, each layer-plan operator):

- model states: with ``train.distributed: fsdp``, fp32 master weights, fp32 gradients and AdamW's two
  fp32 moments, 16 bytes per parameter, a 1/G share on each GPU (fsdp makes the shards fp32); with
  ``ddp``, weights, gradients and moments in the checkpoint's own dtype (8 bytes per parameter for a
  bf16 checkpoint, 16 for fp32), all of it on every GPU;
- FSDP's gathered units: the root (embeddings, head) and two decoder layers at a time in bf16, plus
  one unit's fp32 gradients before they are reduce-scattered;
- activations (an estimate, stated as such): each layer's stored bf16 tensors for one micro-batch
  of ``micro_batch_size`` rows of ``seq_len`` tokens with fused attention (no s x s scores) and no
  activation checkpointing, about ``2 x (10 h + 4 k I)`` bytes per token and layer (k experts per
  token), plus the logits in bf16 and fp32 and their gradient (10 bytes per token and vocabulary entry);
- the base model, which every process keeps on its GPU in the checkpoint's dtype for the next trial,
  and the build peak: the base plus the whole variant, which every rank builds before it is sharded.

A hub base whose config cannot be read (offline) uses its published config when it is one of the
shipped studies' bases (:data:`PUBLISHED`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ablate.errors import UserError, cli

__all__ = ["PUBLISHED", "ArmMemory", "plan_memory", "table", "main"]

GB = 1e9
STATE_BYTES = 16  # fp32 weights 4 + fp32 gradients 4 + AdamW moments 2 x 4

# config.json of the hub bases the shipped studies name, as published (used only when the hub is out of reach)
PUBLISHED: dict[str, dict] = {
    "mistralai/Mistral-7B-v0.1": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                      vocab_size=32000, max_position_embeddings=32768, sliding_window=4096,
                                      tie_word_embeddings=False, torch_dtype="bfloat16"),
    "meta-llama/Llama-2-7b-hf": dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                     vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False,
                                     torch_dtype="float16"),
    "HuggingFaceTB/SmolLM2-135M": dict(model_type="llama", hidden_size=576, intermediate_size=1536,
                                       num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                       vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
                                       torch_dtype="bfloat16"),
    "Qwen/Qwen2.5-0.5B": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                              num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                              max_position_embeddings=32768, tie_word_embeddings=True, torch_dtype="bfloat16"),
}


def base_config(spec: str, *, trust_remote_code: bool = False):
    """A base's transformers config: read as a study reads it, else the published one (offline hub ids)."""
    from transformers import AutoConfig

    from ablate import base as bases

    try:
        return bases.model_config(spec, trust_remote_code=trust_remote_code)
    except UserError:
        if spec not in PUBLISHED:
            raise
        known = dict(PUBLISHED[spec])
        return AutoConfig.for_model(known.pop("model_type"), **known)


@dataclass(frozen=True)
class ArmMemory:
    """Bytes per GPU of one arm's CPT (see the module docstring for what each part counts)."""

    base: str
    arm: str
    layers: int
    params: int  # total parameters
    states_ddp: float  # per GPU, ddp (the checkpoint's dtype)
    states_fsdp: float  # per GPU, fsdp over ``gpus``
    gathered: float  # fsdp's unsharded units, per GPU
    activations: float  # one micro-batch, per GPU (estimate)
    base_kept: float  # the base on every GPU
    build_peak: float  # base + whole variant, before sharding

    @property
    def fsdp_total(self) -> float:
        return self.states_fsdp + self.gathered + self.activations + self.base_kept

    @property
    def ddp_total(self) -> float:
        return self.states_ddp + self.activations + self.base_kept


def _dtype_bytes(config) -> int:
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    return 2 if ("16" in dtype) else 4


def _meta_model(config):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _arm(label: str, arm: str, model, base_params: int, base_bytes: int, *, gpus: int, micro_batch: int,
         seq_len: int) -> ArmMemory:
    from ablate.params import count_params

    config = model.config
    params = count_params(model)["total"]
    layers = model.model.layers
    layer = max(sum(p.numel() for p in block.parameters()) for block in layers)
    root = params - sum(p.numel() for block in layers for p in block.parameters())
    k = getattr(config, "num_experts_per_tok", 1)
    tokens = micro_batch * seq_len
    h, inter = config.hidden_size, config.intermediate_size
    activations = tokens * (len(layers) * 2 * (10 * h + 4 * k * inter) + 10 * config.vocab_size)
    return ArmMemory(base=label, arm=arm, layers=len(layers), params=params, states_ddp=4 * base_bytes * params,
                     states_fsdp=STATE_BYTES * params / gpus, gathered=2 * (root + 2 * layer) + 4 * max(root, layer),
                     activations=activations, base_kept=base_params * base_bytes,
                     build_peak=(base_params + params) * base_bytes)


def plan_memory(config, gpus: int, *, trust_remote_code: bool = False) -> list[ArmMemory]:
    """The memory of the deepest DUS arm, the MoE arm and each operator of every base of ``config``.

    Each variant is built by the package's own surgery on a meta-device base (no weights)."""
    from ablate.moe import moe_config
    from ablate.params import count_params
    from ablate.plan import parse_plan
    from ablate.upscale import apply_plan, depth_upscale

    if gpus < 1:
        raise UserError(f"--gpus {gpus}: give the number of GPUs one trial is sharded over (1 or more)")
    train, seq_len = config.train, config.data.seq_len
    out = []
    for b in config.bases:
        dense = base_config(b.model, trust_remote_code=trust_remote_code)
        base = _meta_model(dense)
        n, base_bytes = dense.num_hidden_layers, _dtype_bytes(dense)
        base_params = count_params(base)["total"]
        variants: list = []
        if config.methods.dus:
            m = min(b.m) if b.m else 0
            variants.append((f"DUS m={m}", depth_upscale(base, m)))
        if config.methods.moe is not None and b.moe:
            moe = config.methods.moe
            variants.append((f"MoE {moe.experts}x top-{moe.top_k}", _meta_model(moe_config(dense, moe.experts,
                                                                                              moe.top_k))))
        for text in config.methods.operators:
            if parse_plan(text).needs(n):  # layers chosen by measuring the base's weights: not on the meta device
                continue
            variants.append((text, apply_plan(base, text)))
        out += [_arm(b.name, name, model, base_params, base_bytes, gpus=gpus, micro_batch=train.micro_batch_size,
                     seq_len=seq_len) for name, model in variants]
    return out


def _gb(x: float) -> str:
    return f"{x / GB:.1f}" if x >= 0.1 * GB else f"{x / GB:.2g}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def table(rows: list[ArmMemory], gpus: int, gpu_gb: float) -> str:
    """A Markdown table of ``rows`` in GB (10^9 bytes)."""
    lines = [f"| base | arm | layers | params | ddp per GPU | fsdp per GPU ({gpus} GPUs): states + gathered + "
             "activations* + base | fsdp total | build peak | fits "
             f"{gpu_gb:g} GB (fsdp, after the build) |",
             "|---|---|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        fits = "yes" if r.fsdp_total <= gpu_gb * GB else "no"
        if fits == "yes" and r.build_peak > gpu_gb * GB:
            fits = "yes, but not its build"
        lines.append(f"| {r.base} | {r.arm} | {r.layers} | {_count(r.params)} | {_gb(r.ddp_total)} | "
                     f"{_gb(r.states_fsdp)} + {_gb(r.gathered)} + {_gb(r.activations)} + {_gb(r.base_kept)} | "
                     f"{_gb(r.fsdp_total)} | {_gb(r.build_peak)} | {fits} |")
    lines.append("\n*activations: an estimate for one micro-batch (train.micro_batch_size rows of data.seq_len "
                 "tokens), bf16, fused attention, no activation checkpointing.")
    return "\n".join(lines)


@cli
def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    from ablate.config import load_study_config

    parser = argparse.ArgumentParser(prog=prog or "python -m ablate.memory",
                                     description="Memory per GPU of a study's largest arms, computed from its config.")
    parser.add_argument("config", help="study YAML, e.g. studies/solar.yaml")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs one trial is sharded over (default 8)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU, for the 'fits' column "
                        "(default 80)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a config value, e.g. --set train.micro_batch_size=2")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow hub models' own config code")
    args = parser.parse_args(argv)
    config = load_study_config(args.config, args.overrides)
    rows = plan_memory(config, args.gpus, trust_remote_code=args.trust_remote_code)
    print(f"study {config.name}: {args.gpus} GPUs per trial, micro-batch {config.train.micro_batch_size} x "
          f"{config.data.seq_len} tokens; GB = 10^9 bytes")
    print(table(rows, args.gpus, args.gpu_memory))
    return 0


if __name__ == "__main__":
    main()
