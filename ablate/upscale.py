"""Grown and pruned variants of a Hugging Face causal LM from a layer plan, in memory or as an export.

In memory::

    from ablate.upscale import apply_plan, depth_upscale
    variant = apply_plan(model, "llama_pro(8)")  # 32 layers -> 40, 8 of them zero-output copies
    variant = depth_upscale(model, m=8)          # SOLAR's DUS: apply_plan(model, "solar(8)"), 32 -> 48

On disk, streaming tensors from the safetensors shards (peak memory stays far below
the checkpoint's size), with a mergekit ``passthrough`` YAML that rebuilds the same
stack::

    python -m ablate.upscale path/to/checkpoint --plan 'llama_pro(8)' --out grown/
    python -m ablate.upscale path/to/checkpoint --m 8 --out solar-like/     # --m M means solar(M)

The plans themselves (families, their sources, their spelling) are :mod:`ablate.plan`, pure Python.
"""

from __future__ import annotations

import copy
import re

from ablate import export
from ablate.errors import UserError, cli
from ablate.exportcli import export_parser, run_export
from ablate.plan import Operator, Plan, PlanError, layer_plan, parse_plan, resolve_plan, solar

__all__ = ["layer_plan", "apply_plan", "depth_upscale", "upscaled_config", "export_plan", "export_upscaled", "main"]

# Config fields that hold one entry per decoder layer and so follow the layer plan.
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")

# Top-level config lists that are never per-layer, even when their length happens to equal n.
NOT_PER_LAYER_KEYS = frozenset({"architectures", "bos_token_id", "eos_token_id", "pad_token_id"})

# Submodules of a decoder layer whose output a zero-output copy zeroes (weight and bias): with both zero the
# block adds nothing to the residual stream, as LLaMA Pro initialises its new blocks. Tensor names of these
# modules contain the last part (``o_proj``, ``down_proj``), which is also how mergekit's ``filter`` finds them.
ZERO_OUTPUT = ("self_attn.o_proj", "mlp.down_proj")

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
    """Return a new causal LM with ``s = 2 (n - m)`` decoder layers stacked by SOLAR's recipe:
    ``apply_plan(model, solar(m))``."""
    return apply_plan(model, solar(m))


