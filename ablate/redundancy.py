"""Layer redundancy of a base model: how much each decoder layer turns its input.

For decoder layer ``l`` the angular distance between its input ``h_in`` and output
``h_out`` hidden states, ``arccos(cos(h_in, h_out)) / pi``, averaged over every token of
a set of held-out rows: 0 means the layer passes the residual stream on unchanged, 1
means it reverses it. This is Gromov et al. 2024 ("The Unreasonable Ineffectiveness of
the Deeper Layers") with a block of one layer, averaged over tokens as ShortGPT's block
influence ``1 - cos`` is. Layers near 0 are the ones DUS can duplicate or drop cheaply.

Hidden states are taken with forward hooks on the decoder layers, not from
``output_hidden_states``: in transformers the last entry of that tuple comes after the
final norm, so it is not the last layer's output.

:func:`measure` computes what a layer plan that chooses layers by redundancy needs
(:mod:`ablate.plan`: ``similar(m)``, ``prune(k, by=angular | influence)``): these per-layer
distances, ShortGPT's block influence, and Gromov et al.'s distance between the hidden states
``k`` layers apart at each row's final token, all in one pass.

:func:`study_redundancy` computes it for every base model of a study and caches it in
``<study folder>/redundancy.json``; nothing here trains.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ablate import base as bases
from ablate.data import DataSource, load_packed
from ablate.errors import UserError
from ablate.fsutil import atomic_write_json
from ablate.plan import layer_plan
from ablate.torchutil import evaluating

__all__ = ["angular_distances", "measure", "dus_layers", "study_redundancy", "CACHE_NAME"]

CACHE_NAME = "redundancy.json"
CACHE_VERSION = 1  # bump when the measure changes: older caches are then recomputed


def _decoder_layers(model):
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(layers, "__len__") or len(layers) == 0:
        raise UserError(f"{type(model).__name__} has no model.model.layers list of decoder layers; "
                        "layer redundancy needs a Llama/Mistral/Qwen2-style causal LM")
    return layers


def _angle(a, b):
    """Angle between rows of ``a`` and ``b`` over pi, by Kahan's formula.

    ``2 atan2(|u - v|, |u + v|)`` for the unit vectors u, v is exact for equal vectors
    (an identity layer gives 0, where ``arccos`` of a rounded cosine gives ~1e-4) and
    stays accurate near 0 and pi.
    """
    import torch

    u = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    v = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    return 2 * torch.atan2((u - v).norm(dim=-1), (u + v).norm(dim=-1)) / torch.pi


def angular_distances(model, rows, *, batch_size: int = 8) -> np.ndarray:
    """Mean angular distance between the input and output of each decoder layer, shape ``[n]``.

    ``rows`` are token ids, ``[rows, seq_len]`` (numpy or torch); every token of every row
    counts once. Runs on the model's device in the model's dtype; the angles are taken in
    float64.
    """
    return np.asarray(measure(model, rows, [("angular", 1)], batch_size=batch_size)[("angular", 1)])


def measure(model, rows, needs, *, batch_size: int = 8) -> dict[tuple[str, int], list[float]]:
    """The measurements a layer plan needs (:meth:`ablate.plan.Operator.needs`), in one pass over ``rows``.

    ``needs`` holds ``(kind, k)`` pairs: ``("angular", 1)``, each layer's mean angular distance over every
    token; ``("influence", 1)``, ShortGPT's block influence ``1 - cos(x_l, x_(l+1))`` over every token;
    ``("gromov", k)``, Gromov et al.'s ``d(x^l, x^(l+k))`` for ``l = 0 .. n-k`` at each row's final token (the
    token their formula uses), averaged over rows, where ``x^l`` enters layer ``l`` and ``x^n`` leaves the
    last layer (before the final norm). Only the final token's states are kept across layers, so memory
    stays one batch's activations whatever ``k``.
    """
    import torch

    layers = _decoder_layers(model)
    n = len(layers)
    needs = list(dict.fromkeys((str(kind), int(k)) for kind, k in needs))
    unknown = [need for need in needs if need[0] not in ("angular", "influence", "gromov")
               or (need[0] != "gromov" and need[1] != 1) or not 1 <= need[1] <= n]
    if unknown:
        raise UserError(f"cannot measure {unknown[0]} on {n} layers; measurements are ('angular', 1), "
                        "('influence', 1) and ('gromov', k) with 1 <= k <= n")
    ids_all = torch.from_numpy(np.array(rows, dtype=np.int64))  # a copy: cached rows are read-only memmaps
    if ids_all.ndim != 2 or ids_all.shape[0] == 0 or ids_all.shape[1] == 0:
        raise UserError(f"layer redundancy needs token rows [rows, seq_len]; got shape {tuple(ids_all.shape)}")
    device = next(model.parameters()).device
    per_layer = {kind: torch.zeros(n, dtype=torch.float64) for kind in ("angular", "influence")}
    blocks = {k: torch.zeros(n - k + 1, dtype=torch.float64) for kind, k in needs if kind == "gromov"}
    inputs: dict[int, torch.Tensor] = {}
    last: dict[int, torch.Tensor] = {}  # x^l at each row's final token, l = 0 .. n

    def pre_hook(index):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            inputs[index] = h
            if blocks:
                last[index] = h[:, -1].double()
        return hook

    def post_hook(index):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            h_in, h_out = inputs.pop(index).double(), out.double()
            if ("angular", 1) in needs:
                per_layer["angular"][index] += _angle(h_in, h_out).sum().cpu()
            if ("influence", 1) in needs:
                per_layer["influence"][index] += (1 - _cosine(h_in, h_out)).sum().cpu()
            if blocks and index == n - 1:
                last[n] = h_out[:, -1]
        return hook

    handles = []
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(post_hook(i), with_kwargs=True))
        with evaluating(model):
            for start in range(0, ids_all.shape[0], batch_size):
                model(input_ids=ids_all[start:start + batch_size].to(device), use_cache=False)
                for k, sums in blocks.items():
                    for l in range(n - k + 1):  # noqa: E741 (Gromov et al.'s l)
                        sums[l] += _angle(last[l], last[l + k]).sum().cpu()
                last.clear()
    finally:
        for h in handles:
            h.remove()
    tokens, count = ids_all.numel(), ids_all.shape[0]
    out: dict[tuple[str, int], list[float]] = {}
    for kind, k in needs:
        values = blocks[k] / count if kind == "gromov" else per_layer[kind] / tokens
        out[(kind, k)] = [float(v) for v in values]
    return out


def _cosine(a, b):
    """Cosine similarity between rows of ``a`` and ``b`` (0 where either is zero)."""
    u = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    v = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    return (u * v).sum(dim=-1)


def dus_layers(n: int, m: int) -> tuple[list[int], list[int]]:
    """``(duplicated, dropped)`` base layers of DUS(n, m): used twice, and not at all."""
    uses = Counter(layer_plan(n, m))
    return [i for i in range(n) if uses[i] == 2], [i for i in range(n) if uses[i] == 0]


def _default_loader(config: dict, device: str) -> Callable[[str], tuple[object, np.ndarray]]:
    """``spec -> (model, held-out rows)`` as the study loads its bases, and the study's packed data.

    Never with the model's own code, whatever the study recorded: opening a study folder someone
    shared must not run code. A base that needs its own code is a one-line error here, which the
    figures command turns into a note on the redundancy figure.
    """

    def load(spec: str):
        model, tokenizer = bases.load(spec, trust_remote_code=False, progress=False)
        model = model.to(device)
        d = config["data"]
        data = load_packed(DataSource.model_validate(d["source"]), tokenizer, seq_len=d["seq_len"],
                           train_tokens=config["train"]["tokens"], val_tokens=d["val_tokens"], seed=d["seed"],
                           progress=False)
        return model, data.val

    return load


def _base_label(base: dict) -> str:
    return base.get("label") or Path(base["model"].rstrip("/")).name


def study_redundancy(config: dict, study_dir: str | Path, *, rows: int = 32, device: str = "cpu",
                     load: Callable[[str], tuple[object, np.ndarray]] | None = None) -> dict[str, list[float]]:
    """Angular distances of every base model of a study (``study.json``'s resolved config).

    Uses the first ``rows`` held-out rows of the study's data (the same for every base with
    one tokenizer). Results are cached in ``<study_dir>/redundancy.json`` keyed by the
    model spec, the data settings and ``rows``; only missing or stale bases are computed.
    ``load(spec) -> (model, token rows)`` replaces the zoo and the data pipeline (tests).
    """
    study_dir = Path(study_dir)
    cache_path = study_dir / CACHE_NAME
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    if cache.get("version") != CACHE_VERSION:
        cache = {"version": CACHE_VERSION, "bases": {}}
    load = load or _default_loader(config, device)
    out, changed = {}, False
    for base in config["bases"]:
        label = _base_label(base)
        key = {"model": base["model"], "data": config["data"], "train_tokens": config["train"]["tokens"],
               "rows": rows}
        entry = cache["bases"].get(label)
        if entry is None or entry.get("key") != key:
            model, val = load(base["model"])
            if len(val) == 0:
                raise UserError(f"base {label}: the study's data has no held-out rows; set data.val_tokens > 0")
            distances = angular_distances(model, np.asarray(val[:rows]))
            del model
            entry = {"key": key, "distances": [round(float(x), 8) for x in distances]}
            cache["bases"][label] = entry
            changed = True
        out[label] = entry["distances"]
    if changed:
        atomic_write_json(cache_path, cache)
    return out
