"""Paired statistics over budget points: the lr choice, gaps to the control, the best m, rank stability.

Every function takes the long table of :func:`ablate.results.load_budgets` (one row per trial
and budget point) and returns a pandas DataFrame; nothing here reads files or trains. The
conventions:

- **the point** of a row is ``budget`` (the budget point in the study's unit, tokens or FLOPs, the
  same for every arm) where the table has it, else ``budget_tokens``; output tables call it
  ``budget``. The no-CPT reference (method ``nocpt``) is at point 0 and is never an arm here.
- **the lr is a nuisance parameter**: where an arm ran at several learning rates (a study's lr grid),
  :func:`best_lr` keeps, per arm and point, the lr with the lowest mean held-out loss over repeats
  (``val_loss``: never the evaluation items), and every other function compares arms at that lr.
- **pairs**: repeat r of an arm trained on the same CPT rows in the same order as repeat r of the
  control (DUS at m = n/2, the unchanged base with the same CPT), so the difference is taken within
  a repeat and the interval is Student's t over repeats (df = pairs - 1). One pair gives no interval.
- **verdicts**: "better" / "worse" (for the arm, against what it is compared with, in the study's
  direction) only where the 95% interval excludes zero; "cannot be ordered" where it covers zero;
  "one pair: no interval" with a single pair; "no pairs" when nothing could be paired.

Accuracies get the same t interval over repeats; the synthetic answer items' accuracies also get a
bootstrap over items (:func:`item_gaps`), from the per-item scores each trial records
(``items.jsonl``, :func:`ablate.results.read_items`): with a few seeds, the items are the larger
source of sampling error in an accuracy.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

__all__ = ["CONFIDENCE", "ARMS", "points", "scored", "best_lr", "trials_at_best_lr", "paired", "verdict",
           "paired_gaps", "item_gaps", "best_m_by_budget", "arm_means", "rank_correlation", "arm_label",
           "metric_direction", "is_arm", "gap_trend"]

CONFIDENCE = 0.95
ARMS = ("dus", "moe")  # the built-in arms; every layer-plan operator ("llama_pro(2)") is an arm too (is_arm)
SCORED = ("complete", "pruned")  # a pruned trial's points before it stopped were evaluated in full
ONE_PAIR = "one pair: no interval"
NO_PAIRS = "no pairs"
TIED = "cannot be ordered"


def points(frame):
    """A copy of ``frame`` with ``budget`` (the point in the study's unit, else ``budget_tokens``) as float
    and ``m`` as float (NaN for MoE and the no-CPT reference)."""
    out = frame.copy()
    tokens = out["budget_tokens"].astype(float) if "budget_tokens" in out else np.nan
    out["budget"] = out["budget"].astype(float).fillna(tokens) if "budget" in out else tokens
    out["m"] = out["m"].astype(float)
    out["lr"] = out["lr"].astype(float) if "lr" in out else np.nan
    return out


def scored(frame, column: str = "objective"):
    """Rows of :func:`points` (``frame``) that score an arm (DUS, MoE or an operator) at a budget point: finished
    trials (complete, or pruned after the point) with a base and a value in ``column``."""
    f = points(frame)
    keep = f["state"].isin(SCORED) & f["base"].notna() & is_arm(f["method"]) & f[column].notna()
    return f[keep].reset_index(drop=True)


def is_arm(methods):
    """Which rows' methods are arms compared with the control: DUS, MoE and every layer-plan operator (its
    spelling, e.g. ``llama_pro(2)``); the no-CPT reference ("nocpt") is not an arm."""
    return methods.notna() & methods.ne("nocpt")


def _mkey(f):
    return f["m"].fillna(-1.0)  # groupby drops NaN keys: MoE's m becomes -1 for grouping only


def arm_label(method: str, m) -> str:
    """``DUS m=1``, ``MoE``, or an operator's spelling (``llama_pro(2)``)."""
    if method == "dus":
        return f"DUS m={int(m)}"
    return {"moe": "MoE", "nocpt": "no CPT"}.get(method, str(method))


def metric_direction(column: str, objective_direction: str = "minimize") -> str:
    """The direction of a table column: the objective's for ``objective``, lower for a loss or perplexity,
    higher for anything else (accuracies, exact match)."""
    if column == "objective":
        return objective_direction
    name = column.split("/")[-1].split(",")[0]
    return "minimize" if name.endswith(("loss", "ppl")) else "maximize"


