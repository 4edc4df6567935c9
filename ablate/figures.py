"""Write a study's figures (PDF + PNG) and results tables (LaTeX + Markdown) from results on disk.

    python -m ablate.figures --study default --out paper/figures
    python -m ablate.figures --study runs/default --out paper/figures --no-redundancy
    python -m ablate.figures --study hub-small --storage postgresql://u:p@db/ablate --out paper/hub-small

``--study`` is a study folder or a study name under ``--runs`` (default ``runs/``). The
same results give byte-identical files. Running and waiting trials are left out, so a
study still in progress can be drawn; a figure without enough trials becomes a panel
saying so. The layer-redundancy figure loads each base model once (cached in the study
folder as ``redundancy.json``); ``--no-redundancy`` skips it. Nothing here trains.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ablate import plots, stats, studyplots
from ablate.errors import UserError, cli
from ablate.fsutil import atomic_write_text, check_writable
from ablate.objective import ObjectiveConfig
from ablate.plots import arm_stats, best_m, human_count
from ablate.preflight import resolve_device
from ablate.redundancy import study_redundancy
from ablate.results import BUDGET_COLUMNS, load, load_budgets, open_study, read_items, study_dir_info

__all__ = ["make_figures", "resolve_study_dir", "objective_label", "read_curves", "read_branches", "load_points",
           "results_table", "budget_tables", "numbers_tex", "main"]

FINISHED = ("complete", "pruned", "fail")


def resolve_study_dir(study: str, runs: str | Path = "runs") -> Path:
    """A study folder from a path or a name under ``runs``; a one-line UserError if neither exists."""
    for candidate in (Path(study).expanduser(), Path(runs).expanduser() / study):
        if (candidate / "study.json").is_file():
            return candidate
    raise UserError(f"no study {study!r}: neither {study} nor {Path(runs) / study} is a study folder with a "
                    "study.json; pass --study PATH to <out>/<study name>, or --runs DIR")


def objective_label(info: dict) -> tuple[str, str, str]:
    """``(axis label, full description, direction)`` of the study's objective, from its ``study.json``."""
    direction = info.get("direction", "minimize")
    spec = info.get("config", {}).get("eval", {}).get("objective", {"kind": "val_loss"})
    try:
        text = ObjectiveConfig.model_validate(spec).describe()
    except (ImportError, ValueError):  # a study.json from another version: show the recorded spec as is
        keys = spec.get("keys")
        text = spec.get("kind", "objective") + (f" of {', '.join(keys)}" if keys else "")
    if text in ("val_loss", "held-out loss"):
        text = "held-out loss (nats/token)"
    better = f"({'lower' if direction == 'minimize' else 'higher'} is better)"
    short = text
    if len(text) > 30:  # an axis label holds ~30 characters per line at column width; captions say the rest
        keys = spec.get("keys") or []
        short = f"mean of {len(keys)} task metrics" if spec.get("kind") == "mean" and keys else spec.get("kind", text)
    return f"{short} {better}", f"{text} {better}", direction


def _metrics(study_dir: Path, number: int) -> list[dict]:
    path = Path(study_dir) / "trials" / str(number) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_curves(study_dir: Path, trials) -> dict:
    """trial number -> DataFrame of the main run's ``metrics.jsonl`` rows that carry a held-out loss.

    Rows with a ``branch`` key belong to a cooldown branch (schedule wsd), not to the main run:
    :func:`read_branches` reads those.
    """
    import pandas as pd

    out = {}
    for number in sorted(int(t) for t in trials):
        records = [r for r in _metrics(study_dir, number) if r.get("val_loss") is not None and "branch" not in r]
        frame = pd.DataFrame(records, columns=["step", "tokens", "val_loss"])
        if len(frame):
            out[number] = frame.sort_values("step").reset_index(drop=True)
    return out


