"""Model cards of kept variants: a Hugging Face ``README.md`` written from a study's records.

:func:`model_card` turns what :mod:`ablate.keep` recorded about a kept variant (its ``keep.json``:
the trial, the arm, the budget point and its scores, the package version and commit) and the
study's paired comparison with the control (:func:`comparison`, from
:func:`ablate.stats.paired_gaps`) into a model card: YAML front matter built with
``huggingface_hub.ModelCardData`` (``base_model``, ``library_name: transformers``, ``tags``,
``datasets`` where the CPT data is a hub dataset), then the base, the operator and its layer plan
with the mergekit YAML that rebuilds the untrained variant, the CPT budget in tokens and FLOPs, the
scores with intervals against the base control, and where it came from.
"""

from __future__ import annotations

import math

__all__ = ["model_card", "comparison", "card_tags", "rebuild_recipe", "hub_datasets"]


def card_tags(method: str) -> list[str]:
    """The card's tags: the package, the kind of growth, continued pretraining."""
    kind = {"dus": "depth-up-scaling", "moe": "moe-upcycling"}.get(method, "layer-plan")
    return ["ablate", kind, "continued-pretraining"]


def rebuild_recipe(arm, src: str, n: int, base_config, plan=None, moe=None) -> tuple[str, str]:
    """``(file name, text)`` of the mergekit recipe that rebuilds ``arm``'s untrained variant from ``src``.

    DUS and every layer plan are a ``passthrough`` of slices (``mergekit-yaml``); the MoE upcycle is a
    ``mergekit-moe`` recipe (its random router is drawn differently from ablate's; the card says so).
    """
    from ablate.export import mergekit_passthrough_yaml, mergekit_plan_yaml
    from ablate.moe import mergekit_moe_yaml

    if arm.method == "dus":
        return "mergekit.yaml", mergekit_passthrough_yaml(src, n, arm.m, base_config)
    if arm.method == "moe":
        return "mergekit-moe.yaml", mergekit_moe_yaml(src, moe.experts, moe.top_k, base_config)
    return "mergekit.yaml", mergekit_plan_yaml(src, plan, base_config)