def best_lr(frame):
    """``(filtered frame, choices)``: per (base, method, m, budget point), the rows of the lr with the lowest
    mean held-out loss (``val_loss``) over repeats; ties go to the smaller lr.

    Only rows of an lr that lost are dropped: rows without an lr (a study with one lr, the no-CPT
    reference) and rows that are not scored stay. ``choices`` has one row per arm and point of a
    study with an lr grid: base, method, m, arm, budget, lr (the chosen), val_loss (its mean), repeats,
    lrs (how many were tried) and tried (``lr: mean loss (repeats)`` for each, as text). Applying
    :func:`best_lr` to its own output changes nothing.
    """
    import pandas as pd

    f = points(frame)
    ok = f["state"].isin(SCORED) & f["base"].notna() & is_arm(f["method"]) & f["lr"].notna() & \
        f["val_loss"].notna()
    cand = f[ok].assign(_m=lambda x: _mkey(x))
    rows, chosen = [], {}
    for (base, method, m, budget), g in cand.groupby(["base", "method", "_m", "budget"], sort=True):
        by_lr = g.groupby("lr")["val_loss"].agg(["mean", "count"]).sort_index()
        lr = float(by_lr["mean"].idxmin())  # idxmin: the first minimum, so the smaller lr on a tie
        chosen[(base, method, m, budget)] = lr
        tried = ", ".join(f"{x:g}: {r['mean']:.4f} ({int(r['count'])})" for x, r in by_lr.iterrows())
        rows.append({"base": base, "method": method, "m": math.nan if m < 0 else m,
                     "arm": arm_label(method, m), "budget": budget, "lr": lr,
                     "val_loss": float(by_lr.loc[lr, "mean"]), "repeats": int(by_lr.loc[lr, "count"]),
                     "lrs": len(by_lr), "tried": tried})
    choices = pd.DataFrame(rows, columns=["base", "method", "m", "arm", "budget", "lr", "val_loss", "repeats",
                                          "lrs", "tried"])
    if not chosen:
        return f, choices
    keys = zip(f["base"], f["method"], _mkey(f), f["budget"], strict=True)
    pick = pd.Series([chosen.get(k) for k in keys], index=f.index, dtype=float)
    keep = pick.isna() | f["lr"].isna() | np.isclose(f["lr"], pick)
    return f[keep].reset_index(drop=True), choices


def trials_at_best_lr(trials, frame):
    """The rows of ``trials`` (one per trial, :func:`ablate.results.load`) whose arm ran at the lr chosen for it at
    its base's last budget point in ``frame`` (the budget table); every row when the study has one lr. Rows
    without an lr (the no-CPT reference) and arms without a choice stay."""
    _, choices = best_lr(frame)
    if choices.empty:
        return trials
    last = choices[choices["budget"] == choices.groupby("base")["budget"].transform("max")]
    chosen = {(b, meth, -1.0 if math.isnan(m) else m): lr
              for b, meth, m, lr in zip(last["base"], last["method"], last["m"], last["lr"], strict=True)}
    m = trials["m"].astype(float).fillna(-1.0)
    pick = np.array([chosen.get(k, np.nan) for k in zip(trials["base"], trials["method"], m, strict=True)],
                    dtype=float)
    lr = trials["lr"].astype(float).to_numpy() if "lr" in trials else np.full(len(trials), np.nan)
    keep = np.isnan(pick) | np.isnan(lr) | np.isclose(lr, pick)
    return trials[keep].reset_index(drop=True)


def _by_repeat(rows, column: str):
    """``column`` per repeat (the mean, should a repeat have run twice)."""
    return rows.groupby(rows["repeat"].astype(int))[column].mean().astype(float)


def paired(a, b) -> dict:
    """Paired difference ``a - b`` of two per-repeat Series: pairs, mean, sd, and the 95% t interval lo, hi
    (NaN with fewer than two pairs)."""
    common = a.index.intersection(b.index)
    d = (a[common] - b[common]).to_numpy(dtype=float)
    k = len(d)
    mean = float(d.mean()) if k else math.nan
    sd = float(d.std(ddof=1)) if k > 1 else math.nan
    half = math.nan
    if k > 1:
        from scipy.stats import t

        half = float(t.ppf(0.5 + CONFIDENCE / 2, k - 1) * sd / math.sqrt(k))
    return {"pairs": k, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half}