def read_branches(study_dir: Path, trials) -> dict:
    """trial number -> DataFrame of its cooldown branches (schedule wsd), one row each: ``branch`` (its budget
    point in tokens), ``fork_tokens`` (where it left the main run), ``tokens`` and ``val_loss`` (its end)."""
    import pandas as pd

    out = {}
    for number in sorted(int(t) for t in trials):
        records = _metrics(study_dir, number)
        per_step = next((r["tokens"] / r["step"] for r in records if r.get("step")), None)
        rows = []
        for branch in sorted({r["branch"] for r in records if r.get("branch") is not None}):
            mine = [r for r in records if r.get("branch") == branch]
            end = [r for r in mine if r.get("val_loss") is not None]
            if not end or per_step is None:
                continue
            rows.append({"branch": branch, "fork_tokens": min(r["tokens"] for r in mine) - per_step,
                         "tokens": end[-1]["tokens"], "val_loss": end[-1]["val_loss"]})
        if rows:
            out[number] = pd.DataFrame(rows)
    return out


def _fmt(x: float, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def results_table(df, *, direction: str, bases: list[str] | None = None, score: str = "score"):
    """Per base (in ``bases`` order) and method: m, s, sizes, tokens, score mean with a 95% t-interval
    (or n=1 with one seed), val loss, and notes (unchanged base, best m)."""
    import pandas as pd

    stats = arm_stats(df, "objective")
    rank = {b: i for i, b in enumerate(bases or [])}
    stats = stats.assign(_rank=stats["base"].map(lambda b: rank.get(b, len(rank)))).sort_values(
        ["_rank", "base", "method", "m"], kind="stable")
    losses = arm_stats(df, "val_loss").set_index(["base", "method", "m"])
    best = best_m(df, direction)
    rows = []
    for _, r in stats.iterrows():
        if r["count"] > 1:
            value = f"{_fmt(r['mean'])} [{_fmt(r['lo'])}, {_fmt(r['hi'])}]"
        else:
            value = f"{_fmt(r['mean'])} (n=1)"
        note = []
        dus = r["method"] == "dus"
        if dus and r["m"] == r["n"] / 2:
            note.append("unchanged base")
        if dus and r["m"] == best.get(r["base"]):
            note.append("best m")
        if r["method"] == "nocpt":
            note.append("reference: the base with no CPT")
        key = (r["base"], r["method"], r["m"])
        loss = losses.loc[key, "mean"] if key in losses.index else math.nan
        method = {"dus": "DUS", "moe": "MoE", "nocpt": "no CPT"}.get(r["method"], str(r["method"]))
        rows.append({"base": r["base"], "method": method, "m": str(int(r["m"])) if dus else "-",
                     "s": str(int(r["s"])) if not math.isnan(r["s"]) else "-",
                     "params (total)": human_count(r["params_total"]),
                     "params (active)": human_count(r["params_active"]),
                     "tokens": human_count(r["tokens"]), "seeds": str(int(r["count"])),
                     f"{score} (95% CI)": value, "val loss": _fmt(float(loss)), "note": ", ".join(note)})
    return pd.DataFrame(rows)


LEFT = ("base", "method", "note", "arm", "verdict", "tied m", "held-out loss by lr (repeats)")  # text columns


def _markdown(table) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if c in LEFT else "---:" for c in cols) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _budget(x, unit: str) -> str:
    return f"{x:.3g}" if unit == "flops" else f"{int(x):,}"


def _ci(mean, lo, hi) -> str:
    if mean is None or math.isnan(mean):
        return "-"
    return f"{mean:+.4f}" + ("" if math.isnan(lo) else f" [{lo:+.4f}, {hi:+.4f}]")


