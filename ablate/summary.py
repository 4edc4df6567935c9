"""The readable end-of-study summary: per base, the best m against the controls, at every budget point.

Printed with ``rich`` from the tables ``ablate.results`` writes (one row per trial, and one per trial
and budget point); returns it as a dict too (tests and scripts read that instead of the terminal).
The paired statistics (gaps to the control with 95% intervals, the best m per budget point, the lr
choice, Spearman's rank correlation between budget points) come from :mod:`ablate.stats`.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from pathlib import Path

from optuna.trial import TrialState
from rich.console import Console
from rich.table import Table

from ablate import stats
from ablate.results import BUDGET_COLUMNS, budget_rows, trial_rows
from ablate.search import retried

__all__ = ["summarize", "print_summary", "describe_arm"]

BUILT_IN = ("dus", "moe", "nocpt")  # every other method is a layer-plan operator, named by its spelling


def _mean_sd(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


INTEGERS = {"budget", "next_budget", "m", "best_m", "runner_up_m", "pairs", "repeats", "arms", "lrs",
            "control_pairs", "tied", "m_lo", "m_hi"}


def _plain(value, integer: bool = False):
    """A cell of a pandas table as plain Python: NaN -> None, numpy scalars -> float (int where ``integer``),
    tuples -> lists."""
    if isinstance(value, tuple):
        return [_plain(v, integer) for v in value]
    if value is None or isinstance(value, str | bool):
        return value
    x = float(value)
    if math.isnan(x):
        return None
    return int(x) if integer else x


def _records(frame, columns: list[str]) -> list[dict]:
    """The rows of ``frame`` as dicts of plain Python values (what the summary dict holds)."""
    return [{c: _plain(v, c in INTEGERS) for c, v in zip(columns, row, strict=True)}
            for row in frame[columns].itertuples(index=False)]


def _budget_stats(points: list[dict], base: str, direction: str) -> dict | None:
    """The per-budget part of a base's summary from its budget rows (None when it has none scored)."""
    import pandas as pd

    frame = pd.DataFrame([p for p in points if p.get("base") == base])
    if frame.empty:
        return None
    for col in BUDGET_COLUMNS:
        if col not in frame:
            frame[col] = None
    frame = frame.astype({"objective": float, "val_loss": float})
    chosen, choices = stats.best_lr(frame)
    done = stats.scored(chosen)
    nocpt = frame[(frame["method"] == "nocpt") & frame["objective"].notna() & (frame["state"] == "complete")]
    out = {"nocpt": float(nocpt["objective"].mean()) if len(nocpt) else None, "budget": None, "budgets": [],
           "gaps": [], "best_by_budget": [], "spearman": [], "lr_choices": [], "repeats": 0, "intervals": False}
    if done.empty:
        return out
    budgets = sorted(float(b) for b in done["budget"].unique())
    top = done[done["budget"] == budgets[-1]]
    by_m: dict[int, list[float]] = {}
    for m, value in zip(top.loc[top["method"] == "dus", "m"], top.loc[top["method"] == "dus", "objective"],
                        strict=True):
        by_m.setdefault(int(m), []).append(float(value))
    gaps = stats.paired_gaps(chosen, "objective", direction)
    trend = stats.gap_trend(gaps, direction)
    best = stats.best_m_by_budget(chosen, "objective", direction)
    rank = stats.rank_correlation(chosen, "objective")
    lr_of = {int(m): _plain(stats._lr_of(g)) for m, g in top[top["method"] == "dus"].groupby("m")}
    operators: dict[str, list[float]] = {}
    for method, value in zip(top["method"], top["objective"], strict=True):
        if method not in BUILT_IN:
            operators.setdefault(method, []).append(float(value))
    repeats = done.groupby(["budget", "method", done["m"].fillna(-1)])["repeat"].nunique()
    out.update(budget=_plain(budgets[-1], True), budgets=[_plain(b, True) for b in budgets], by_m=by_m,
               lr_by_m=lr_of, moe=[float(v) for v in top.loc[top["method"] == "moe", "objective"]],
               operators=operators,
               moe_lr=_plain(stats._lr_of(top[top["method"] == "moe"])),
               gaps=_records(gaps, ["budget", "arm", "method", "m", "lr", "control_lr", "pairs", "arm_mean",
                                    "control_mean", "arm_minus_control", "lo", "hi", "verdict"]),
               best_by_budget=_records(best, ["budget", "best_m", "best_mean", "lr", "repeats", "runner_up_m",
                                              "best_minus_runner_up", "lo", "hi", "pairs", "verdict",
                                              "best_minus_control", "control_lo", "control_hi", "control_pairs",
                                              "control_verdict", "tied", "m_lo", "m_hi"]),
               spearman=_records(rank, ["budget", "next_budget", "arms", "rho", "p"]),
               trend=_records(trend, ["arm", "points", "first_budget", "last_budget", "first_gap", "last_gap",
                                      "slope", "pays_from", "crossover", "status"]),
               lr_choices=_records(choices, ["budget", "arm", "method", "m", "lr", "val_loss", "repeats", "lrs",
                                             "tried"]),
               repeats=int(repeats.max()),
               intervals=bool((len(gaps) and gaps["pairs"].max() > 1) or (len(best) and best["pairs"].max() > 1)))
    return out