def verdict(diff: dict, direction: str) -> str:
    """The verdict on a paired difference ``first - second`` (:func:`paired`) for the first: "better" or
    "worse" where the 95% interval excludes zero, else "cannot be ordered"; with fewer than two pairs
    "one pair: no interval" or "no pairs"."""
    if diff["pairs"] == 0:
        return NO_PAIRS
    if diff["pairs"] == 1:
        return ONE_PAIR
    lo, hi = diff["lo"], diff["hi"]
    if math.isnan(lo) or lo <= 0 <= hi:
        return TIED
    lower = hi < 0
    return "better" if lower == (direction == "minimize") else "worse"


def _depths(f) -> dict:
    n = f.dropna(subset=["n"]).groupby("base")["n"].first()
    return {b: int(v) for b, v in n.items()}


def _lr_of(rows) -> float:
    lrs = rows["lr"].dropna().unique()
    return float(lrs[0]) if len(lrs) == 1 else math.nan


GAP_COLUMNS = ["base", "n", "budget", "method", "m", "arm", "lr", "control_lr", "pairs", "arm_mean", "control_mean",
               "arm_minus_control", "sd", "lo", "hi", "verdict"]


def paired_gaps(frame, metric: str = "objective", direction: str = "minimize"):
    """Per base and budget point, every arm (DUS at each m but n/2, MoE) against the control (DUS at m = n/2),
    paired by repeat, each at its chosen lr (:func:`best_lr`).

    ``arm_minus_control`` is the mean over pairs of (arm - control) in ``metric``: **negative is better
    for a loss** (``direction`` minimize), positive for an accuracy (maximize). ``lo`` and ``hi`` bound its
    95% t interval (NaN with one pair); ``verdict`` is the arm's (:func:`verdict`). ``arm_mean`` and
    ``control_mean`` are the two means over the same pairs. A base with an odd n has no control and
    no rows.
    """
    import pandas as pd

    f = scored(best_lr(frame)[0], metric)
    depth = _depths(f)
    rows = []
    for (base, budget), g in f.groupby(["base", "budget"], sort=True):
        n = depth.get(base)
        if n is None or n % 2:
            continue
        is_control = (g["method"] == "dus") & (g["m"] == n / 2)
        control = g[is_control]
        ctl = _by_repeat(control, metric)
        others = g[~is_control].assign(_m=lambda x: _mkey(x))
        for (method, m), arm in others.groupby(["method", "_m"], sort=True):
            a = _by_repeat(arm, metric)
            diff = paired(a, ctl)
            common = a.index.intersection(ctl.index)
            rows.append({"base": base, "n": n, "budget": budget, "method": method, "m": math.nan if m < 0 else m,
                         "arm": arm_label(method, m), "lr": _lr_of(arm), "control_lr": _lr_of(control),
                         "pairs": diff["pairs"], "arm_mean": float(a[common].mean()) if len(common) else math.nan,
                         "control_mean": float(ctl[common].mean()) if len(common) else math.nan,
                         "arm_minus_control": diff["mean"], "sd": diff["sd"], "lo": diff["lo"], "hi": diff["hi"],
                         "verdict": verdict(diff, direction)})
    out = pd.DataFrame(rows, columns=GAP_COLUMNS)
    # DUS by m first, then MoE, within each base and point
    return out.assign(_o=out["method"].ne("dus")).sort_values(["base", "budget", "_o", "m"], kind="stable") \
        .drop(columns="_o").reset_index(drop=True)


TREND_COLUMNS = ["base", "method", "m", "arm", "points", "first_budget", "last_budget", "first_gap", "last_gap",
                 "slope", "pays_from", "crossover", "status"]