def budget_tables(points, *, direction: str, bases: list[str] | None = None, unit: str = "tokens",
                  items: dict | None = None) -> dict:
    """The paired tables of the budget table ``points`` (:func:`ablate.results.load_budgets`), as DataFrames of
    text for results.md and results.tex: ``gaps`` (every arm against the control at every budget point, with
    its 95% interval and verdict), ``best`` (the best m per point against the runner-up), ``spearman``
    (rank correlation between consecutive points) and ``lr`` (the lr chosen per arm and point; empty
    without an lr grid)."""
    import pandas as pd

    rank = {b: i for i, b in enumerate(bases or [])}

    def ordered(frame):
        return frame.assign(_r=frame["base"].map(lambda b: rank.get(b, len(rank)))).sort_values(
            ["_r", "base", "budget"], kind="stable")

    gaps = stats.paired_gaps(points, "objective", direction)
    grid = gaps["lr"].notna().any()
    rows = [{"base": g["base"], "budget": _budget(g["budget"], unit), "arm": g["arm"],
             **({"lr": f"{g['lr']:g}", "control lr": f"{g['control_lr']:g}"} if grid else {}),
             "pairs": str(int(g["pairs"])), "arm − control (95% CI)": _ci(g["arm_minus_control"], g["lo"], g["hi"]),
             "verdict": g["verdict"]} for _, g in ordered(gaps).iterrows()]
    best = stats.best_m_by_budget(points, "objective", direction)
    best_rows = [{"base": b["base"], "budget": _budget(b["budget"], unit), "best m": str(int(b["best_m"])),
                  "mean": _fmt(b["best_mean"]),
                  "runner-up": "-" if math.isnan(b["runner_up_m"]) else str(int(b["runner_up_m"])),
                  "best − runner-up (95% CI)": _ci(b["best_minus_runner_up"], b["lo"], b["hi"]),
                  "verdict": b["verdict"],
                  "tied m": "-" if math.isnan(b["m_lo"]) else ", ".join(str(m) for m in b["tied"])}
                 for _, b in ordered(best).iterrows()]
    rho = stats.rank_correlation(points, "objective")
    rho_rows = [{"base": r["base"], "budget": _budget(r["budget"], unit),
                 "next budget": _budget(r["next_budget"], unit), "arms": str(int(r["arms"])),
                 "Spearman rho": _fmt(r["rho"], 2), "p": _fmt(r["p"], 2)} for _, r in ordered(rho).iterrows()]
    _, choices = stats.best_lr(points)
    lr_rows = [{"base": c["base"], "budget": _budget(c["budget"], unit), "arm": c["arm"], "lr": f"{c['lr']:g}",
                "held-out loss by lr (repeats)": c["tried"]}
               for _, c in ordered(choices).iterrows()]
    item_rows = []
    if items:  # the answer accuracies at the last budget point, with a bootstrap over items
        boot = stats.item_gaps(points, items)
        boot = boot[boot["budget"] == boot["budget"].max()] if len(boot) else boot
        item_rows = [{"base": g["base"], "budget": _budget(g["budget"], unit), "task": g["task"], "arm": g["arm"],
                      "pairs": str(int(g["pairs"])), "items": str(int(g["items"])),
                      "arm − control (95% CI)": _ci(g["arm_minus_control"], g["lo"], g["hi"]),
                      "verdict": g["verdict"]} for _, g in ordered(boot).iterrows()]
    trend = stats.gap_trend(gaps, direction)
    trend_rows = [{"base": t["base"], "arm": t["arm"],
                   "gap, first budget": f"{_signed(t['first_gap'])} at {_budget(t['first_budget'], unit)}",
                   "gap, last budget": f"{_signed(t['last_gap'])} at {_budget(t['last_budget'], unit)}",
                   "per doubling": "-" if math.isnan(t["slope"]) else _signed(t["slope"]),
                   "status": t["status"] + (f" from {_budget(t['pays_from'], unit)}" if t["status"] == "pays off"
                                            else f" at ~{_budget(t['crossover'], unit)}"
                                            if t["status"] == "extrapolated" else "")}
                  for _, t in ordered(trend.assign(budget=0)).iterrows()]
    return {"gaps": pd.DataFrame(rows), "best": pd.DataFrame(best_rows), "spearman": pd.DataFrame(rho_rows),
            "lr": pd.DataFrame(lr_rows), "items": pd.DataFrame(item_rows), "trend": pd.DataFrame(trend_rows)}


def _signed(x: float) -> str:
    return f"{x:+.4f}" if abs(x) >= 1e-3 or x == 0 else f"{x:+.1e}"


TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex(table, caption: str, label: str = "tab:results") -> str:
    align = "".join("l" if c in LEFT else "r" for c in table.columns)
    table = table.rename(columns=lambda c: c.replace("−", "-"))  # pdfLaTeX has no U+2212 without extra packages
    caption = "".join(TEX_SPECIAL.get(ch, ch) for ch in caption.replace("−", "-"))  # to_latex escapes cells only
    text = table.to_latex(index=False, escape=True, column_format=align, caption=caption, label=label)
    # a table wider than the text is scaled down to it (\\ablfit, defined at the top of results.tex)
    return text.replace("\\begin{tabular}", "\\ablfit{\\begin{tabular}").replace("\\end{tabular}", "\\end{tabular}}")


def make_figures(study_dir: str | Path, out: str | Path, *, storage: str | None = None, redundancy: bool = True,
                 device: str = "cpu", rows: int = 32, numbers_prefix: str = "") -> list[Path]:
    """Write every figure and both tables of a study to ``out``; return the written paths."""
    study_dir, out = Path(study_dir), Path(out)
    info = study_dir_info(study_dir)
    name = info.get("name", study_dir.name)
    df = load(study_dir, storage=storage)
    df = df[df["state"].isin(FINISHED)].reset_index(drop=True)  # running / waiting trials are left out
    if df.empty:
        raise UserError(f"study {name!r} in {study_dir} has no finished trials yet; run python -m ablate.study "
                        "first, or wait for its first trial")
    config = info.get("config", {})
    order = [b.get("label") or Path(b["model"].rstrip("/")).name for b in config.get("bases", [])]
    label, description, direction = objective_label(info)
    loss_label = "held-out loss after CPT (nats/token; lower is better)"
    study = open_study(study_dir, info, storage)
    points = load_points(study_dir, df, storage=storage)
    df = stats.trials_at_best_lr(df, points)  # an lr grid: each arm at the lr chosen at the last budget point
    unit = config.get("train", {}).get("budget_unit", "tokens")
    budgets = stats.scored(points)["budget"].nunique() if len(points) else 0
    grid = isinstance(config.get("train", {}).get("lr"), list)

    def optuna_figure(title: str, draw):
        if study is None:
            return plots.message_figure(title, "the study's Optuna storage cannot be opened here (trial "
                                        "folders only); pass --storage URL")
        return draw()

    def redundancy_figure():
        try:
            distances = study_redundancy(config, study_dir, rows=rows, device=device)
        except UserError as exc:  # a base that cannot load here must not cost the other figures
            print(f"warning: layer redundancy skipped: {exc}", file=sys.stderr)
            return plots.message_figure("layer redundancy", f"not available: {exc}")
        return plots.redundancy(distances, plots.best_m(df, direction))

    along = dict(label=label, direction=direction, bases=order, unit=unit)
    figures = {
        "score_vs_m": lambda: plots.score_vs_m(df, label=label, direction=direction, bases=order),
        "val_loss_vs_m": lambda: plots.score_vs_m(df, column="val_loss", label=loss_label, direction="minimize",
                                                  bases=order),
        "score_vs_params": lambda: plots.score_vs_params(df, label=label, direction=direction, bases=order),
        "score_vs_flops": lambda: plots.score_vs_flops(points, label=label, direction=direction, bases=order),
        "loss_curves": lambda: plots.loss_curves(df, read_curves(study_dir, df["trial"]), bases=order,
                                                 branches=read_branches(study_dir, df["trial"])),
        "tasks_vs_m": lambda: plots.tasks_vs_m(df, bases=order),
        "study_history": lambda: optuna_figure("optimisation history",
                                               lambda: studyplots.optimization_history(study, label=label)),
        "study_importance": lambda: optuna_figure("parameter importances",
                                                  lambda: studyplots.param_importances(study, label=label)),
        "study_timeline": lambda: optuna_figure("trial timeline", lambda: studyplots.timeline(study)),
    }
    if budgets > 1:  # the budget axis: one run per arm gave a score at every budget point
        figures["score_vs_budget"] = lambda: plots.score_vs_budget(points, **along)
        figures["gap_vs_budget"] = lambda: plots.gap_vs_budget(points, **along)
        figures["best_m_vs_budget"] = lambda: plots.best_m_vs_budget(points, **along)
    if redundancy:
        figures["redundancy"] = redundancy_figure
    import matplotlib.pyplot as plt

    written = []
    for fig_name, draw in figures.items():  # one at a time: a real study's figures need not all fit in memory
        fig = draw()
        written += plots.save(fig, out / fig_name)
        plt.close(fig)  # Optuna's figures live in pyplot's registry; closing ours is harmless
    table = results_table(df, direction=direction, bases=order)
    at = (" at the last budget point" if budgets > 1 else "") + \
        (", each arm at the lr chosen on held-out loss" if grid else "")
    caption = f"Study {name}: {description}; mean over seeds with a 95% t-interval, after the same CPT " \
              f"{'FLOPs' if unit == 'flops' else 'tokens'}{at}."
    md = [f"**{caption}**\n\n" + _markdown(table)]
    tex = ["% written by python -m ablate.figures; needs \\usepackage{booktabs,graphicx}\n"
           "\\providecommand{\\ablfit}[1]{\\sbox0{#1}\\ifdim\\wd0>\\linewidth\\resizebox{\\linewidth}{!}{\\usebox0}"
           "\\else\\usebox0\\fi}\n" + _latex(table, caption)]
    for title, tag, section in _budget_sections(points, direction=direction, bases=order, unit=unit,
                                                budgets=budgets, items=read_items(study_dir)):
        if section.empty:
            md.append(f"**{title}**\n\nNone yet: no arm has a pair with its control.\n")
            continue
        md.append(f"**{title}**\n\n" + _markdown(section))
        tex.append(_latex(section, title, label=tag))
    atomic_write_text(out / "results.md", "\n".join(md))
    atomic_write_text(out / "results.tex", "\n".join(tex))
    atomic_write_text(out / "numbers.tex", numbers_tex(df, points, direction=direction, unit=unit,
                                                       prefix=numbers_prefix))
    return written + [out / "results.md", out / "results.tex", out / "numbers.tex"]


