"""The figures of a study: pure functions from the results table to a matplotlib Figure.

Each function takes the :func:`ablate.results.load` table (or an Optuna study, or
cached numbers) and returns a Figure sized for one column of a paper (3.4 in wide, one
panel per base model stacked), in seaborn's colour-blind-safe palette, with markers and
line styles that still tell the arms apart in greyscale. Only complete trials give
scores; a panel without enough trials says so instead of failing. :func:`save` writes
PDF and PNG byte-identically for the same input. Nothing here reads files or trains.
"""

from __future__ import annotations

import contextlib
import math
import textwrap

import numpy as np

from ablate import stats
from ablate.redundancy import dus_layers

__all__ = ["arm_stats", "best_m", "human_count", "task_metrics", "score_vs_m", "score_vs_params", "loss_curves",
           "tasks_vs_m", "task_intervals", "score_vs_budget", "gap_vs_budget", "best_m_vs_budget", "score_vs_flops",
           "redundancy", "message_figure", "save", "style"]
# palette, finish and wrap are public too: the figure helpers that ablate.studyplots shares

COLUMN_IN = 3.4  # one column of a two-column paper (ICML, NeurIPS, ACL: 3.25-3.5 in)
PANEL_IN = 2.3  # height of one panel: room for two x axes (m below, s above)
FONT_PT = 8  # smallest size still legible in print at column width
CONFIDENCE = 0.95
PNG_DPI = 200  # PNGs are for screens and notes (680 px at column width); print uses the vector PDF


def palette() -> list:
    """Seaborn's colour-blind-safe palette as hex colours, the colours of every figure here."""
    import seaborn as sns

    return sns.color_palette("colorblind").as_hex()


def _arm_style() -> dict:
    p = palette()
    return {"dus": dict(color=p[0], marker="o", ls="-"), "control": dict(color=p[7], marker="s", ls="--"),
            "moe": dict(color=p[1], marker="^", ls=":")}


BUILT_IN = ("dus", "moe", "nocpt")  # every other method is a layer-plan operator, named by its spelling
OPERATOR_MARKERS = ("D", "v", "P", "X", "<", ">", "h", "p")


def _operator_styles(methods) -> dict[str, dict]:
    """Per layer-plan operator (a method spelt like ``llama_pro(2)``): a colour of its own (from the palette
    colours DUS, the control and MoE leave free) and a marker per family, so one family's operators share a
    marker and a line in the score-vs-layers figure."""
    p = palette()
    colours = [p[i] for i in (2, 3, 4, 5, 6, 8, 9)]
    ops = sorted({m for m in methods if isinstance(m, str) and m not in BUILT_IN})
    families = sorted({op.split("(")[0] for op in ops})
    return {op: dict(color=colours[i % len(colours)], ls="-.",
                     marker=OPERATOR_MARKERS[families.index(op.split("(")[0]) % len(OPERATOR_MARKERS)])
            for i, op in enumerate(ops)}


def _m_colours(ms):
    """Norm and colour map of DUS m (viridis: sequential, colour-blind safe, monotone in greyscale; its pale
    yellow end cut off, unreadable on white)."""
    import matplotlib as mpl

    ms = [float(m) for m in ms]
    norm = mpl.colors.Normalize(vmin=min(ms) if ms else 0, vmax=max(max(ms), min(ms) + 1) if ms else 1)
    return norm, mpl.colors.ListedColormap(mpl.colormaps["viridis"](np.linspace(0, 0.85, 256)))


def _m_colorbar(fig, ax, norm, cmap) -> None:
    import matplotlib as mpl
    from matplotlib.ticker import MaxNLocator

    bar = fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.02, aspect=25)
    bar.set_label("m (DUS)")
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()


@contextlib.contextmanager
def style():
    """Matplotlib settings of every figure here, applied only inside the block."""
    import matplotlib as mpl
    import seaborn as sns

    rc = {**sns.axes_style("ticks"), **sns.plotting_context("paper")}
    rc.update({"font.family": "sans-serif", "font.sans-serif": ["DejaVu Sans"],  # ships with matplotlib
               "font.size": FONT_PT, "axes.labelsize": FONT_PT, "axes.titlesize": FONT_PT,
               "xtick.labelsize": FONT_PT - 1, "ytick.labelsize": FONT_PT - 1, "legend.fontsize": FONT_PT - 1,
               "axes.spines.top": False, "axes.spines.right": False, "lines.markersize": 4,
               "pdf.fonttype": 42,  # TrueType, not Type 3: editable text, and accepted by IEEE/ACM checkers
               "svg.hashsalt": "ablate",  # fixed ids, so an SVG saved by hand is reproducible too
               "savefig.dpi": PNG_DPI, "figure.dpi": 100})
    with mpl.rc_context(rc):
        yield


def _figure(rows: int, height: float = PANEL_IN, width: float = COLUMN_IN):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    return fig, list(axes)


def finish(fig) -> None:
    """Fix the tick style of every axes now: ticks are made lazily at draw time, maybe outside :func:`style`."""
    import matplotlib as mpl

    rc = mpl.rcParams
    for ax in fig.axes:
        for a in [ax, *ax.child_axes]:
            for axis in ("x", "y"):
                a.tick_params(axis=axis, which="major", labelsize=rc[f"{axis}tick.labelsize"],
                              length=rc[f"{axis}tick.major.size"], width=rc[f"{axis}tick.major.width"],
                              color=rc[f"{axis}tick.color"], labelcolor=rc[f"{axis}tick.color"])