def gap_trend(gaps, direction: str = "minimize"):
    """Where each arm's paired gap to the control goes with the budget (rows of :func:`paired_gaps`).

    ``slope`` is the least-squares change of ``arm_minus_control`` per doubling of the budget (a line in
    log2 budget over the measured points). ``status``:

    - ``"pays off"``: from ``pays_from`` on, every measured point has the arm better with a 95% interval
      that excludes zero (a measurement);
    - ``"extrapolated"``: the arm is behind (or tied) at the last point but the line reaches zero past it,
      at ``crossover`` (an extrapolation of a straight line in log budget: a guess to test, not a result);
    - ``"no crossover in sight"``: behind or tied, and the line does not come back to zero;
    - ``"ahead, not significant"``: better at the last point on the mean, with no interval excluding zero.

    Fewer than three points: no line (``slope`` NaN), only the measured statuses.
    """
    import numpy as np
    import pandas as pd

    rows = []
    sign = -1.0 if direction == "minimize" else 1.0  # sign * gap > 0: the arm is better
    for (base, method, m), g in gaps.groupby(["base", "method", gaps["m"].fillna(-1)], sort=True):
        g = g.sort_values("budget")
        g = g[g["arm_minus_control"].notna()]
        if g.empty:
            continue
        budgets = g["budget"].to_numpy(dtype=float)
        gap = g["arm_minus_control"].to_numpy(dtype=float)
        slope = crossover = pays_from = math.nan
        better = (g["verdict"] == "better").to_numpy()
        run = 0  # the trailing run of points where the arm is significantly better
        while run < len(better) and better[len(better) - 1 - run]:
            run += 1
        if run:
            pays_from = float(budgets[len(budgets) - run])
        if len(g) >= 3 and budgets.min() > 0:
            x = np.log2(budgets)
            slope, intercept = np.polyfit(x, gap, 1)
            if sign * gap[-1] <= 0 and sign * slope > 0:  # behind, and the line heads for zero
                crossover = float(2 ** (-intercept / slope))
        if run:
            status = "pays off"
        elif sign * gap[-1] > 0:
            status = "ahead, not significant"
        elif not math.isnan(crossover) and crossover > budgets[-1]:
            status = "extrapolated"
        else:
            status = "no crossover in sight"
            crossover = math.nan
        rows.append({"base": base, "method": method, "m": math.nan if m < 0 else m, "arm": g["arm"].iloc[0],
                     "points": len(g), "first_budget": float(budgets[0]), "last_budget": float(budgets[-1]),
                     "first_gap": float(gap[0]), "last_gap": float(gap[-1]), "slope": float(slope),
                     "pays_from": pays_from, "crossover": crossover, "status": status})
    return pd.DataFrame(rows, columns=TREND_COLUMNS)


ITEM_COLUMNS = ["base", "n", "budget", "task", "method", "m", "arm", "lr", "pairs", "items", "arm_mean",
                "control_mean", "arm_minus_control", "lo", "hi", "verdict"]


def item_gaps(frame, items: dict, *, tasks: list[str] | None = None, resamples: int = 2000, seed: int = 0):
    """Per base, budget point and answer task (``answer_k<k>``): every arm's accuracy minus the control's,
    with a 95% percentile interval from a paired bootstrap over the evaluation items.

    ``items`` is :func:`ablate.results.read_items`' mapping (trial, point, task) -> per-item scores. Arms
    and lrs as in :func:`paired_gaps` (each arm at the lr chosen on held-out loss); the difference is the
    mean over repeat pairs of (arm's hits - control's hits) averaged over items, and each bootstrap draw
    resamples the items with replacement, the same draw for every pair (the items are the same for
    every trial). Repeats are not resampled: with few seeds this interval is about the items alone,
    the t interval of :func:`paired_gaps` about the seeds. Positive is better (an accuracy)."""
    import pandas as pd

    f = scored(best_lr(frame)[0], "objective")
    depth = _depths(f)
    rng = np.random.default_rng(seed)
    rows = []
    known = sorted({task for _, _, task in items})
    for (base, budget), g in f.groupby(["base", "budget"], sort=True):
        n = depth.get(base)
        if n is None or n % 2:
            continue
        is_control = (g["method"] == "dus") & (g["m"] == n / 2)
        control = {int(r.repeat): int(r.trial) for r in g[is_control].itertuples()}
        others = g[~is_control].assign(_m=lambda x: _mkey(x))
        for task in tasks or known:
            for (method, m), arm in others.groupby(["method", "_m"], sort=True):
                pairs = []
                for r in arm.itertuples():
                    a = items.get((int(r.trial), float(budget), task))
                    c = items.get((control.get(int(r.repeat), -1), float(budget), task))
                    if a is not None and c is not None and len(a["hit"]) == len(c["hit"]):
                        pairs.append((np.asarray(a["hit"], float), np.asarray(c["hit"], float)))
                if not pairs:
                    continue
                diff = np.mean([x - y for x, y in pairs], axis=0)  # per item, mean over pairs
                draws = rng.integers(0, len(diff), (resamples, len(diff)))
                boot = diff[draws].mean(axis=1)
                lo, hi = (float(q) for q in np.percentile(boot, [100 * (1 - CONFIDENCE) / 2,
                                                                 100 * (1 + CONFIDENCE) / 2]))
                est = float(diff.mean())
                rows.append({"base": base, "n": n, "budget": budget, "task": task, "method": method,
                             "m": math.nan if m < 0 else m, "arm": arm_label(method, m), "lr": _lr_of(arm),
                             "pairs": len(pairs), "items": len(diff),
                             "arm_mean": float(np.mean([x.mean() for x, _ in pairs])),
                             "control_mean": float(np.mean([y.mean() for _, y in pairs])),
                             "arm_minus_control": est, "lo": lo, "hi": hi,
                             # the items give an interval even with one pair of seeds
                             "verdict": verdict({"pairs": 2, "lo": lo, "hi": hi}, "maximize")})
    return pd.DataFrame(rows, columns=ITEM_COLUMNS)