def apply_plan(model, plan, *, measured=None):
    """Return a new causal LM whose decoder layers follow ``plan`` (its spelling, an Operator or a Plan).

    Each new layer is an independent copy (training one never changes another), on the
    input's device and dtype (the ``meta`` device included); the input is left untouched.
    The config's layer count and per-layer lists, and every attention's ``layer_idx``
    (which indexes the KV cache), describe the new stack, so the result behaves like a
    model built with that many layers. Tied embeddings stay tied. A zero-output layer starts
    with its attention output and MLP down projections zero. ``measured`` holds what a plan that
    chooses layers by redundancy needs (``ablate.redundancy.measure``).
    """
    n = model.config.num_hidden_layers
    plan = resolve_plan(plan, n, measured)
    inner, layers = _decoder_layers(model)
    if len(layers) != n:
        raise UserError(f"model has {len(layers)} decoder layers but config.num_hidden_layers={n}")
    config = upscaled_config(model.config, list(plan.sources))

    # Copy everything but the layers once (embeddings, final norm, head, rotary), then
    # each planned layer; deepcopy keeps tied embeddings tied within the copy.
    inner.layers = type(layers)()
    try:
        new = copy.deepcopy(model)
    finally:
        inner.layers = layers
    new_layers = type(layers)(copy.deepcopy(layers[i]) for i in plan.sources)
    for j, layer in enumerate(new_layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = j
        if plan.zero[j]:
            _zero_output(layer, j)
    new.model.layers = new_layers
    _set_config(new, config)
    if hasattr(new.model, "has_sliding_layers") and config.layer_types is not None:
        new.model.has_sliding_layers = "sliding_attention" in config.layer_types
    return new


def _zero_output(layer, j: int) -> None:
    """Zero the projections that write a layer's output into the residual stream."""
    import torch

    for path in ZERO_OUTPUT:
        try:
            module = layer.get_submodule(path)
        except AttributeError:
            raise UserError(f"layer {j} is a zero-output copy, which zeroes {path}, but {type(layer).__name__} has "
                            f"no {path}; zero-output plans support {', '.join(TESTED_FAMILIES)}-style layers") from None
        with torch.no_grad():
            for p in module.parameters(recurse=False):
                p.zero_()


def _set_config(model, config) -> None:
    """Point every submodule that held the old config at the new one."""
    old = model.config
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = config


LAYER_KEY = re.compile(r"^(model\.layers\.)(\d+)(\..+)$")


def export_upscaled(src: str, m: int, out: str, *, force: bool = False, max_shard_size: str = "2GB",
                    progress: bool = True) -> dict:
    """Write DUS(src, m) as a complete HF checkpoint in ``out`` by streaming tensors: ``export_plan`` of
    ``solar(m)``. Returns the provenance record also written to ``out/ablate.json``."""
    return export_plan(src, solar(m), out, force=force, max_shard_size=max_shard_size, progress=progress)


def export_plan(src: str, plan, out: str, *, force: bool = False, max_shard_size: str = "2GB",
                progress: bool = True) -> dict:
    """Write the variant of ``src`` that ``plan`` describes as a complete HF checkpoint in ``out``, streaming
    tensors (a zero-output layer's projections are written as zeros, never held in memory).

    Returns the provenance record also written to ``out/ablate.json``. A plan that chooses layers by
    measured redundancy needs the model run on text, which an export never does: build it in memory
    (:func:`apply_plan`) instead.
    """
    op = plan if isinstance(plan, Plan) else parse_plan(plan)
    source = export.resolve_source(src)
    config = export.load_config(source)
    n = config.num_hidden_layers
    if not isinstance(op, Plan) and op.needs(n):
        raise UserError(f"{op} chooses layers by measured redundancy, which needs the model run on held-out text; "
                        "an export only copies tensors: build it with ablate.upscale.apply_plan(model, plan, "
                        "measured=ablate.redundancy.measure(...)) and save_pretrained, or choose another plan")
    try:
        plan = resolve_plan(op, n)
    except PlanError as exc:
        raise UserError(f"{exc} ({src} has {n} layers)") from None
    new_config = upscaled_config(config, list(plan.sources))

    by_base: dict[int, list[int]] = {}
    for j, i in enumerate(plan.sources):
        by_base.setdefault(i, []).append(j)
    zero = set(plan.zero_layers)

    def rename(name: str) -> list[str]:
        match = LAYER_KEY.match(name)
        if match is None:
            return [name]
        prefix, i, rest = match.groups()
        return [f"{prefix}{j}{rest}" for j in by_base.get(int(i), [])]

    def zeroed(name: str) -> bool:
        match = LAYER_KEY.match(name)
        return match is not None and int(match.group(2)) in zero and \
            any(match.group(3).startswith(f".{path}.") for path in ZERO_OUTPUT)

    if zero:
        rests = {match.group(3) for name in source.tensors if (match := LAYER_KEY.match(name))}
        lacking = [path for path in ZERO_OUTPUT if not any(rest.startswith(f".{path}.") for rest in rests)]
        if lacking:
            raise UserError(f"{plan.name or 'the plan'} has zero-output layers, which zero {lacking[0]}, but {src} has "
                            f"no model.layers.N.{lacking[0]} tensors; zero-output plans support "
                            f"{', '.join(TESTED_FAMILIES)}-style layers")

    yaml_text = export.mergekit_plan_yaml(src, plan, config)
    solar_m = op.args[0] if isinstance(op, Operator) and op.family == "solar" else None
    record = {"method": "plan" if solar_m is None else "dus", "source": src, **plan.to_dict()}
    if solar_m is not None:
        record["m"] = solar_m
    export.write_checkpoint(
        source, out, new_config, export.renamed_tensors(source, rename, zeroed=zeroed),
        extra_files={"mergekit.yaml": yaml_text}, record=record, force=force,
        max_shard_size=max_shard_size, progress=progress,
    )
    return record


@cli
def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    def options(p):
        p.add_argument("--plan", help="the layer plan, e.g. 'llama_pro(8)', 'stack(2)', 'mid(10, 6, 2)', "
                                      "'prune(4, by=last)' (see ablate.plan)")
        p.add_argument("--m", type=int,
                       help="layers removed from each copy (0 <= m < n): the same as --plan 'solar(M)'")

    parser = export_parser(
        prog or "python -m ablate.upscale",
        description="Write a grown or pruned copy of a checkpoint from a layer plan (SOLAR's DUS with --m), "
                    "streaming its tensors.",
        example="./mistral-7b --plan 'llama_pro(8)' --out ./mistral-pro",
        options=options,
    )

    def plan_of(a) -> str:
        if (a.plan is None) == (a.m is None):
            raise UserError("give the layers with --plan SPEC (e.g. --plan 'llama_pro(8)') or --m M "
                            "(SOLAR's DUS, solar(M)), " + ("not both" if a.plan is not None else "one of them"))
        return a.plan if a.plan is not None else f"solar({a.m})"

    return run_export(
        parser, argv,
        export=lambda a: export_plan(a.src, plan_of(a), a.out, force=a.force, max_shard_size=a.max_shard_size),
        report=lambda a, record: f"{record['n']} -> {record['s']} layers ({record['operator']})",
    )


if __name__ == "__main__":
    main()