def _message(ax, text: str) -> None:
    ax.text(0.5, 0.5, "\n".join(textwrap.wrap(text, 40)), ha="center", va="center", transform=ax.transAxes,
            fontsize=FONT_PT, color="0.3")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def message_figure(title: str, text: str):
    """A one-panel Figure saying why a figure could not be drawn (e.g. not enough trials)."""
    with style():
        fig, (ax,) = _figure(1, height=1.6)
        ax.set_title(title)
        _message(ax, text)
        finish(fig)
    return fig


def _t_half(sd: float, count: int) -> float:
    """Half-width of the two-sided t interval of a mean (NaN with one value)."""
    if count < 2:
        return math.nan
    from scipy.stats import t

    return float(t.ppf(0.5 + CONFIDENCE / 2, count - 1) * sd / math.sqrt(count))


def _complete(df, column: str | None = None):
    done = df[(df["state"] == "complete") & df["base"].notna()]
    return done[done[column].notna()] if column is not None else done


def arm_stats(df, column: str = "objective"):
    """Per (base, method, m) over complete trials: count, mean, sd, t-interval lo/hi, sizes.

    ``m`` is NaN for MoE. ``half`` (and lo/hi) is NaN with a single trial.
    """
    import pandas as pd

    done = _complete(df, column)
    rows = []
    for (base, method, m), g in done.groupby(["base", "method", done["m"].astype(float).fillna(-1)], sort=True):
        values = g[column].astype(float)
        count, mean = len(values), float(values.mean())
        sd = float(values.std(ddof=1)) if count > 1 else math.nan
        half = _t_half(sd, count)
        n = float(g["n"].dropna().iloc[0]) if g["n"].notna().any() else math.nan
        rows.append({"base": base, "method": method, "m": math.nan if m < 0 else m, "n": n,
                     "s": g["s"].astype(float).mean(), "count": count, "mean": mean, "sd": sd, "half": half,
                     "lo": mean - half, "hi": mean + half,
                     "params_total": g["params_total"].astype(float).mean(),
                     "params_active": g["params_active"].astype(float).mean(),
                     "tokens": g["tokens"].astype(float).mean()})
    columns = ["base", "method", "m", "n", "s", "count", "mean", "sd", "half", "lo", "hi", "params_total",
               "params_active", "tokens"]
    return pd.DataFrame(rows, columns=columns)


def _bases(df, bases: list[str] | None) -> list[str]:
    """``bases`` (the study's order, each gets a panel even before its first trial), then any others in ``df``."""
    seen = sorted(str(b) for b in df["base"].dropna().unique())
    return list(bases) + [b for b in seen if b not in bases] if bases else seen


def _base_panels(axes, bases: list[str], points, table, empty: str, title=None):
    """For each base's panel of a figure with one panel per base: ``(ax, base, n, its rows of table)``,
    the panel titled (``title(base, n)``, default "base (n = n)"); a base without rows gets ``empty``
    written on its panel and is skipped."""
    for ax, base in zip(axes, bases, strict=True):
        n = _depth(points, base)
        ax.set_title(title(base, n) if title else f"{base} (n = {n})" if n else base)
        mine = table[table["base"] == base]
        if mine.empty:
            _message(ax, empty)
            continue
        yield ax, base, n, mine


def _depth(df, base: str) -> int | None:
    n = df.loc[df["base"] == base, "n"].dropna()
    return int(n.iloc[0]) if len(n) else None


def _best(stats, direction: str):
    """The row of ``stats`` with the best mean (None when empty)."""
    if stats.empty:
        return None
    return stats.loc[stats["mean"].idxmin() if direction == "minimize" else stats["mean"].idxmax()]


def best_m(df, direction: str, column: str = "objective") -> dict[str, int | None]:
    """Per base, the DUS m with the best mean over complete trials."""
    stats = arm_stats(df, column)
    out = {}
    for base in _bases(df, None):
        row = _best(stats[(stats["base"] == base) & (stats["method"] == "dus")], direction)
        out[base] = int(row["m"]) if row is not None else None
    return out


def wrap(label: str, width: int = 38) -> str:
    """``label`` broken into lines of at most ``width`` characters, for an axis label."""
    return "\n".join(textwrap.wrap(label, width))


def _m_ticks(ax, n: int, values) -> None:
    """Integer m ticks below and the matching depths s = 2(n - m) above."""
    from matplotlib.ticker import MaxNLocator

    lo, hi = min(values), max(values)
    ticks = [t for t in MaxNLocator(nbins=6, integer=True).tick_values(lo, hi) if lo <= t <= hi]
    ax.set_xlim(lo - 0.5, hi + 0.5)
    ax.set_xticks(ticks)
    sec = ax.secondary_xaxis("top", functions=(lambda m: 2 * (n - m), lambda s: n - s / 2))
    sec.set_xticks([2 * (n - t) for t in ticks])
    sec.set_xlabel("layers after DUS, s = 2(n − m)")
    ax.set_xlabel("layers removed from each copy, m")


def _shared_ylabel(fig, label: str) -> None:
    """One y label for every panel of ``fig`` (panels that share the quantity on y), centred on the figure's
    height: a label as long as two panels, where each panel's own label ran past its panel into the title."""
    fig.supylabel(wrap(label, 60), fontsize=FONT_PT)


def _legend(fig, ncols: int = 1) -> None:
    handles = {}
    for ax in fig.axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=ncols, frameon=False)


def _reference(ax, row, label: str, arm: dict) -> None:
    ax.axhline(row["mean"], color=arm["color"], ls=arm["ls"], lw=1, label=label, zorder=1)
    if not math.isnan(row["half"]):
        ax.axhspan(row["lo"], row["hi"], color=arm["color"], alpha=0.15, lw=0, zorder=0)