def comparison(frame, info: dict, direction: str, gaps=None) -> dict:
    """The kept arm against the base control (DUS at m = n/2, same CPT) at the kept budget point.

    Returns ``{"role": "control"|"arm"|"none", ...}``: for an arm, the row of
    :func:`ablate.stats.paired_gaps` (mean paired difference, its 95% interval, pairs, verdict);
    for the control itself, its mean over repeats. ``frame`` is the study's budget table
    (:func:`ablate.results.load_budgets` or the same rows); ``gaps``, its paired gaps when already computed.
    """
    from ablate.stats import paired_gaps

    arm, budget = info["arm"], info["cpt"]["budget"]
    n = info.get("n")
    if arm["method"] == "dus" and n is not None and n % 2 == 0 and arm["m"] == n // 2:
        rows = frame[(frame["base"] == arm["base"]) & (frame["method"] == "dus") & (frame["m"] == n // 2)
                     & (frame["budget"] == budget) & frame["state"].isin(["complete", "pruned"])]
        values = rows["objective"].dropna()
        return {"role": "control", "mean": float(values.mean()) if len(values) else None, "trials": len(values)}
    if gaps is None:
        gaps = paired_gaps(frame, "objective", direction) if len(frame) else None
    if gaps is None or not len(gaps):
        return {"role": "none"}
    m = arm.get("m")
    same = (gaps["base"] == arm["base"]) & (gaps["method"] == arm["method"]) & (gaps["budget"] == budget)
    same &= (gaps["m"] == m) if m is not None else gaps["m"].isna()
    if not same.any():
        return {"role": "none"}
    row = gaps[same].iloc[0]
    return {"role": "arm", **{k: _plain(row[k]) for k in ("pairs", "arm_mean", "control_mean", "arm_minus_control",
                                                           "lo", "hi", "verdict", "lr", "control_lr")}}


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _num(x, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.3e}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _vs_control(comp: dict, objective: str, direction: str) -> str:
    better = "lower" if direction == "minimize" else "higher"
    if comp["role"] == "control":
        return (f"This is the **control** itself (DUS at m = n/2: the unchanged base with the same CPT); its "
                f"{objective} over {comp['trials']} finished trial(s) averages {_num(comp['mean'])}.")
    if comp["role"] == "none":
        return ("No paired comparison with the control yet: the control (DUS at m = n/2, same CPT) has no finished "
                "trial at this budget point, or the base has an odd number of layers.")
    interval = ("no interval (one pair; raise repeats)" if comp["lo"] is None
                else f"95% interval [{comp['lo']:+.4f}, {comp['hi']:+.4f}]")
    return (f"Arm minus control in {objective} ({better} is better), paired by repeat over {comp['pairs']} pair(s), "
            f"each at its chosen lr: **{_num(comp['arm_minus_control'], 4)}**, {interval}; arm mean "
            f"{_num(comp['arm_mean'])}, control mean {_num(comp['control_mean'])}; verdict: {comp['verdict']}.")


def model_card(info: dict, comp: dict | None = None) -> str:
    """The ``README.md`` of a kept variant: front matter plus a body, from ``keep.json``'s ``info``."""
    from huggingface_hub import ModelCard, ModelCardData

    arm, cpt, env = info["arm"], info["cpt"], info.get("env") or {}
    comp = comp or {"role": "none"}
    data = ModelCardData(base_model=info["base_model"], library_name="transformers", tags=card_tags(arm["method"]),
                         datasets=info.get("datasets") or None, pipeline_tag="text-generation",
                         model_name=info["title"])
    what = {"dus": f"Depth Up-Scaling (SOLAR's DUS) with m = {arm.get('m')}",
            "moe": f"Mixtral-style MoE upcycle ({info.get('experts')} experts, top-{info.get('top_k')})"}
    operator = what.get(arm["method"], f"layer plan `{arm['method']}`")
    unit = cpt.get("budget_unit", "tokens")
    metrics = "\n".join(f"| {k} | {_num(v)} |" for k, v in sorted((info.get("metrics") or {}).items())
                        if isinstance(v, (int, float)))
    plan = info.get("plan")
    plan_line = f"Layer map (base layer of each result layer): `{plan}`" if plan else ""
    recipe_file, recipe = info["recipe"]["file"], info["recipe"]["text"]
    rebuild = "mergekit-moe" if recipe_file == "mergekit-moe.yaml" else "mergekit-yaml"
    version = (env.get("versions") or {}).get("ablate")
    body = f"""
# {info['title']}

{info['why']} Study `{info['study']}`, trial {info['trial']} (repeat {arm.get('repeat')}), kept by `ablate study
--keep {info['keep']}`.

## Base
- model: `{info['base_model']}` ({info['base_kind']}: {info['base_location']}), n = {info.get('n')} layers

## Operator and plan
- {operator}: s = {info.get('s')} layers, {_num(info.get('params_total'))} parameters
  ({_num(info.get('params_active'))} active per token)
{plan_line}

The untrained variant is rebuilt by `{rebuild} {recipe_file} OUT` (the file sits beside this card):

```yaml
{recipe.rstrip()}
```

## Continued pretraining
- budget point: {_num(cpt['budget'])} {unit}; trained {_num(cpt['tokens'])} tokens, {_num(cpt['flops'])} FLOPs
  ({_num(info.get('flops_per_token'))} per token), {_num(cpt.get('steps'))} optimizer steps
- peak lr {cpt.get('lr')}, schedule {cpt.get('schedule')}, seed {cpt.get('seed')}, data order seed
  {cpt.get('data_order_seed')}, trainable: {cpt.get('trainable')}
- data: {info.get('data')}

## Scores at this budget point
Objective ({info['objective_name']}, {'lower' if info['direction'] == 'minimize' else 'higher'} is better):
**{_num(info['objective'])}**.

{_vs_control(comp, info['objective_name'], info['direction'])}

| metric | value |
|---|---|
{metrics}

## Provenance
- ablate {version}, commit {env.get('git_commit')}; torch {(env.get('versions') or {}).get('torch')},
  transformers {(env.get('versions') or {}).get('transformers')}; device {env.get('device')}
- kept {info.get('saved')}; the trial's full record: `trials/{info['trial']}/` in the study folder

## Use
```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/FOLDER")
tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")
```
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def hub_datasets(source) -> list[str]:
    """The hub dataset ids of a CPT data source (``datasets:`` of the card), none for local or synthetic text."""
    return [source.name] if getattr(source, "kind", None) == "hub" and source.name else []
