"""Figures of the Optuna study itself: optimisation history, parameter importances, timeline.

Optuna's own matplotlib plots, restyled to the size and fonts of :mod:`ablate.plots`, with
pruned and failed trials kept visible. Split from :mod:`ablate.plots` to keep each module short.
"""

from __future__ import annotations

import warnings

import numpy as np

from ablate.errors import first_line
from ablate.plots import COLUMN_IN, FONT_PT, PANEL_IN, finish, message_figure, palette, style, wrap

__all__ = ["optimization_history", "param_importances", "timeline"]


def _finished_copy(study):
    """An in-memory copy of ``study`` with only its finished trials (running ones would change the plot)."""
    import optuna
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=True, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    copy = optuna.create_study(directions=study.directions, study_name=study.study_name)
    copy.add_trials(done)
    return copy, done


def _optuna_plot(draw, title: str):
    """Run an Optuna matplotlib plot, then restyle it to our size and fonts; its legend is removed.

    Optuna's plots switch pyplot to the ggplot style and size for a screen; the rc
    context keeps that switch from leaking into later figures.
    """
    import matplotlib as mpl
    import optuna

    with style(), mpl.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = draw()
    fig = ax.figure
    with style():
        fig.set_size_inches(COLUMN_IN, PANEL_IN + 0.6)
        for a in fig.axes:
            for loc in ("left", "center", "right"):
                a.set_title("", loc=loc)
            a.set_facecolor("white")
            a.grid(True, color="0.9", lw=0.6)
            a.xaxis.label.set_fontsize(FONT_PT)
            a.yaxis.label.set_fontsize(FONT_PT)
            a.tick_params(labelsize=FONT_PT - 1, colors="0.15")
            for text in a.texts:
                text.set_fontsize(FONT_PT - 2)
            if a.get_legend() is not None:  # callers draw their own, below the axes
                a.get_legend().remove()
        ax.set_title(title, fontsize=FONT_PT)
        fig.set_layout_engine("constrained")
        finish(fig)
    return fig


def optimization_history(study, *, label: str = "objective"):
    """Optuna's optimisation history (complete trials) of the study."""
    from optuna.visualization.matplotlib import plot_optimization_history

    copy, done = _finished_copy(study)
    if not any(t.state.name == "COMPLETE" for t in done):
        return message_figure("optimisation history", "not enough trials: no complete trial yet")
    from matplotlib.ticker import MaxNLocator

    fig = _optuna_plot(lambda: plot_optimization_history(copy, target_name="trial"), "optimisation history")
    ax = fig.axes[0]
    p = palette()
    with style():
        ax.set_xlabel("trial number")
        ax.set_ylabel(wrap(label, 30))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(-0.5, max(t.number for t in done) + 0.5)  # integer ticks even for a single trial
        handles, labels = ax.get_legend_handles_labels()
        labels = [{"trial": "complete trial", "Best Value": "best so far"}.get(x, x) for x in labels]
        # pruned and failed trials have no value: a rug of markers along the bottom shows when they ran
        for state, marker, colour, name in (("PRUNED", "x", p[1], "pruned"), ("FAIL", "v", "0.15", "failed")):
            numbers = [t.number for t in done if t.state.name == state]
            if numbers:
                handles += ax.plot(numbers, [0.03] * len(numbers), marker=marker, color=colour, ls="none", ms=4,
                                   transform=ax.get_xaxis_transform(), clip_on=False)
                labels.append(f"{name} (no value)")
        fig.legend(handles, labels, loc="outside lower center", ncols=2, frameon=False, fontsize=FONT_PT - 1)
        finish(fig)
    return fig


