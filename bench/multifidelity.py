"""How much CPT compute multi-fidelity search needs to name the full sweep's best configuration.

    python bench/multifidelity.py                          # llama-4l, about 10 minutes on 2 cores
    python bench/multifidelity.py --pruner hyperband --out /tmp/mf

Runs one study twice on the same configurations (issue 13 item 7): once as a full sweep (every
configuration trained to the top budget, pruner none) and once with Optuna's successive halving
(or Hyperband) on the budget points as rungs, behind the min_fraction guard. It prints, per base,
the best configuration at the top budget in each run and the CPT tokens each run trained (main
runs and cooldown branches, pruned trials included; the no-CPT references train nothing). Goal
of the issue: the multi-fidelity run names the same best configuration per base with at most 50%
of the full sweep's CPT compute. Both studies use the sweep sampler, so the trial order is the
same; another order can prune differently. Compute is counted in tokens, which on one base and
equal widths is proportional to FLOPs within a method (the MoE arm's FLOPs per token are higher;
both are printed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from ablate.config import load_study_config
from ablate.results import load_budgets, read_records
from ablate.study import run_study

STUDY = [
    "name=mf-full",
    "bases=[{model: llama-4l}]",
    "methods.moe={experts: 4, top_k: 2}",
    "train.schedule=wsd",
    "train.budgets=[4096,16384,65536]",
    "train.warmup_tokens=2048",
    "train.lr=[1.0e-3,3.0e-3]",
    "train.eval_every=16",
    "repeats=1",
    "eval.subset=50",
]


def compute(study_dir: Path) -> tuple[int, float]:
    """CPT tokens and FLOPs trained by every trial of a study (main runs and branches)."""
    tokens = flops = 0
    for record in read_records(study_dir).values():
        trained = (record.get("tokens") or 0) + (record.get("branch_tokens") or 0)
        tokens += trained
        flops += trained * (record.get("flops_per_token") or 0)
    return tokens, flops


def best(frame: pd.DataFrame, top: int) -> dict:
    """Per base: the configuration with the best objective at the top budget point (lower is better)."""
    done = frame[(frame.budget == top) & (frame.method != "nocpt")]
    out = {}
    for base, rows in done.groupby("base"):
        row = rows.loc[rows.objective.idxmin()]
        out[base] = (row.method, None if pd.isna(row.m) else int(row.m), float(row.lr), round(float(row.objective), 5))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs-mf", help="output folder (default runs-mf/)")
    parser.add_argument("--pruner", default="successive_halving", choices=["successive_halving", "hyperband"])
    args = parser.parse_args()
    out = Path(args.out)
    full_cfg = load_study_config(None, [*STUDY, "pruner={kind: none}"])
    total = 1 + (3 + 1) * 2  # the no-CPT reference, then (3 m values + MoE) x 2 learning rates
    run_study(full_cfg, trials=total, out=out, progress=False)
    mf_cfg = load_study_config(None, [*STUDY, "name=mf-pruned",
                                      f"pruner={{kind: {args.pruner}, reduction_factor: 4, min_fraction: 0.25}}"])
    run_study(mf_cfg, trials=total, out=out, progress=False)
    top = full_cfg.train.tokens
    full, pruned = load_budgets(out / "mf-full"), load_budgets(out / "mf-pruned")
    (ft, ff), (pt, pf) = compute(out / "mf-full"), compute(out / "mf-pruned")
    reached = pruned[(pruned.budget == top) & (pruned.method != "nocpt")]
    result = {"best_full": best(full, top), "best_pruned": best(pruned, top),
              "tokens_full": ft, "tokens_pruned": pt, "token_ratio": round(pt / ft, 4),
              "flops_ratio": round(pf / ff, 4), "reached_top": int(len(reached)),
              "configurations": int((full.method != "nocpt").sum() // len(full_cfg.train.budget_points))}
    same = result["best_full"].keys() == result["best_pruned"].keys() and all(
        result["best_full"][b][:3] == result["best_pruned"][b][:3] for b in result["best_full"])
    result["same_best"] = same
    print(f"{result['configurations']} configurations, budgets {full_cfg.train.budget_points}, pruner {args.pruner}")
    print(f"full sweep: {ft:,} CPT tokens; multi-fidelity: {pt:,} ({pt / ft:.1%}; FLOPs {pf / ff:.1%}); "
          f"{len(reached)} configurations reached the top budget")
    print(f"best per base, full: {result['best_full']}; multi-fidelity: {result['best_pruned']}; "
          f"same: {same}; goal: same best with at most 50% of the compute: "
          f"{'met' if same and pt / ft <= 0.5 else 'NOT met'}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