def score_vs_m(df, *, column: str = "objective", label: str = "objective", direction: str = "minimize",
               bases: list[str] | None = None):
    """Score against m per base: DUS mean and 95% t-interval over seeds, control and MoE as bands."""
    stats = arm_stats(df, column)
    arms = _arm_style()
    bases = _bases(df, bases)
    if not bases:
        return message_figure(label, "not enough trials: no trial has a base model yet")
    with style():
        fig, axes = _figure(len(bases))
        for ax, base in zip(axes, bases, strict=True):
            n = _depth(df, base)
            ax.set_title(f"{base} (n = {n})" if n else base)
            mine = stats[stats["base"] == base]
            dus = mine[mine["method"] == "dus"].sort_values("m")
            if dus.empty or n is None:
                _message(ax, "not enough trials: no complete DUS trial of this base yet")
                continue
            pts = _complete(df, column)
            pts = pts[(pts["base"] == base) & (pts["method"] == "dus")]
            ax.errorbar(dus["m"], dus["mean"], yerr=dus["half"].fillna(0), color=arms["dus"]["color"],
                        marker="o", ms=3, capsize=2, lw=1, zorder=3, label=f"DUS, mean ± {CONFIDENCE:.0%} CI")
            ax.scatter(pts["m"].astype(float), pts[column].astype(float), s=6, color=arms["dus"]["color"],
                       alpha=0.4, lw=0, zorder=2, label="DUS, one seed")
            control = dus[dus["m"] == n / 2]
            if len(control):
                _reference(ax, control.iloc[0], "unchanged base (m = n/2), same CPT", arms["control"])
            moe = mine[mine["method"] == "moe"]
            if len(moe):
                _reference(ax, moe.iloc[0], "MoE upcycle, same CPT", arms["moe"])
            at_depth = []  # operators at their depth s (x = n - s/2 on the m axis): a line per family
            styles = _operator_styles(mine["method"])
            ops = mine[mine["method"].isin(list(styles))]
            ops = ops.assign(_x=n - ops["s"].astype(float) / 2)
            for family, g in ops.groupby(ops["method"].str.split("(").str[0], sort=True):
                g = g.sort_values("_x")
                kw = styles[g["method"].iloc[0]]
                ax.errorbar(g["_x"], g["mean"], yerr=g["half"].fillna(0), color=kw["color"], marker=kw["marker"],
                            ms=4, ls=kw["ls"], capsize=2, lw=1, zorder=3, label=f"{family}, same CPT (at its depth s)")
                for _, row in g.iterrows():
                    ax.annotate(row["method"].removeprefix(family), (row["_x"], row["mean"]), xytext=(2, -8),
                                textcoords="offset points", fontsize=FONT_PT - 3, color=kw["color"])
                at_depth += g["_x"].tolist()
            if n % 4 == 0 and dus["m"].min() <= n / 4 <= dus["m"].max():
                ax.axvline(n / 4, color="0.6", ls=":", lw=0.8, zorder=0, label="SOLAR's choice, m = n/4")
            best = _best(dus, direction)
            ax.plot([best["m"]], [best["mean"]], marker="*", ms=9, color=arms["dus"]["color"], mec="black",
                    mew=0.5, ls="none", zorder=4, label="best m")
            _m_ticks(ax, n, dus["m"].tolist() + ([n / 2] if len(control) else []) + at_depth)
            ax.set_ylabel(wrap(label))
        _legend(fig)
        finish(fig)
    return fig


def _pareto(points: list[tuple[float, float]], direction: str) -> list[tuple[float, float]]:
    """Points no other point beats on both size (fewer) and score (per ``direction``)."""
    sign = 1 if direction == "minimize" else -1
    front, best = [], math.inf
    for x, y in sorted(points, key=lambda p: (p[0], sign * p[1])):
        if sign * y < best:
            front.append((x, y))
            best = sign * y
    return front