def summarize(rows: list[dict], direction: str, points: list[dict] | None = None) -> dict:
    """Per base: objective by m (mean, sd, count), the best m, the control (m = n/2) and MoE scores, trial counts;
    with ``points`` (the budget rows of :func:`ablate.results.budget_rows`) also the paired statistics.

    Without ``points`` the scores are each trial's last. With them, ``by_m``, ``best_m``, ``control``
    and ``moe`` are at the last budget point (``budget``), each arm at its chosen lr, and each base
    has: ``nocpt`` (the no-CPT reference's objective), ``budgets`` (the points, in the study's unit),
    ``gaps`` (per point and arm, the paired difference to the control: ``arm_minus_control``, negative
    is better for a loss, its 95% interval ``lo``/``hi``, ``pairs``, ``verdict``), ``best_by_budget``
    (per point the best m and its paired difference to the runner-up and to the control),
    ``spearman`` (rho of the arms' order between consecutive points), ``lr_choices`` (per point and
    arm, the lr chosen on held-out loss; empty without an lr grid), ``lr_by_m`` and ``moe_lr`` (the
    chosen lr at the last point), ``repeats`` (the most pairs of any arm) and ``intervals`` (False when
    no arm has two pairs: no interval anywhere).
    """
    better = min if direction == "minimize" else max
    out: dict = {}
    for base in sorted({r["base"] for r in rows if r["base"] is not None}):
        mine = [r for r in rows if r["base"] == base]
        done = [r for r in mine if r["state"] == "complete" and r["objective"] is not None]
        by_m: dict[int, list[float]] = {}
        for r in done:
            if r["method"] == "dus":
                by_m.setdefault(int(r["m"]), []).append(float(r["objective"]))
        n = next((r["n"] for r in mine if r["n"] is not None), None)
        moe = [float(r["objective"]) for r in done if r["method"] == "moe"]
        operators: dict[str, list[float]] = {}  # layer-plan operators: each its own arm, named by its spelling
        for r in done:
            if r["method"] not in BUILT_IN:
                operators.setdefault(r["method"], []).append(float(r["objective"]))
        depth = {r["method"]: r.get("s") for r in mine if r.get("s") is not None}
        extra = _budget_stats(points, base, direction) if points else None
        if extra is not None and extra["budgets"]:
            by_m, moe, operators = extra.pop("by_m"), extra.pop("moe"), extra.pop("operators")
        table = {m: _mean_sd(v) + (len(v),) for m, v in sorted(by_m.items())}
        best = better(table, key=lambda m: table[m][0]) if table else None
        out[base] = {
            "n": n, "by_m": table, "best_m": best, "best": table[best][0] if best is not None else None,
            "control": table.get(n // 2, (None,))[0] if n is not None and n % 2 == 0 else None,
            "moe": _mean_sd(moe)[0] if moe else None,
            "complete": sum(r["state"] == "complete" for r in mine),
            "pruned": sum(r["state"] == "pruned" for r in mine),
            "failed": sum(r["state"] == "fail" for r in mine),
        }
        if operators:  # (mean, sd, trials, layers) per operator
            out[base]["operators"] = {op: _mean_sd(v) + (len(v), depth.get(op))
                                      for op, v in sorted(operators.items())}
        if extra is not None:
            out[base].update(extra)
    return out


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _signed(x) -> str:
    return "-" if x is None else f"{x:+.4f}"


def _interval(lo, hi) -> str:
    return "-" if lo is None or hi is None else f"[{lo:+.4f}, {hi:+.4f}]"


def _lr(x) -> str:
    return "" if x is None else f"{x:g}"


def _budget(x, unit: str) -> str:
    """A budget point as a table shows it: ``4,096`` tokens, ``1.34e+15`` FLOPs."""
    if x is None:
        return "-"
    return f"{x:.3g}" if unit == "flops" else f"{int(x):,}"


def _unit(unit: str) -> str:
    return "training FLOPs" if unit == "flops" else "CPT tokens"


def _arm_table(s: dict, unit: str) -> Table:
    where = "after the same CPT"
    if s.get("budget") is not None:
        where = f"{'at the last budget point, ' if len(s['budgets']) > 1 else 'after '}" \
                f"{_budget(s['budget'], unit)} {_unit(unit)}"
    table = Table(title=f"{s['base']} (n={s['n']}): objective by m {where}")
    lrs = s.get("lr_by_m") or {}
    grid = any(v is not None for v in lrs.values())
    for col in ["m", "s (layers)"] + (["lr"] if grid else []) + ["objective mean", "sd", "trials", "note"]:
        table.add_column(col, justify="right")
    for m, (mean, sd, count) in s["by_m"].items():
        note = []
        if s["n"] is not None and s["n"] % 2 == 0 and m == s["n"] // 2:
            note.append("control (= base)")
        if s["n"] is not None and s["n"] % 4 == 0 and m == s["n"] // 4:
            note.append("SOLAR's n/4")
        if m == s["best_m"]:
            note.append("best")
        table.add_row(str(m), str(2 * (s["n"] - m)) if s["n"] else "-", *([_lr(lrs.get(m))] if grid else []),
                      _fmt(mean), _fmt(sd), str(count), ", ".join(note))
    return table


def _gap_table(s: dict, direction: str, unit: str) -> Table:
    sign = "negative" if direction == "minimize" else "positive"
    control = f"DUS m={s['n'] // 2}" if s["n"] else "m = n/2"
    table = Table(title=f"{s['base']}: arm - control ({control}, same CPT), paired by repeat; {sign} is better",
                  title_justify="left", caption=f"budget in {_unit(unit)}; verdicts only where the 95% t interval "
                  "over pairs excludes zero", caption_justify="left")
    grid = any(g["lr"] is not None for g in s["gaps"])
    intervals = any(g["lo"] is not None for g in s["gaps"])  # one repeat: no column of dashes
    columns = ["budget", "arm"] + (["lr", "control lr"] if grid else []) + \
        ["pairs", "arm - control"] + (["95% interval"] if intervals else []) + ["verdict"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("arm", "verdict") else "right")
    last = None
    for g in s["gaps"]:
        first = g["budget"] != last
        if first and last is not None:
            table.add_section()
        last = g["budget"]
        table.add_row(_budget(g["budget"], unit) if first else "", g["arm"],
                      *([_lr(g["lr"]), _lr(g["control_lr"])] if grid else []), str(g["pairs"]),
                      _signed(g["arm_minus_control"]), *([_interval(g["lo"], g["hi"])] if intervals else []),
                      g["verdict"])
    return table


def _best_table(s: dict, direction: str, unit: str) -> Table:
    intervals = any(b["lo"] is not None for b in s["best_by_budget"])  # one repeat: no intervals, no tied set
    table = Table(title=f"{s['base']}: the best m at each budget point, paired against the runner-up (2nd)",
                  title_justify="left", caption="tied: the m whose paired 95% interval with the best covers zero"
                  if intervals else None, caption_justify="left")
    columns = ["budget", "best m", "mean", "2nd m", "best - 2nd [95% interval]" if intervals else "best - 2nd",
               "verdict"] + (["tied"] if intervals else [])
    for col in columns:
        table.add_column(col, justify="left" if col in ("verdict", "tied") else "right")
    for b in s["best_by_budget"]:
        tied = ", ".join(str(m) for m in b["tied"]) if b["m_lo"] is not None else "-"
        gap = _signed(b["best_minus_runner_up"])
        if b["lo"] is not None:
            gap += f" {_interval(b['lo'], b['hi'])}"
        table.add_row(_budget(b["budget"], unit), str(b["best_m"]), _fmt(b["best_mean"]),
                      "-" if b["runner_up_m"] is None else str(b["runner_up_m"]), gap, b["verdict"],
                      *([tied] if intervals else []))
    return table


def _lr_table(s: dict, unit: str) -> Table:
    table = Table(title=f"{s['base']}: the lr of each arm, chosen on held-out loss", title_justify="left",
                  caption="never on the evaluation items; the comparisons above use it", caption_justify="left")
    for col in ("budget", "arm", "lr", "held-out loss by lr (repeats)"):
        table.add_column(col, justify="left" if col != "budget" else "right")
    last = None
    for c in sorted(s["lr_choices"], key=lambda c: (c["budget"], c["method"] != "dus", c["m"] or 0)):
        first = c["budget"] != last
        if first and last is not None:
            table.add_section()
        table.add_row(_budget(c["budget"], unit) if first else "", c["arm"], _lr(c["lr"]), c["tried"])
        last = c["budget"]
    return table


def _spearman_line(s: dict, unit: str) -> str:
    parts = []
    for r in s["spearman"]:
        rho = "-" if r["rho"] is None else f"{r['rho']:+.2f}"
        p = "" if r["p"] is None else f", p {r['p']:.2g}"
        parts.append(f"{_budget(r['budget'], unit)} -> {_budget(r['next_budget'], unit)}: {rho} "
                     f"({r['arms']} arms{p})")
    return "Spearman's rho of the arms' order, each budget point to the next: " + "; ".join(parts)


def print_summary(study, space, study_dir: Path) -> dict:
    """Print the summary of an Optuna study and return :func:`summarize`'s dict."""
    direction = study.direction.name.lower()
    summary = summarize(trial_rows(study_dir, study), direction, budget_rows(study_dir, study))
    for base, s in summary.items():  # n is recorded by a trial that got as far as loading its base
        if s["n"] is None:
            s["n"] = space.depths.get(base)
    console = Console()
    objective = space.config.eval.objective
    unit = getattr(space.config.train, "budget_unit", "tokens")
    console.print(f"\n[bold]Study {study.study_name}[/bold]: objective {objective.describe()} "
                  f"({'lower' if direction == 'minimize' else 'higher'} is better); results in {study_dir}")
    for base, s in summary.items():
        console.print(_arm_table({**s, "base": base}, unit))
        nocpt = f"; no CPT {_fmt(s['nocpt'])}" if s.get("nocpt") is not None else ""
        console.print(f"  best m = {s['best_m']} ({_fmt(s['best'])}); control {_fmt(s['control'])}; "
                      f"MoE upcycle {_fmt(s['moe'])}{nocpt}; trials: {s['complete']} complete, {s['pruned']} "
                      f"pruned, {s['failed']} failed")
        if s.get("operators"):
            console.print("  operators: " + "; ".join(
                f"{op} {_fmt(mean)} (s={layers}, {count} trial{'s' * (count > 1)})"
                for op, (mean, _, count, layers) in s["operators"].items()))
        for line in _budget_lines(console, {**s, "base": base}, direction, unit):
            console.print(f"  {line}")
    for line in _failure_notes(study, space):
        console.print(f"  {line}")
    return summary


def _budget_lines(console, s: dict, direction: str, unit: str) -> list[str]:
    """Print the paired tables of one base; return the notes that follow them."""
    notes = []
    if s.get("gaps"):
        console.print(_gap_table(s, direction, unit))
    if len(s.get("budgets") or []) > 1 and s.get("best_by_budget"):
        console.print(_best_table(s, direction, unit))
    if s.get("lr_choices"):
        console.print(_lr_table(s, unit))
    if s.get("budgets") and not s.get("intervals"):
        notes.append("one repeat per arm: no intervals (pairs need repeats >= 2; raise repeats)")
    if s.get("spearman"):
        notes.append(_spearman_line(s, unit))
    notes += [_trend_line(t, unit) for t in s.get("trend") or [] if t["points"] > 2]
    return notes


def _trend_line(t: dict, unit: str) -> str:
    """One arm's gap against the budget, in words: measured where it pays off, labelled where extrapolated."""
    def small(x) -> str:  # gaps of a few 1e-5 nats are common at small budgets
        return f"{x:+.4f}" if abs(x) >= 1e-3 or x == 0 else f"{x:+.1e}"

    head = (f"{t['arm']}: gap {small(t['first_gap'])} at {_budget(t['first_budget'], unit)} -> "
            f"{small(t['last_gap'])} at {_budget(t['last_budget'], unit)} ({small(t['slope'])} per doubling)")
    if t["status"] == "pays off":
        return f"{head}: pays off from {_budget(t['pays_from'], unit)} (measured, 95% intervals exclude 0)"
    if t["status"] == "extrapolated":
        return (f"{head}: no crossover measured; a straight line in log budget reaches 0 at "
                f"~{_budget(t['crossover'], unit)} (an extrapolation, not a measurement)")
    return f"{head}: {t['status']}"


def _failure_notes(study, space) -> list[str]:
    """What the tables do not show: configurations whose worker died (each ran again) and
    configurations that failed for a reason of their own (kept as failures until retried)."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    again = retried(study.get_trials(deepcopy=False))
    deaths: Counter = Counter()
    own = []
    for t in trials:
        arm = space.trial_arm(t)
        if arm is None or "duplicate_of" in t.user_attrs:
            continue
        if "fail_reason" not in t.user_attrs:
            deaths[arm] += not t.user_attrs.get("interrupted")
        elif t.number not in again:
            own.append(f"trial {t.number} ({describe_arm(arm)}): {t.user_attrs['fail_reason'][:120]}")
    notes = [f"the worker running {describe_arm(arm)} died {k} time{'s' * (k > 1)} (killed, or out of memory?); "
             "it runs again each time" for arm, k in deaths.items() if k]
    if own:
        notes.append(f"{len(own)} configuration{'s' * (len(own) > 1)} failed for a reason of their own; "
                     "--retry-failed runs them again: " + "; ".join(own[:5]))
    return notes


def describe_arm(arm) -> str:
    """``tiny dus m=1 lr=0.001 repeat 0``: a configuration in a line of text (the lr only where it is set)."""
    lr = getattr(arm, "lr", None)
    return f"{arm.base} {arm.method}" + (f" m={arm.m}" if arm.m is not None else "") + \
        (f" lr={lr:g}" if lr is not None else "") + f" repeat {arm.repeat}"