BEST_COLUMNS = ["base", "n", "budget", "best_m", "best_mean", "repeats", "lr", "runner_up_m", "runner_up_mean",
                "best_minus_runner_up", "lo", "hi", "pairs", "verdict", "best_minus_control", "control_lo",
                "control_hi", "control_pairs", "control_verdict", "tied", "m_lo", "m_hi"]


def best_m_by_budget(frame, metric: str = "objective", direction: str = "minimize"):
    """Per base and budget point, the DUS m with the best mean ``metric`` at its chosen lr (m = n/2, the
    unchanged base, competes too; on a tie the smaller m), and how sure that is.

    ``best_minus_runner_up`` (lo, hi, pairs, verdict) is the paired difference best - runner-up, the
    DUS m with the next best mean; ``best_minus_control`` (control_lo, control_hi, control_pairs,
    control_verdict) the one against the control (NaN where the best is the control). Negative is
    better for a loss. ``tied`` lists the m (the best included) whose paired interval against the best
    covers zero; ``m_lo`` and ``m_hi`` are its ends, NaN when some m has fewer than two pairs with
    the best (then the set is not known).
    """
    import pandas as pd

    f = scored(best_lr(frame)[0], metric)
    f = f[f["method"] == "dus"]
    depth = _depths(f)
    sign = 1 if direction == "minimize" else -1
    rows = []
    for (base, budget), g in f.groupby(["base", "budget"], sort=True):
        n = depth.get(base)
        by_m = {float(m): _by_repeat(r, metric) for m, r in g.groupby("m", sort=True)}
        ranked = sorted(by_m, key=lambda m: (sign * by_m[m].mean(), m))
        best = ranked[0]
        row = {"base": base, "n": n, "budget": budget, "best_m": best, "best_mean": float(by_m[best].mean()),
               "repeats": len(by_m[best]), "lr": _lr_of(g[g["m"] == best])}
        empty = {"pairs": 0, "mean": math.nan, "lo": math.nan, "hi": math.nan}
        up = ranked[1] if len(ranked) > 1 else None
        diff = paired(by_m[best], by_m[up]) if up is not None else empty
        row.update(runner_up_m=math.nan if up is None else up,
                   runner_up_mean=math.nan if up is None else float(by_m[up].mean()),
                   best_minus_runner_up=diff["mean"], lo=diff["lo"], hi=diff["hi"], pairs=diff["pairs"],
                   verdict=verdict(diff, direction) if up is not None else "only one m")
        control = n / 2 if n is not None and n % 2 == 0 else None
        has_control = control is not None and control in by_m and control != best
        cd = paired(by_m[best], by_m[control]) if has_control else empty
        row.update(best_minus_control=cd["mean"], control_lo=cd["lo"], control_hi=cd["hi"],
                   control_pairs=cd["pairs"], control_verdict=verdict(cd, direction) if has_control else
                   ("is the control" if control == best else "no control"))
        tied, known = [best], True
        for m in ranked[1:]:
            d = paired(by_m[m], by_m[best])
            known &= d["pairs"] > 1
            if verdict(d, direction) == TIED:
                tied.append(m)
        tied = sorted(int(m) for m in tied)
        row.update(tied=tuple(tied), m_lo=float(min(tied)) if known else math.nan,
                   m_hi=float(max(tied)) if known else math.nan)
        rows.append(row)
    return pd.DataFrame(rows, columns=BEST_COLUMNS)


RANK_COLUMNS = ["base", "budget", "next_budget", "arms", "rho", "p"]
EXACT_ARMS = 8  # up to 8! = 40,320 orderings the p-value is exact (a permutation test), above it asymptotic