def numbers_tex(df, points, *, direction: str, unit: str = "tokens", prefix: str = "") -> str:
    """``numbers.tex``: every number a paper's prose cites, read from the study, as ``\\ablnum{KEY}``.

    Keys (``B`` a base label, ``ARM`` an arm label such as ``DUS m=0`` or ``MoE``, ``P`` a budget point
    as written in the tables, or ``last``): ``trials`` (complete, each arm at its chosen lr), ``budgets``,
    ``last``, ``train minutes`` (the trials' summed wall time); ``B/nocpt``, ``B/control/P`` (the
    control's mean objective), ``B/arm/ARM/P`` (an arm's mean), ``B/gap/ARM/P`` (the paired gap with its
    95% interval), ``B/verdict/ARM/P``, ``B/pairs/ARM/P``, ``B/best/P`` (the best m), ``B/trend/ARM`` and
    ``B/slope/ARM`` and ``B/crossover/ARM`` (:func:`ablate.stats.gap_trend`), ``B/flops/ARM`` (CPT FLOPs
    at the last point). A key the study lacks prints as a bold ``??``, so a stale citation shows on the
    page. ``prefix`` P makes every key P/KEY, so one paper can cite several studies.
    """
    def put(key: str, value) -> str:
        key = f"{prefix.rstrip('/')}/{key}" if prefix else key
        return f"\\expandafter\\def\\csname abl@{key}\\endcsname{{{value}}}"

    def ci(mean, lo, hi) -> str:
        if math.isnan(lo):
            return _signed(mean)
        return f"{_signed(mean)} [{_signed(lo)}, {_signed(hi)}]"

    lines = ["% written by python -m ablate.figures: \\ablnum{KEY} prints one number of this study",
             "\\providecommand{\\ablnum}[1]{\\ifcsname abl@#1\\endcsname\\csname abl@#1\\endcsname"
             "\\else\\textbf{??}\\fi}"]
    done = df[df["state"] == "complete"]
    lines.append(put("trials", len(done)))
    lines.append(put("train minutes", f"{done['wall_s'].astype(float).sum() / 60:.1f}" if "wall_s" in done else "??"))
    scored = stats.scored(points) if len(points) else points
    budgets = sorted(scored["budget"].unique()) if len(scored) else []
    lines.append(put("budgets", ", ".join(_budget(b, unit) for b in budgets)))
    if budgets:
        lines.append(put("last", _budget(budgets[-1], unit)))
    nocpt = df[(df["method"] == "nocpt") & (df["state"] == "complete")]
    for base, g in nocpt.groupby("base"):
        lines.append(put(f"{base}/nocpt", _fmt(g["objective"].astype(float).mean())))
    gaps = stats.paired_gaps(points, "objective", direction) if len(points) else None
    if gaps is not None and len(gaps):
        last = gaps["budget"].max()
        for _, g in gaps.iterrows():
            for when in [_budget(g["budget"], unit)] + (["last"] if g["budget"] == last else []):
                key = f"{g['base']}/{{}}/{g['arm']}/{when}"
                lines += [put(key.format("gap"), ci(g["arm_minus_control"], g["lo"], g["hi"])),
                          put(key.format("verdict"), g["verdict"]), put(key.format("pairs"), int(g["pairs"])),
                          put(key.format("arm"), _fmt(g["arm_mean"])),
                          put(f"{g['base']}/control/{when}", _fmt(g["control_mean"]))]
        for _, t in stats.gap_trend(gaps, direction).iterrows():
            status = t["status"] + (f" from {_budget(t['pays_from'], unit)}" if t["status"] == "pays off" else
                                    f" at about {_budget(t['crossover'], unit)}" if t["status"] == "extrapolated"
                                    else "")
            if not math.isnan(t["crossover"]):
                lines.append(put(f"{t['base']}/crossover/{t['arm']}", _budget(t["crossover"], unit)))
            lines += [put(f"{t['base']}/trend/{t['arm']}", status),
                      put(f"{t['base']}/slope/{t['arm']}", "-" if math.isnan(t["slope"]) else _signed(t["slope"]))]
        for _, b in stats.best_m_by_budget(points, "objective", direction).iterrows():
            for when in [_budget(b["budget"], unit)] + (["last"] if b["budget"] == last else []):
                lines.append(put(f"{b['base']}/best/{when}", int(b["best_m"])))
    if len(scored):
        top = scored[scored["budget"] == scored["budget"].max()]
        for (base, method, m), g in top.groupby(["base", "method", top["m"].fillna(-1)]):
            lines.append(put(f"{base}/flops/{stats.arm_label(method, m)}", f"{g['flops'].astype(float).mean():.3g}"))
    return "\n".join(lines) + "\n"