def _log_x(ax) -> None:
    """A log x axis labelled 1.2M, 5B, ...: ticks at 1, 2 and 5 per decade, or plain ticks inside one decade
    (where matplotlib's log ticks crowd)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)) if hi > 10 * lo else MaxNLocator(nbins=4))
    ax.xaxis.set_major_formatter(FuncFormatter(human_count))
    ax.xaxis.set_minor_formatter(NullFormatter())


def human_count(x: float, _pos=None) -> str:
    """1234567 -> '1.23M' (3 significant digits; k, M, B, T, then 1.23e+15); a matplotlib tick formatter too."""
    if x is None or math.isnan(x):
        return "-"
    if abs(x) >= 1e15:  # FLOPs: 1.2e+20 reads better than a pile of suffixes
        return f"{x:.3g}"
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def score_vs_params(df, *, column: str = "objective", label: str = "objective", direction: str = "minimize",
                    bases: list[str] | None = None):
    """Score against total and against active parameters; control, MoE and Pareto front marked."""
    stats = arm_stats(df, column)
    stats = stats[stats["method"] != "nocpt"]  # the no-CPT reference is not an arm: off the front too
    if stats.empty:
        return message_figure(label, "not enough trials: no complete trial yet")
    bases = _bases(df, bases)
    colours = {b: palette()[i % 10] for i, b in enumerate(bases)}
    with style():
        fig, axes = _figure(2)
        for ax, size in zip(axes, ("params_total", "params_active"), strict=True):
            for base in bases:
                mine = stats[stats["base"] == base]
                n = _depth(df, base)
                control = mine["m"] == (n / 2 if n else -1)
                kinds = (("DUS", (mine["method"] == "dus") & ~control, "o", 3),
                         ("unchanged base", control, "s", 4), ("MoE upcycle", mine["method"] == "moe", "^", 5)) + \
                    tuple((op, mine["method"] == op, kw["marker"], 4)
                          for op, kw in _operator_styles(mine["method"]).items())
                for kind, mask, marker, ms in kinds:
                    sel = mine[mask]
                    if sel.empty:
                        continue
                    ax.errorbar(sel[size], sel["mean"], yerr=sel["half"].fillna(0), color=colours[base],
                                marker=marker, ms=ms, ls="none", capsize=1.5, lw=0.8, zorder=3,
                                label=f"{base}: {kind}")
                for _, row in mine[(mine["method"] == "dus") & ~control].iterrows():
                    ax.annotate(f"{int(row['m'])}", (row[size], row["mean"]), xytext=(2, 2),
                                textcoords="offset points", fontsize=FONT_PT - 3, color="0.3")
            front = _pareto(list(zip(stats[size], stats["mean"], strict=True)), direction)
            xs, ys = zip(*front, strict=True)
            ax.step(xs, ys, where="post", color="black", lw=0.7, zorder=2, label="Pareto front")
            ax.scatter(xs, ys, s=80, facecolors="none", edgecolors="black", lw=0.7, zorder=4)
            _log_x(ax)
            ax.set_xlabel(f"{'total' if size == 'params_total' else 'active'} parameters (log scale)")
        _shared_ylabel(fig, label)
        axes[0].set_title("numbers: m of each DUS variant", fontsize=FONT_PT - 1, color="0.3")
        _legend(fig)
        finish(fig)
    return fig


def _symlog_ticks(first: float, last: float) -> list[float]:
    """Ticks of a symlog axis linear up to ``first``: 0, then 1, 2, 5 per decade from ``first`` to ``last``
    (1 per decade when that gives more than 5), none inside the linear part, where they would crowd."""
    lo, hi = math.floor(math.log10(first)), math.ceil(math.log10(max(last, first)))
    for subs in ((1, 2, 5), (1,)):
        ticks = [v * 10.0 ** k for k in range(lo, hi + 1) for v in subs if first <= v * 10.0 ** k <= last]
        if len(ticks) <= 5:
            break
    return [0.0, *ticks]


def loss_curves(df, curves: dict[int, object], *, bases: list[str] | None = None,
                branches: dict[int, object] | None = None):
    """Held-out loss during CPT against tokens: a line per trial coloured by m, control and MoE distinct.

    ``curves`` maps trial number -> DataFrame with ``tokens`` and ``val_loss`` (rows of
    ``metrics.jsonl`` of the main run that have a held-out loss: every evaluation, the early ones of
    ``train.eval_early`` too, each a dot). The x axis is linear up to the first evaluation after 0 and
    logarithmic beyond (symlog), so the jump and recovery of the first steps after surgery are as wide
    as the rest of the run. Pruned trials end in an x.
    ``branches`` (schedule wsd) maps trial number -> DataFrame with ``fork_tokens``, ``tokens`` and
    ``val_loss``: each cooldown branch, drawn as a dotted offshoot from the main curve at its fork to
    the held-out loss it reached at its budget point.
    """
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogFormatter, NullLocator

    runs = df[df["state"].isin(["complete", "pruned"]) & df["base"].notna() & df["trial"].isin(list(curves))]
    firsts = [float(c["tokens"][c["tokens"] > 0].min()) for c in curves.values() if (c["tokens"] > 0).any()]
    bases = _bases(runs, bases)
    if runs.empty:
        return message_figure("CPT loss curves", "not enough trials: no finished trial with a metrics.jsonl yet")
    arms = _arm_style()
    with style():
        fig, axes = _figure(len(bases))
        for ax, base in zip(axes, bases, strict=True):
            n = _depth(df, base)
            mine = runs[runs["base"] == base].sort_values("trial")
            if mine.empty:
                ax.set_title(base)
                _message(ax, "not enough trials: no finished trial of this base with a metrics.jsonl yet")
                continue
            control = (mine["method"] == "dus") & (mine["m"] == (n / 2 if n else -1))
            ms = mine.loc[(mine["method"] == "dus") & ~control, "m"].astype(float)
            norm, cmap = _m_colours(ms)
            for (_, row), is_control in zip(mine.iterrows(), control, strict=True):
                c = curves[int(row["trial"])]
                if row["method"] == "moe":
                    kw = dict(color=arms["moe"]["color"], ls="-.", lw=1.2, label="MoE upcycle")
                elif is_control:
                    kw = dict(color="0.35", ls="--", lw=1.2, label="unchanged base (m = n/2)")
                else:
                    kw = dict(color=cmap(norm(row["m"])), ls="-", lw=0.9)
                ax.plot(c["tokens"], c["val_loss"], zorder=3, marker="o", ms=1.8, **kw)  # a dot per evaluation
                if row["state"] == "pruned":
                    ax.plot(c["tokens"].iloc[-1:], c["val_loss"].iloc[-1:], marker="x", color=kw["color"],
                            ls="none", zorder=4, label="pruned (stopped early)")
                shoots = (branches or {}).get(int(row["trial"]))
                for _, b in (shoots.iterrows() if shoots is not None else ()):
                    start = float(np.interp(b["fork_tokens"], c["tokens"], c["val_loss"]))
                    ax.plot([b["fork_tokens"], b["tokens"]], [start, b["val_loss"]], color=kw["color"], ls=":",
                            lw=0.8, zorder=3)
                    ax.plot([b["tokens"]], [b["val_loss"]], color=kw["color"], marker="o", ms=2.5, ls="none",
                            zorder=4, label="cooldown branch to a budget point")
            if len(ms):
                _m_colorbar(fig, ax, norm, cmap)
            ax.set_title(f"{base} (n = {n})" if n else base)
            ax.set_yscale("log")  # the fresh variant's loss can start far above where it settles
            ax.yaxis.set_major_formatter(LogFormatter())
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
            if firsts:  # linear from 0 to the first evaluation, log beyond: the early evaluations spread out
                ax.set_xscale("symlog", linthresh=min(firsts), linscale=0.4)
                ax.xaxis.set_major_locator(FixedLocator(_symlog_ticks(min(firsts), ax.get_xlim()[1])))
                ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(FuncFormatter(human_count))
            ax.set_xlabel("CPT tokens (log scale after the first evaluation)" if firsts else "CPT tokens")
            ax.set_ylabel("held-out loss (nats/token, log)")
        _legend(fig)
        finish(fig)
    return fig


def task_metrics(columns) -> list[str]:
    """One metric column per lm-eval task: acc_norm where the task has it, else acc, else its first metric.

    Standard errors are left out, filtered ones too (``gsm8k/exact_match_stderr,strict-match``).
    """
    by_task: dict[str, list[str]] = {}
    for col in columns:
        if "/" in col and not col.split(",", 1)[0].endswith("_stderr"):
            task, metric = col.split("/", 1)
            by_task.setdefault(task, []).append(metric)
    out = []
    for task, metrics in sorted(by_task.items()):
        pick = next((m for m in ("acc_norm", "acc") if m in metrics), sorted(metrics)[0])
        out.append(f"{task}/{pick}")
    return out


def _stderr_column(metric: str) -> str:
    """lm-eval's standard error column of ``metric``: ``a/acc`` -> ``a/acc_stderr``, a filter kept after the
    comma (``c/exact_match,strict-match`` -> ``c/exact_match_stderr,strict-match``)."""
    name, comma, filt = metric.partition(",")
    return f"{name}_stderr{comma}{filt}"


def _items(done, metric: str) -> int | None:
    """How many items ``metric`` is a fraction correct over, from lm-eval's binomial standard error
    sqrt(p (1 - p) / (n - 1)) of a trial with 0 < p < 1 (the same items in every trial); None without one."""
    col = _stderr_column(metric)
    if col not in done:
        return None
    p, se = done[metric].astype(float), done[col].astype(float)
    ok = (p > 0) & (p < 1) & (se > 0)
    if not ok.any():
        return None
    return int(round(float((1 + p[ok] * (1 - p[ok]) / se[ok] ** 2).median())))


def _wilson(p: float, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion ``p`` of ``n`` items (sensible at p = 0 or 1 too)."""
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + CONFIDENCE / 2))
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def task_intervals(done, metric: str):
    """Per m of the DUS trials ``done``: ``metric``'s mean and 95% interval, as a DataFrame with ``m``, ``mean``,
    ``lo``, ``hi``, ``count`` (trials) and ``kind``: "repeats" (a t interval over the trials, with two or
    more), "items" (one trial: the Wilson interval over the evaluation items, their number read off
    lm-eval's standard error) or "none" (one trial and no standard error to read)."""
    import pandas as pd

    n_items = _items(done, metric)
    rows = []
    for m, g in done.groupby(done["m"].astype(float), sort=True):
        values = g[metric].dropna().astype(float)
        if values.empty:
            continue
        mean, count = float(values.mean()), len(values)
        if count > 1:
            half = _t_half(float(values.std(ddof=1)), count)
            lo, hi, kind = mean - half, mean + half, "repeats"
        elif n_items is not None and 0 <= mean <= 1:
            (lo, hi), kind = _wilson(mean, n_items), "items"
        else:
            lo = hi = mean
            kind = "none"
        rows.append({"m": m, "mean": mean, "lo": lo, "hi": hi, "count": count, "kind": kind, "items": n_items})
    return pd.DataFrame(rows, columns=["m", "mean", "lo", "hi", "count", "kind", "items"])


