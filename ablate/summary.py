"""The readable end-of-study summary: per base, the best m against the controls.

Printed with ``rich`` from the same table ``ablate.results`` writes; returns it as a
dict too (tests and scripts read that instead of the terminal).
"""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

from optuna.trial import TrialState
from rich.console import Console
from rich.table import Table

from ablate.results import trial_rows
from ablate.search import retried

__all__ = ["summarize", "print_summary", "describe_arm"]


def _mean_sd(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict], direction: str) -> dict:
    """Per base: objective by m (mean, sd, count), the best m, the control (m = n/2) and MoE scores."""
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
    return out


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def print_summary(study, space, study_dir: Path) -> dict:
    """Print the summary of an Optuna study and return :func:`summarize`'s dict."""
    direction = study.direction.name.lower()
    summary = summarize(trial_rows(study_dir, study), direction)
    for base, s in summary.items():  # n is recorded by a trial that got as far as loading its base
        if s["n"] is None:
            s["n"] = space.depths.get(base)
    console = Console()
    objective = space.config.eval.objective
    console.print(f"\n[bold]Study {study.study_name}[/bold]: objective {objective.describe()} "
                  f"({'lower' if direction == 'minimize' else 'higher'} is better); results in {study_dir}")
    for base, s in summary.items():
        table = Table(title=f"{base} (n={s['n']}): objective by m after the same CPT")
        for col in ("m", "s (layers)", "objective mean", "sd", "trials", "note"):
            table.add_column(col, justify="right")
        for m, (mean, sd, count) in s["by_m"].items():
            note = []
            if s["n"] is not None and s["n"] % 2 == 0 and m == s["n"] // 2:
                note.append("control (= base)")
            if s["n"] is not None and s["n"] % 4 == 0 and m == s["n"] // 4:
                note.append("SOLAR's n/4")
            if m == s["best_m"]:
                note.append("best")
            table.add_row(str(m), str(2 * (s["n"] - m)) if s["n"] else "-", _fmt(mean), _fmt(sd), str(count),
                          ", ".join(note))
        console.print(table)
        console.print(f"  best m = {s['best_m']} ({_fmt(s['best'])}); control {_fmt(s['control'])}; "
                      f"MoE upcycle {_fmt(s['moe'])}; trials: {s['complete']} complete, {s['pruned']} pruned, "
                      f"{s['failed']} failed")
    for line in _failure_notes(study, space):
        console.print(f"  {line}")
    return summary


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
    """``tiny dus m=1 repeat 0``: a configuration in a line of text."""
    return f"{arm.base} {arm.method}" + (f" m={arm.m}" if arm.m is not None else "") + f" repeat {arm.repeat}"