def load_points(study_dir: str | Path, df, *, storage: str | None = None):
    """The budget table the figures draw from: :func:`ablate.results.load_budgets`' finished rows; for a study
    whose records predate budget points (or a copy with results.csv only), one point per complete trial of
    ``df`` (:func:`ablate.results.load`) at the tokens it trained (a pruned trial's last value is not a
    score at any point)."""
    import pandas as pd

    try:
        points = load_budgets(study_dir, storage=storage)
    except UserError:
        points = pd.DataFrame(columns=BUDGET_COLUMNS)
    points = points[points["state"].isin(FINISHED)].reset_index(drop=True)
    if len(points):
        return points
    done = df[df["state"] == "complete"]
    tokens = done["tokens"].astype(float)
    return done.assign(budget_tokens=tokens, flops_per_token=done["flops"].astype(float) / tokens.where(tokens > 0))


def _budget_sections(points, *, direction: str, bases: list[str], unit: str, budgets: int,
                     items: dict | None = None) -> list[tuple]:
    """``(caption, LaTeX label, table)`` of each paired table results.md and results.tex carry after the results
    table: the gaps to the control always, the best m and Spearman with several budget points, the lr
    choices with an lr grid."""
    if points.empty:
        return []
    tables = budget_tables(points, direction=direction, bases=bases, unit=unit, items=items)
    better = "negative" if direction == "minimize" else "positive"
    out = [(f"Paired gap to the control (DUS at m = n/2, same CPT) at each budget point: arm − control over repeats "
            f"paired by data order, each arm at its chosen lr; {better} is better. Better or worse only where the "
            "95% t interval excludes 0, else cannot be ordered.", "tab:gaps", tables["gaps"])]
    if budgets > 2:
        out.append(("Where each arm's paired gap goes with the budget: the gap at the first and the last budget point, "
                    "the least-squares change per doubling of the budget, and the status: pays off (from the first "
                    "of the last points where the 95% interval excludes 0 in the arm's favour; measured), "
                    "extrapolated (behind at the last point, and the straight line in log budget reaches 0 at the "
                    "budget given: an extrapolation, not a measurement), or no crossover in sight.", "tab:trend",
                    tables["trend"]))
    if budgets > 1:
        out.append(("The best m at each budget point against the runner-up (paired, 95% t interval); tied m: the m "
                    "whose paired interval with the best covers 0.", "tab:best-m", tables["best"]))
        out.append(("Spearman's rank correlation of the arms' mean objectives between consecutive budget points "
                    "(p exact up to 8 arms): does an early budget predict the later ranking?", "tab:spearman",
                    tables["spearman"]))
    if len(tables["items"]):
        out.append(("Answer accuracy per level k at the last budget point: arm − control, paired by repeat, with a "
                    "95% bootstrap interval over the evaluation items (2,000 draws; the seeds are not resampled); "
                    "positive is better.", "tab:items", tables["items"]))
    if len(tables["lr"]):
        out.append(("The learning rate of each arm at each budget point, chosen on held-out loss (never on the "
                    "evaluation items).", "tab:lr", tables["lr"]))
    return out