TASK_BARS = {"repeats": ("-", f"bars: {CONFIDENCE:.0%} t interval over the repeats"),
             "items": (":", f"dotted bars (one repeat): {CONFIDENCE:.0%} Wilson interval over the items")}


def tasks_vs_m(df, *, bases: list[str] | None = None):
    """Per base, each task's metric against m (mean over seeds), to see which tasks depth helps; error bars:
    the 95% t interval over the repeats of an m, or with one repeat the 95% Wilson interval over the
    evaluation items (:func:`task_intervals`); the legend says which bars are which."""
    done = _complete(df)
    metrics = [c for c in task_metrics(df.columns) if done[c].notna().any()]
    bases = _bases(done, bases)
    if not metrics or not bases:
        return message_figure("task metrics by m", "not enough trials: no complete trial has task metrics yet")
    colours = palette()
    markers = "osD^v<>pPX"
    kinds = set()
    with style():
        fig, axes = _figure(len(bases))
        for ax, base in zip(axes, bases, strict=True):
            n = _depth(df, base)
            ax.set_title(f"{base} (n = {n})" if n else base)
            dus = done[(done["base"] == base) & (done["method"] == "dus")]
            if dus.empty or n is None:
                _message(ax, "not enough trials: no complete DUS trial of this base yet")
                continue
            for i, metric in enumerate(metrics):
                table = task_intervals(dus, metric)
                if table.empty:
                    continue
                x = table["m"] + 0.08 * (i - (len(metrics) - 1) / 2)  # dodged: the bars of one m do not overlap
                c = colours[i % 10]
                ax.plot(x, table["mean"], color=c, marker=markers[i % 10], ms=3, lw=1, zorder=3, label=metric)
                for kind, (ls, _) in TASK_BARS.items():
                    sel = table["kind"] == kind
                    if sel.any():
                        bars = ax.errorbar(x[sel], table.loc[sel, "mean"], ls="none", color=c, capsize=1.5, lw=0.8,
                                           yerr=[table.loc[sel, "mean"] - table.loc[sel, "lo"],
                                                 table.loc[sel, "hi"] - table.loc[sel, "mean"]], zorder=2)
                        bars.lines[2][0].set_linestyle(ls)
                        kinds.add(kind)
            if dus["m"].min() <= n / 2 <= dus["m"].max():
                ax.axvline(n / 2, color="0.5", ls="--", lw=0.8, zorder=0, label="m = n/2 (unchanged base)")
            _m_ticks(ax, n, dus["m"].astype(float).tolist())
            all_acc = all(m.split("/", 1)[1] in ("acc", "acc_norm") for m in metrics)
            ax.set_ylabel("accuracy (fraction correct)" if all_acc else "task metric")
        for kind in sorted(kinds):  # the legend says what the bars are
            ls, text = TASK_BARS[kind]
            axes[-1].plot([], [], color="0.3", ls=ls, lw=0.8, marker="_", ms=5, label=text)
        _legend(fig)
        finish(fig)
    return fig