def _spearman(x, y) -> tuple[float, float]:
    """Spearman's rho of ``x`` and ``y`` and its two-sided p-value: exact over every ordering for a few arms
    (the asymptotic one says p = 0 for three arms in the same order, where the exact one is 1/3)."""
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = float(stats.spearmanr(x, y).statistic)
        if len(x) <= EXACT_ARMS:
            p = stats.permutation_test((x,), lambda a: stats.spearmanr(a, y).statistic, permutation_type="pairings",
                                       n_resamples=np.inf).pvalue
        else:
            p = stats.spearmanr(x, y).pvalue
    return round(rho, 12), float(p)


def arm_means(frame, metric: str = "objective", *, per_lr: bool = False):
    """Per base, budget point and arm (at its chosen lr, or per lr with ``per_lr``), over repeats: count, mean,
    sd, the 95% t interval of the mean (half, lo, hi; NaN with one repeat), and the means of ``tokens``,
    ``flops`` and ``flops_per_token`` where the table has them. Columns: base, n, budget, method, m, arm, lr,
    count, mean, sd, half, lo, hi, tokens, flops, flops_per_token."""
    import pandas as pd
    from scipy.stats import t

    f = scored(frame if per_lr else best_lr(frame)[0], metric)
    f = f.assign(_m=_mkey(f), _lr=f["lr"].fillna(-1.0))
    for col in ("n", "tokens", "flops", "flops_per_token"):
        f[col] = f[col].astype(float) if col in f else np.nan
    g = f.groupby(["base", "budget", "method", "_m", "_lr"], sort=True)
    out = g[metric].agg(["count", "mean", "std"]).reset_index().rename(columns={"std": "sd"})
    sizes = g[["n", "tokens", "flops", "flops_per_token"]].mean().reset_index(drop=True)
    out = pd.concat([out, sizes], axis=1)
    dof = (out["count"] - 1).clip(lower=1)
    out["half"] = (t.ppf(0.5 + CONFIDENCE / 2, dof) * out["sd"] / np.sqrt(out["count"])).where(out["count"] > 1)
    out["lo"], out["hi"] = out["mean"] - out["half"], out["mean"] + out["half"]
    out["m"] = out["_m"].where(out["_m"] >= 0)
    out["lr"] = out["_lr"].where(out["_lr"] >= 0)
    out["arm"] = [arm_label(a, m) for a, m in zip(out["method"], out["m"], strict=True)]
    columns = ["base", "n", "budget", "method", "m", "arm", "lr", "count", "mean", "sd", "half", "lo", "hi", "tokens",
               "flops", "flops_per_token"]
    return out[columns]


def rank_correlation(frame, metric: str = "objective", *, against: str = "next", per_lr: bool = False):
    """Spearman's rank correlation of the arms' mean ``metric`` between budget points, per base.

    Each budget point is compared with the next one (``against="next"``) or with the last one
    (``"last"``), over the arms (DUS at each m, the control included, and MoE) scored at both, each at
    its chosen lr there (``per_lr``: each (arm, lr) is an item instead, what a multi-fidelity search
    ranks). Columns: base, budget, next_budget, arms (how many were ranked), rho and its p-value (rho NaN
    with fewer than two arms, or when the means at either point are all equal; p exact up to
    :data:`EXACT_ARMS` arms: with two it is 1, with three at best 1/3).
    rho near 1: the early point already orders the arms as the later one does.
    """
    import pandas as pd

    means = arm_means(frame, metric, per_lr=per_lr)
    parts = [means["method"], means["m"].fillna(-1)] + ([means["lr"].fillna(-1)] if per_lr else [])
    means = means.assign(_key=list(zip(*parts, strict=True)))  # one item: an arm, or an (arm, lr)
    rows = []
    for base, g in means.groupby("base", sort=True):
        budgets = sorted(g["budget"].unique())
        for i, b in enumerate(budgets[:-1]):
            later = budgets[i + 1] if against == "next" else budgets[-1]
            x = g[g["budget"] == b].set_index("_key")["mean"]
            y = g[g["budget"] == later].set_index("_key")["mean"]
            common = x.index.intersection(y.index)
            rho = p = math.nan
            if len(common) >= 2 and x[common].nunique() > 1 and y[common].nunique() > 1:
                rho, p = _spearman(x[common].to_numpy(dtype=float), y[common].to_numpy(dtype=float))
            rows.append({"base": base, "budget": b, "next_budget": later, "arms": len(common), "rho": rho, "p": p})
    return pd.DataFrame(rows, columns=RANK_COLUMNS)