@cli
def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m ablate.figures", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a study's figures (PDF + PNG) and results tables (LaTeX + Markdown).",
        epilog="examples:\n  python -m ablate.figures --study default --out paper/figures\n"
               "  python -m ablate.figures --study runs/default --out /tmp/fig --no-redundancy")
    parser.add_argument("--study", required=True, help="a study folder, or a study name under --runs")
    parser.add_argument("--runs", default="runs", help="folder of study folders (default runs/)")
    parser.add_argument("--storage", default=None, help="Optuna storage URL, when study.json's is redacted or moved")
    parser.add_argument("--out", required=True, help="folder for the figures and tables (created)")
    parser.add_argument("--no-redundancy", action="store_true", help="skip the layer-redundancy figure (it loads "
                        "every base model once; cached in <study>/redundancy.json)")
    parser.add_argument("--device", default="auto", help="device for the redundancy pass: auto, cpu, cuda")
    parser.add_argument("--rows", type=int, default=32, help="held-out rows for the redundancy pass (default 32)")
    parser.add_argument("--numbers-prefix", default="", metavar="P",
                        help="numbers.tex keys become P/KEY (one paper citing several studies)")
    args = parser.parse_args(argv)
    if args.rows < 1:
        raise UserError(f"--rows {args.rows}: use at least one held-out row, e.g. --rows 32")
    import matplotlib  # lazy: the backend must be chosen before pyplot is first imported

    matplotlib.use("Agg")  # files only; no display needed
    study_dir = resolve_study_dir(args.study, args.runs)
    check_writable(Path(args.out))  # --out naming a file, or a folder that cannot be written: one line now
    device = resolve_device(args.device) if not args.no_redundancy else "cpu"
    paths = make_figures(study_dir, args.out, storage=args.storage, redundancy=not args.no_redundancy,
                         device=device, rows=args.rows, numbers_prefix=args.numbers_prefix)
    print(f"wrote {len(paths)} files to {args.out}")
    return 0


if __name__ == "__main__":
    main()