def _budget_axis(ax, budgets, unit: str) -> None:
    """Log x axis with a tick at every budget point."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log")
    budgets = sorted(set(float(b) for b in budgets))
    ax.xaxis.set_major_locator(FixedLocator(budgets))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(human_count))
    if len(budgets) > 1:
        pad = (budgets[-1] / budgets[0]) ** 0.08
        ax.set_xlim(budgets[0] / pad, budgets[-1] * pad)
    ax.set_xlabel("CPT budget, training FLOPs (log scale)" if unit == "flops" else "CPT budget, tokens (log scale)")


def _dodge(i: int, k: int) -> float:
    """A factor that moves the i-th of k series a little along a log x axis, so their error bars do not overlap."""
    return 1.03 ** (i - (k - 1) / 2)


def _no_cpt(points, column: str) -> dict:
    """base -> the no-CPT reference's mean ``column`` (its one trial per base)."""
    ref = points[(points["method"] == "nocpt") & (points["state"] == "complete") & points[column].notna()]
    return {b: float(g[column].astype(float).mean()) for b, g in ref.groupby("base")}


def score_vs_budget(points, *, column: str = "objective", label: str = "objective", direction: str = "minimize",
                    bases: list[str] | None = None, unit: str = "tokens"):
    """Score against the CPT budget (log x) per base: every arm's mean and 95% t interval over repeats at each
    budget point, at its chosen lr; the control highlighted, the no-CPT reference a horizontal line.

    ``points`` is the budget table (:func:`ablate.results.load_budgets`). DUS arms are coloured by m.
    """
    means = stats.arm_means(points, column)
    nocpt = _no_cpt(points, column)
    bases = _bases(points[stats.is_arm(points["method"])], bases)
    if means.empty or not bases:
        return message_figure(label, "not enough trials: no budget point of any arm has a score yet")
    arms = _arm_style()
    with style():
        fig, axes = _figure(len(bases))
        for ax, base, n, mine in _base_panels(axes, bases, points, means,
                                               "not enough trials: no budget point of this base has a score yet"):
            is_control = (mine["method"] == "dus") & (mine["m"] == (n / 2 if n else -1))
            dus = mine[(mine["method"] == "dus") & ~is_control]
            norm, cmap = _m_colours(dus["m"].unique())
            series = [(f"DUS m={int(m)}", g, dict(color=cmap(norm(m)), marker="o", ls="-", lw=0.9, ms=3))
                      for m, g in dus.groupby("m")]
            series.append(("unchanged base (m = n/2), same CPT", mine[is_control],
                           dict(color=arms["control"]["color"], marker="s", ls="--", lw=1.6, ms=4, zorder=5)))
            series.append(("MoE upcycle, same CPT", mine[mine["method"] == "moe"],
                           dict(color=arms["moe"]["color"], marker="^", ls=":", lw=1.2, ms=4)))
            series += [(f"{op}, same CPT", mine[mine["method"] == op], dict(lw=1.2, ms=4, **kw))
                       for op, kw in _operator_styles(mine["method"]).items()]
            series = [s for s in series if len(s[1])]
            for i, (name, g, kw) in enumerate(series):
                g = g.sort_values("budget")
                ax.errorbar(g["budget"] * _dodge(i, len(series)), g["mean"], yerr=g["half"].fillna(0), capsize=1.5,
                            label=None if name.startswith("DUS m=") else name, **{"zorder": 3, **kw})
            if base in nocpt:
                ax.axhline(nocpt[base], color="black", ls=":", lw=0.8, zorder=1, label="no CPT (the base as it is)")
            if len(dus):
                _m_colorbar(fig, ax, norm, cmap)
            _budget_axis(ax, mine["budget"], unit)
            ax.set_ylabel(wrap(label))
        _legend(fig)
        finish(fig)
    return fig


