"""Depth up-scaling (SOLAR's DUS) of a Hugging Face causal LM, in memory or as an export.

In memory::

    from ablate.upscale import depth_upscale
    variant = depth_upscale(model, m=8)        # 32 layers -> 48, the input untouched

On disk, streaming tensors from the safetensors shards (peak memory stays far below
the checkpoint's size), with a mergekit ``passthrough`` YAML that rebuilds the same
stack::

    python -m ablate.upscale path/to/checkpoint --m 8 --out solar-like/

The layer plan itself is :func:`ablate.plan.layer_plan` (pure Python).
"""

from __future__ import annotations

import copy
import re

from ablate import export
from ablate.errors import UserError, cli
from ablate.exportcli import export_parser, run_export
from ablate.plan import layer_plan

__all__ = ["layer_plan", "depth_upscale", "upscaled_config", "export_upscaled", "main"]

# Config fields that hold one entry per decoder layer and so follow the layer plan.
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")

# Top-level config lists that are never per-layer, even when their length happens to equal n.
NOT_PER_LAYER_KEYS = frozenset({"architectures", "bos_token_id", "eos_token_id", "pad_token_id"})

# Families whose decoder layers are checked to rebuild exactly (tests cover them);
# other ``model.model.layers`` families are attempted and checked for per-layer state.
TESTED_FAMILIES = ("llama", "mistral", "qwen2")


def _decoder_layers(model):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(layers, "__len__"):
        raise UserError(
            f"{type(model).__name__} has no model.model.layers list of decoder layers; "
            f"depth up-scaling supports decoder-only causal LMs such as {', '.join(TESTED_FAMILIES)}"
        )
    return inner, layers


def upscaled_config(config, plan: list[int]):
    """A copy of ``config`` describing the stack ``plan`` (base-layer index per new layer).

    Updates ``num_hidden_layers`` and remaps every per-layer list (``layer_types``,
    ``no_rope_layers``). A list of the old depth under another name is refused rather
    than silently left wrong.
    """
    n = config.num_hidden_layers
    new = copy.deepcopy(config)
    new.num_hidden_layers = len(plan)
    for key, value in config.to_dict().items():
        if not isinstance(value, (list, tuple)) or len(value) != n:
            continue
        if key in PER_LAYER_KEYS or key in NOT_PER_LAYER_KEYS:
            continue
        raise UserError(
            f"config field {key!r} has one entry per layer and ablate does not know how to remap it; "
            f"supported per-layer fields: {', '.join(PER_LAYER_KEYS)}"
        )
    for key in PER_LAYER_KEYS:
        value = getattr(config, key, None)
        if value is not None:
            setattr(new, key, [value[i] for i in plan])
    return new


def depth_upscale(model, m: int):
    """Return a new causal LM with ``s = 2 (n - m)`` decoder layers stacked by SOLAR's recipe.

    Each new layer is an independent copy (training one never changes another), on the
    input's device and dtype (the ``meta`` device included); the input is left untouched.
    The config's layer count and per-layer lists, and every attention's ``layer_idx``
    (which indexes the KV cache), describe the new stack, so the result behaves like a
    model built with that many layers. Tied embeddings stay tied.
    """
    n = model.config.num_hidden_layers
    try:
        plan = layer_plan(n, m)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    inner, layers = _decoder_layers(model)
    if len(layers) != n:
        raise UserError(f"model has {len(layers)} decoder layers but config.num_hidden_layers={n}")
    config = upscaled_config(model.config, plan)

    # Copy everything but the layers once (embeddings, final norm, head, rotary), then
    # each planned layer; deepcopy keeps tied embeddings tied within the copy.
    inner.layers = type(layers)()
    try:
        new = copy.deepcopy(model)
    finally:
        inner.layers = layers
    new_layers = type(layers)(copy.deepcopy(layers[i]) for i in plan)
    for j, layer in enumerate(new_layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = j
    new.model.layers = new_layers
    _set_config(new, config)
    if hasattr(new.model, "has_sliding_layers") and config.layer_types is not None:
        new.model.has_sliding_layers = "sliding_attention" in config.layer_types
    return new


def _set_config(model, config) -> None:
    """Point every submodule that held the old config at the new one."""
    old = model.config
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = config


LAYER_KEY = re.compile(r"^(model\.layers\.)(\d+)(\..+)$")


def export_upscaled(src: str, m: int, out: str, *, force: bool = False, max_shard_size: str = "2GB",
                    progress: bool = True) -> dict:
    """Write DUS(src, m) as a complete HF checkpoint in ``out`` by streaming tensors.

    Returns the provenance record also written to ``out/ablate.json``.
    """
    source = export.resolve_source(src)
    config = export.load_config(source)
    n = config.num_hidden_layers
    try:
        plan = layer_plan(n, m)
    except ValueError as exc:
        raise UserError(f"{exc} ({src} has {n} layers)") from None
    new_config = upscaled_config(config, plan)

    by_base: dict[int, list[int]] = {}
    for j, i in enumerate(plan):
        by_base.setdefault(i, []).append(j)

    def rename(name: str) -> list[str]:
        match = LAYER_KEY.match(name)
        if match is None:
            return [name]
        prefix, i, rest = match.groups()
        return [f"{prefix}{j}{rest}" for j in by_base.get(int(i), [])]

    yaml_text = export.mergekit_passthrough_yaml(src, n, m, config)
    record = {"method": "dus", "source": src, "n": n, "m": m, "s": len(plan), "plan": plan}
    export.write_checkpoint(
        source, out, new_config, export.renamed_tensors(source, rename),
        extra_files={"mergekit.yaml": yaml_text}, record=record, force=force,
        max_shard_size=max_shard_size, progress=progress,
    )
    return record


@cli
def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    parser = export_parser(
        prog or "python -m ablate.upscale",
        description="Write a depth up-scaled copy of a checkpoint (SOLAR's DUS), streaming its tensors.",
        example="./mistral-7b --m 8 --out ./solar-like",
        options=lambda p: p.add_argument("--m", type=int, required=True,
                                         help="layers removed from each copy (0 <= m < n)"),
    )
    return run_export(
        parser, argv,
        export=lambda a: export_upscaled(a.src, a.m, a.out, force=a.force, max_shard_size=a.max_shard_size),
        report=lambda a, record: f"{record['n']} -> {record['s']} layers (m={a.m})",
    )


if __name__ == "__main__":
    main()