def _flat_study(done, direction):
    """Complete trials re-parametrised as (base, arm, repeat, and lr where there is a grid) from their user
    attributes.

    A study's own parameters are conditional (``m_<base>`` exists only for DUS trials of
    that base), and fANOVA only sees parameters every trial has; here every trial has all
    of them, so the importance of the arm (m or MoE) shows. The no-CPT reference is left out:
    it is not an arm, and has no repeat or lr.
    """
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import create_trial

    rows = []
    for t in done:
        a = t.user_attrs
        if t.state.name != "COMPLETE" or a.get("base") is None or a.get("method") not in ("dus", "moe"):
            continue
        arm = "MoE" if a["method"] == "moe" else f"DUS m={int(a['m'])}"
        rows.append(({"base": str(a["base"]), "arm": arm, "repeat": str(a.get("repeat", 0)),
                      "lr": f"{a['lr']:g}" if a.get("lr") is not None else "-"}, t.value))
    names = [k for k in ("base", "arm", "repeat", "lr") if len({p[k] for p, _ in rows}) > 1]
    key = {"arm": lambda v: (v == "MoE", int(v.split("=")[1]) if v != "MoE" else 0),
           "lr": lambda v: float(v) if v != "-" else 0.0}
    dists = {k: CategoricalDistribution(sorted({p[k] for p, _ in rows}, key=key.get(k))) for k in names}
    flat = optuna.create_study(direction=direction)
    flat.add_trials([create_trial(value=v, params={k: p[k] for k in names}, distributions=dists) for p, v in rows])
    return flat, len(rows), names


def param_importances(study, *, label: str = "objective"):
    """fANOVA importances (seeded) of base, arm (DUS m or MoE), repeat and lr (a grid), with Optuna's plot."""
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization.matplotlib import plot_param_importances

    title = "parameter importances (fANOVA)"
    _, done = _finished_copy(study)
    flat, complete, names = _flat_study(done, study.direction.name.lower())
    if complete < 2 or not names:
        why = (f"importances need at least 2 complete trials, the study has {complete}" if complete < 2 else
               "every complete trial has the same base, arm, repeat and lr")
        return message_figure(title, f"not enough trials: {why}")
    evaluator = FanovaImportanceEvaluator(seed=0)  # a seeded forest: the same figure every time
    try:
        fig = _optuna_plot(lambda: plot_param_importances(flat, evaluator=evaluator), title)
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        return message_figure(title, f"importances are not available for this study: {first_line(exc)}")
    fig.axes[0].set_xlabel(wrap(f"share of the variance of: {label}", 40))
    fig.axes[0].set_ylabel("")
    return fig


def timeline(study):
    """Optuna's timeline of every finished trial: complete, pruned and failed in distinct colours."""
    import matplotlib as mpl
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
    from optuna.visualization.matplotlib import plot_timeline

    copy, done = _finished_copy(study)
    if not done:
        return message_figure("trial timeline", "not enough trials: no finished trial yet")
    fig = _optuna_plot(lambda: plot_timeline(copy), "trials over time")
    ax = fig.axes[0]
    p = palette()
    # Optuna's tab: colours put failed (red) next to pruned (orange); ours stay apart for colour-blind readers
    ours = {"tab:blue": ("complete", p[0]), "tab:orange": ("pruned", p[1]), "tab:red": ("failed", "0.15")}
    seen = {}
    for patch in ax.patches:
        for tab, (name, colour) in ours.items():
            if np.allclose(patch.get_facecolor(), mpl.colors.to_rgba(tab)):
                patch.set_facecolor(colour)
                seen[name] = colour
    with style():
        locator = AutoDateLocator(minticks=2, maxticks=6)  # maxticks=5 warned "unable to pick an interval"
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
        for text in ax.get_xticklabels():
            text.set_rotation(0)
            text.set_ha("center")
        ax.set_xlabel("wall-clock time")
        ax.set_ylabel("trial number")
        ax.set_ylim(-0.5, max(t.number for t in done) + 0.5)  # integer ticks even for a single trial
        handles = [mpl.patches.Patch(color=c, label=n) for n, c in seen.items()]
        fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False, fontsize=FONT_PT - 1)
        finish(fig)
    return fig