def gap_vs_budget(points, *, column: str = "objective", label: str = "objective", direction: str = "minimize",
                  bases: list[str] | None = None, unit: str = "tokens"):
    """The paired gap to the control (arm - control, same repeat) against the budget per base: a line per DUS m
    and the MoE upcycle, with its 95% t interval as a band, the control at zero. Filled markers: the
    interval excludes zero (the arm is ordered against the control); hollow: it cannot be ordered."""
    gaps = stats.paired_gaps(points, column, direction)
    bases = _bases(points[stats.is_arm(points["method"])], bases)
    if gaps.empty or not bases:
        return message_figure("gap to the control", "not enough trials: no arm has a pair with its control "
                              "(m = n/2, same repeat) at any budget point yet")
    arms = _arm_style()
    better = "negative" if direction == "minimize" else "positive"
    with style():
        fig, axes = _figure(len(bases))
        for ax, _base, _n, mine in _base_panels(
                axes, bases, points, gaps[gaps["pairs"] > 0],
                "not enough trials: no arm of this base has a pair with its control yet",
                title=lambda base, n: f"{base} (n = {n}): {better} is better than the control" if n else base):
            dus = mine[mine["method"] == "dus"]
            norm, cmap = _m_colours(dus["m"].unique())
            series = [(g, dict(color=cmap(norm(m)), marker="o", ls="-", lw=0.9)) for m, g in dus.groupby("m")]
            moe = mine[mine["method"] == "moe"]
            if len(moe):
                series.append((moe, dict(color=arms["moe"]["color"], marker="^", ls=":", lw=1.2,
                                         label="MoE upcycle − control")))
            series += [(mine[mine["method"] == op], dict(lw=1.2, label=f"{op} − control", **kw))
                       for op, kw in _operator_styles(mine["method"]).items()]
            for i, (g, kw) in enumerate(series):
                g = g.sort_values("budget")
                x = g["budget"] * _dodge(i, len(series))
                ax.plot(x, g["arm_minus_control"], ms=0, zorder=3, **kw)
                ax.fill_between(x, g["lo"], g["hi"], color=kw["color"], alpha=0.15, lw=0, zorder=1)
                ordered = ~g["verdict"].isin(["cannot be ordered", "one pair: no interval", "no pairs"])
                ax.plot(x[ordered], g.loc[ordered, "arm_minus_control"], marker=kw["marker"], ms=3.5, ls="none",
                        color=kw["color"], zorder=4)
                ax.plot(x[~ordered], g.loc[~ordered, "arm_minus_control"], marker=kw["marker"], ms=3.5, ls="none",
                        mfc="white", color=kw["color"], zorder=4)
            ax.axhline(0, color=arms["control"]["color"], ls="--", lw=1, zorder=2,
                       label="control (m = n/2, same CPT and repeat)")
            if len(dus):
                _m_colorbar(fig, ax, norm, cmap)
            _budget_axis(ax, mine["budget"], unit)
            ax.set_ylabel(wrap(f"arm − control, paired: {label}", 34))
        axes[-1].plot([], [], marker="o", ms=3.5, ls="none", color="0.4", label=f"{CONFIDENCE:.0%} interval excludes 0")
        axes[-1].plot([], [], marker="o", ms=3.5, ls="none", color="0.4", mfc="white",
                      label="cannot be ordered (or one pair)")
        _legend(fig)
        finish(fig)
    return fig


def best_m_vs_budget(points, *, column: str = "objective", label: str = "objective", direction: str = "minimize",
                     bases: list[str] | None = None, unit: str = "tokens"):
    """The best m against the budget per base (its mean ``column`` at its chosen lr), with a bar over the m
    that cannot be ordered from it (paired 95% interval covering zero; no bar with one repeat)."""
    from matplotlib.ticker import MaxNLocator

    best = stats.best_m_by_budget(points, column, direction)
    bases = _bases(points[points["method"] == "dus"], bases)
    if best.empty or not bases:
        return message_figure("best m by budget", "not enough trials: no DUS arm has a score at any budget point yet")
    arms = _arm_style()
    with style():
        fig, axes = _figure(len(bases))
        for ax, base, n, mine in _base_panels(axes, bases, points, best.sort_values("budget"),
                                               "not enough trials: no DUS arm of this base has a score yet"):
            known = mine["m_lo"].notna()
            ax.errorbar(mine.loc[known, "budget"], mine.loc[known, "best_m"],
                        yerr=[mine.loc[known, "best_m"] - mine.loc[known, "m_lo"],
                              mine.loc[known, "m_hi"] - mine.loc[known, "best_m"]],
                        color=arms["dus"]["color"], ls="none", capsize=2, lw=1, zorder=3,
                        label="m that cannot be ordered from the best")
            for _, r in mine[known].iterrows():
                ax.plot([r["budget"]] * len(r["tied"]), r["tied"], marker="_", ms=6, color=arms["dus"]["color"],
                        ls="none", zorder=3)
            ax.plot(mine["budget"], mine["best_m"], color=arms["dus"]["color"], marker="*", ms=8, mec="black",
                    mew=0.5, lw=1, zorder=4, label=f"best m (mean over repeats, {CONFIDENCE:.0%} paired intervals)")
            tried = points.loc[(points["base"] == base) & (points["method"] == "dus"), "m"].dropna().astype(float)
            if n is not None:
                ax.axhline(n / 2, color=arms["control"]["color"], ls="--", lw=1, zorder=1,
                           label="m = n/2: the unchanged base")
                if n % 4 == 0:
                    ax.axhline(n / 4, color="0.6", ls=":", lw=0.8, zorder=0, label="SOLAR's choice, m = n/4")
            lo, hi = (tried.min(), tried.max()) if len(tried) else (mine["best_m"].min(), mine["best_m"].max())
            ax.set_ylim(lo - 0.5, hi + 0.5)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            _budget_axis(ax, mine["budget"], unit)
            ax.set_ylabel(wrap(f"best m by {label}", 34))
        _legend(fig)
        finish(fig)
    return fig


def score_vs_flops(points, *, column: str = "objective", label: str = "objective", direction: str = "minimize",
                   bases: list[str] | None = None):
    """Score against compute, with the Pareto front on each panel: against the CPT training FLOPs of every arm
    at every budget point (lines join an arm's points), and against the inference FLOPs per token
    (training FLOPs per token / 3) at each base's last budget point. The no-CPT reference is a line."""
    means = stats.arm_means(points, column)
    means = means[means["flops"].notna() & (means["flops"] > 0)]
    if means.empty:
        return message_figure(label, "not enough trials: no budget point with a score and its FLOPs yet")
    means = means.assign(inference=means["flops_per_token"] / 3)
    bases = _bases(means, bases)
    nocpt = _no_cpt(points, column)
    colours = {b: palette()[i % 10] for i, b in enumerate(bases)}
    last = means[means["budget"] == means.groupby("base")["budget"].transform("max")]
    with style():
        fig, axes = _figure(2)
        for ax, size, table in ((axes[0], "flops", means), (axes[1], "inference", last)):
            for base in bases:
                mine = table[table["base"] == base]
                n = _depth(points, base)
                control = (mine["method"] == "dus") & (mine["m"] == (n / 2 if n else -1))
                if size == "flops":
                    for _, g in mine.groupby(["method", mine["m"].fillna(-1)]):
                        g = g.sort_values("flops")
                        ax.plot(g["flops"], g["mean"], color=colours[base], lw=0.5, alpha=0.5, zorder=2)
                kinds = (("DUS", (mine["method"] == "dus") & ~control, "o", 3),
                         ("unchanged base", control, "s", 4), ("MoE upcycle", mine["method"] == "moe", "^", 5))
                for kind, mask, marker, ms in kinds:
                    sel = mine[mask]
                    if len(sel):
                        ax.errorbar(sel[size], sel["mean"], yerr=sel["half"].fillna(0), color=colours[base],
                                    marker=marker, ms=ms, ls="none", capsize=1.5, lw=0.8, zorder=3,
                                    label=f"{base}: {kind}")
                if size == "inference":
                    for _, row in mine[(mine["method"] == "dus") & ~control].iterrows():
                        ax.annotate(f"{int(row['m'])}", (row[size], row["mean"]), xytext=(2, 2),
                                    textcoords="offset points", fontsize=FONT_PT - 3, color="0.3")
                if base in nocpt:
                    ax.axhline(nocpt[base], color=colours[base], ls=":", lw=0.8, zorder=1, label=f"{base}: no CPT")
            front = _pareto(list(zip(table[size], table["mean"], strict=True)), direction)
            xs, ys = zip(*front, strict=True)
            ax.step(xs, ys, where="post", color="black", lw=0.7, zorder=2, label="Pareto front")
            ax.scatter(xs, ys, s=80, facecolors="none", edgecolors="black", lw=0.7, zorder=4)
            _log_x(ax)
            ax.set_xlabel("CPT training FLOPs (log scale)" if size == "flops" else
                          "inference FLOPs per token (log scale)")
        _shared_ylabel(fig, label)
        axes[0].set_title("lines join an arm's budget points", fontsize=FONT_PT - 1, color="0.3")
        axes[1].set_title("at the last budget point; numbers: m (DUS)", fontsize=FONT_PT - 1,
                          color="0.3")
        _legend(fig)
        finish(fig)
    return fig


def redundancy(distances: dict[str, list[float]], best: dict[str, int | None] | None = None):
    """Angular distance of each layer per base; layers DUS at the best m uses twice (filled) or drops (x)."""
    from matplotlib.ticker import MaxNLocator

    if not distances:
        return message_figure("layer redundancy", "no base model measured")
    colours = palette()
    best = best or {}
    base_best = False
    with style():
        fig, (ax,) = _figure(1, height=2.4)
        for i, (base, d) in enumerate(distances.items()):
            c, n, x = colours[i % 10], len(d), np.arange(len(d))
            m = best.get(base)
            note = ""
            if m is not None and 0 <= m < n:
                dup, drop = dus_layers(n, m)
                note = f", best m = {m}"
                if dup:
                    ax.plot(x[dup], np.asarray(d)[dup], marker="o", ms=4, color=c, ls="none", zorder=4)
                    note += f": layers {dup[0]}–{dup[-1]} twice"
                if drop:
                    ax.plot(x[drop], np.asarray(d)[drop], marker="x", ms=5, color=c, ls="none", zorder=4)
                    note += f": layers {drop[0]}–{drop[-1]} dropped"
                if not dup and not drop:  # m = n/2: DUS gives the base back, each layer once
                    ax.plot(x, d, marker="s", ms=4.5, color=c, mec="black", mew=0.4, ls="none", zorder=4,
                            gid="base-best")
                    note += " = n/2: the unchanged base is best"
                    base_best = True
            ax.plot(x, d, color=c, marker="o", ms=4, mfc="white", lw=1, zorder=3, label=f"{base}{note}")
        ax.set_xlabel("decoder layer of the base model")
        ax.set_ylabel(wrap("angular distance, input to output (arccos(cos)/π)", 30))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=0)
        ax.set_title("filled: used twice by DUS at the best m; x: dropped" +
                     ("\nsquares: best m = n/2, the unchanged base itself" if base_best
                      else ""), fontsize=FONT_PT - 1, color="0.3")
        _legend(fig)
        finish(fig)
    return fig


def save(fig, stem) -> list:
    """Write ``stem``.pdf and ``stem``.png; no dates inside, so the same figure gives the same bytes."""
    from pathlib import Path

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".pdf"), stem.with_suffix(".png")]
    engine = fig.get_layout_engine()
    with style():
        fig.savefig(paths[0], metadata={"CreationDate": None, "ModDate": None})
        fig.set_layout_engine("none")  # keep the layout the PDF just computed: it is the slow part
        try:
            fig.savefig(paths[1], metadata={"Software": None})
        finally:
            fig.set_layout_engine(engine)
    return paths
