"""The figures command and the plot helpers, on a fake but realistic study folder.

Checks that ``python -m ablate.figures`` writes every figure (PDF + PNG) and both tables,
that two runs give byte-identical files, that a study with one complete trial (and one
still running) still gets every file, that an empty or missing study fails with one
line and exit code 2, and that the statistics behind the figures match scipy's t
interval and a hand-checked Pareto front. The study is built without the pipeline: a
real Optuna SQLite study with the user attributes ablate.objective records, its
results.csv, and a metrics.jsonl per trial.
"""

from __future__ import annotations

import datetime
import json
import math
import subprocess
import sys

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from ablate import plots, studyplots
from ablate.figures import main, make_figures, results_table
from ablate.results import write_csv

BASES = {"tiny-a": 4, "tiny-b": 6}  # label -> n
FIGURES = ["score_vs_m", "val_loss_vs_m", "score_vs_params", "score_vs_flops", "loss_curves", "tasks_vs_m",
           "study_history", "study_importance", "study_timeline"]
BUDGET_FIGURES = ["score_vs_budget", "gap_vs_budget", "best_m_vs_budget"]  # with more than one budget point
KEYS = ["synth_k1/acc", "synth_k2/acc_norm", "synth/acc"]
START = datetime.datetime(2025, 1, 1, 9, 0, 0)
EVALS = (0, 1, 2, 4, 5, 8, 10)  # eval_every 5 and the early evaluations of eval_early (1, 2, 4, 8)


def _config(name: str) -> dict:
    """The resolved config as ablate.study records it (validated by the real schema)."""
    from ablate.config import parse_config

    return parse_config(_tree(name)).model_dump(mode="json")


def _tree(name: str) -> dict:
    return {"name": name, "description": "fake", "repeats": 2, "trust_remote_code": False,
            "bases": [{"model": label, "label": label, "m": None, "moe": label == "tiny-a"} for label in BASES],
            "methods": {"dus": True, "moe": {"experts": 4, "top_k": 2, "router_std": None, "expert_noise": 0.0}},
            "data": {"source": {"kind": "synthetic"}, "seq_len": 16, "val_tokens": 256, "seed": 0},
            "train": {"tokens": 4096, "eval_every": 5},
            "eval": {"objective": {"kind": "mean", "keys": KEYS}}}


def _trial(study, number: int, base: str, method: str, m, repeat: int, state: TrialState, rng) -> dict:
    n = BASES[base]
    quality = -abs((m if m is not None else n / 2) - n / 4) / n + 0.02 * rng.standard_normal()
    quality -= 0.1 * (method == "nocpt")
    metrics = {"val_loss": 2.0 - quality, "val_ppl": math.exp(2.0 - quality),
               "synth_k1/acc": 0.9 + quality / 4, "synth_k1/acc_stderr": 0.03,
               "synth_k2/acc": 0.6 + quality / 2, "synth_k2/acc_norm": 0.62 + quality / 2,
               "synth_k2/acc_stderr": 0.05, "synth/acc": 0.75 + quality / 3}
    s = 2 * (n - m) if m is not None else n
    size = 1000 * s + 500
    tokens = 0 if method == "nocpt" else 4096
    active = size * (2 if method == "moe" else 1)
    attrs = {"base": base, "method": method, "m": m, "repeat": repeat, "n": n, "s": s, "seed": repeat,
             "params_total": size * (3 if method == "moe" else 1), "params_active": active,
             "tokens": tokens, "flops": 6 * active * tokens, "flops_per_token": 6 * active, "device": "cpu",
             "metrics": metrics, "train_s": 1.0, "eval_s": 0.5, "wall_s": 2.0}
    params = {"base": base}
    dists = {"base": CategoricalDistribution(list(BASES))}
    if base == "tiny-a":
        params[f"method_{base}"] = method
        dists[f"method_{base}"] = CategoricalDistribution(["dus", "moe", "nocpt"])
    if method == "dus":
        params[f"m_{base}"] = m
        dists[f"m_{base}"] = IntDistribution(0, n // 2)
    params["repeat"] = repeat
    dists["repeat"] = IntDistribution(0, 1)
    value = float(np.mean([metrics[k] for k in KEYS])) if state == TrialState.COMPLETE else None
    if state == TrialState.FAIL:
        attrs = {k: attrs[k] for k in ("base", "method", "m", "repeat")} | {"fail_reason": "diverged"}
    steps = 5 if state == TrialState.PRUNED else 10
    status = {TrialState.COMPLETE: "completed", TrialState.PRUNED: "stopped", TrialState.FAIL: "failed"}.get(state)
    record = {**attrs, "trial": number, "status": status, "objective": value}
    if state == TrialState.COMPLETE:  # one budget point: a cosine study's record
        record["budgets"] = [{"budget": tokens, "budget_tokens": tokens, "tokens": tokens, "flops": attrs["flops"],
                              "branch": False, "cpt_val_loss": metrics["val_loss"], "metrics": metrics,
                              "objective": value}]
    arm_attrs = {k: attrs[k] for k in ("base", "method", "m", "repeat", "fail_reason") if k in attrs}
    trial = create_trial(state=state, value=value, params=params, distributions=dists, user_attrs=arm_attrs,
                         intermediate_values={s: -metrics["val_loss"] for s in (5, 10) if s <= steps})
    trial.datetime_start = START + datetime.timedelta(minutes=2 * number)  # a trial every 2 minutes, 90 s each
    if state != TrialState.RUNNING:
        trial.datetime_complete = trial.datetime_start + datetime.timedelta(seconds=45 * steps / 5)
    study.add_trial(trial)
    start = 2.0 + (0 if m == n / 2 else 3.0 + (m or 0))  # a fresh variant first loses, then recovers
    if method == "nocpt":  # no CPT: no curve
        return {"curve": [], "number": number, "record": record}
    return {"curve": [{"step": k, "tokens": 410 * k, "train_loss": 3.0, "lr": 1e-3,
                       **({"val_loss": metrics["val_loss"] + (start - 2.0) * math.exp(-k / 2)} if k in EVALS
                          else {})} for k in range(steps + 1)], "number": number, "record": record}


def make_study(root, *, partial: bool = False, empty: bool = False, name: str = "fake"):
    """A study folder like ablate.study writes: study.json, study.db, results.csv, trials/N/ (metrics, result)."""
    study_dir = root / name
    study_dir.mkdir(parents=True)
    url = f"sqlite:///{study_dir / 'study.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    (study_dir / "study.json").write_text(json.dumps({"name": name, "storage": url, "direction": "maximize",
                                                      "config": _config(name), "created": "2025-01-01T00:00:00"}))
    rng = np.random.default_rng(0)
    arms = [(b, "dus", m, r) for b, n in BASES.items() for m in range(n // 2 + 1) for r in (0, 1)]
    arms += [("tiny-a", "moe", None, r) for r in (0, 1)] + [("tiny-a", "nocpt", None, 0)]
    if partial:
        arms = arms[:1]
    if empty:
        arms = []
    runs = [_trial(study, i, *arm, TrialState.COMPLETE, rng) for i, arm in enumerate(arms)]
    if not partial and not empty:
        runs.append(_trial(study, len(runs), "tiny-b", "dus", 0, 0, TrialState.PRUNED, rng))
        runs.append(_trial(study, len(runs), "tiny-b", "dus", 1, 1, TrialState.FAIL, rng))
    if not empty:
        _trial(study, len(runs), "tiny-a", "dus", 1, 1, TrialState.RUNNING, rng)
    for run in runs:
        folder = study_dir / "trials" / str(run["number"])
        folder.mkdir(parents=True)
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in run["curve"]))
        (folder / "result.json").write_text(json.dumps(run["record"]))  # the trial's one record
    write_csv(study_dir, study)
    return study_dir


@pytest.fixture(scope="module")
def full_study(tmp_path_factory):
    """The fake study, its redundancy.json filled from tiny models so the figures command needs no zoo."""
    from conftest import tiny_model

    from ablate.redundancy import study_redundancy

    study_dir = make_study(tmp_path_factory.mktemp("runs"))
    config = json.loads((study_dir / "study.json").read_text())["config"]
    rows = np.random.default_rng(0).integers(0, 96, size=(4, 12))
    study_redundancy(config, study_dir, rows=4, load=lambda spec: (tiny_model("llama", BASES[spec]), rows))
    return study_dir


def _expected(redundancy: bool = True) -> list[str]:
    names = FIGURES + (["redundancy"] if redundancy else [])
    tables = ["results.md", "results.tex", "numbers.tex"]
    return sorted([f"{f}.{ext}" for f in names for ext in ("pdf", "png")] + tables)


def test_cli_writes_every_figure_and_table_identically_twice(full_study, tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        with pytest.raises(SystemExit) as exit_:
            main(["--study", "fake", "--runs", str(full_study.parent), "--out", str(out), "--rows", "4"])
        assert exit_.value.code == 0
    assert sorted(p.name for p in outs[0].iterdir()) == _expected()
    for path in outs[0].iterdir():
        assert path.stat().st_size > 500, path.name
        assert path.read_bytes() == (outs[1] / path.name).read_bytes(), f"{path.name} differs between runs"
    md = (outs[0] / "results.md").read_text()
    assert "unchanged base" in md and "best m" in md and "MoE" in md and "no CPT" in md
    # one budget point: the paired gaps, no best m per point, no rank correlation between points
    assert "**Paired gap to the control" in md and "| tiny-b | 4,096 | DUS m=0 | 2 |" in md
    assert "Spearman" not in md and "The best m at each budget point" not in md
    tex = (outs[0] / "results.tex").read_text()
    assert "\\begin{tabular}" in tex and "synth\\_k1/acc" in tex and "95\\%" in tex  # the caption escaped too


def test_partial_study_from_results_csv_still_writes_every_file(tmp_path):
    """One complete trial and one running; the storage URL redacted, so the trial folders alone are read."""
    study_dir = make_study(tmp_path / "runs", partial=True)
    info = json.loads((study_dir / "study.json").read_text())
    info["storage"] = "postgresql://user:***@db.invalid/ablate"
    (study_dir / "study.json").write_text(json.dumps(info))
    paths = make_figures(study_dir, tmp_path / "out", redundancy=False)
    assert sorted(p.name for p in paths) == _expected(redundancy=False)
    assert all(p.is_file() for p in paths)
    table, gaps = (tmp_path / "out" / "results.md").read_text().split("\n\n**", 1)
    assert "(n=1)" in table and table.count("\n") == 4  # caption, blank, header, rule, one arm
    assert gaps.startswith("Paired gap to the control") and "| tiny-a | 4,096 | DUS m=0 | 0 | - | no pairs |" in gaps


def _texts(fig) -> str:
    return " ".join(t.get_text() for ax in fig.axes for t in [*ax.texts, ax.title, *ax.get_yticklabels()])


def test_study_figures_say_why_when_trials_are_too_few(full_study):
    study = optuna.load_study(study_name="fake", storage=f"sqlite:///{full_study / 'study.db'}")
    assert "arm" in _texts(studyplots.param_importances(study))  # (base, arm, repeat), not the conditional m_<base>
    one = optuna.create_study(direction="maximize")
    one.add_trial(study.get_trials(states=(TrialState.COMPLETE,))[0])
    assert "not enough trials" in _texts(studyplots.param_importances(one))
    assert "not enough trials" not in _texts(studyplots.optimization_history(one))
    none = optuna.create_study()
    assert "not enough trials" in _texts(studyplots.timeline(none))


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_missing_or_empty_study_fails_in_one_line(tmp_path, capsys, case):
    if case == "empty":
        make_study(tmp_path, empty=True)
    with pytest.raises(SystemExit) as exit_:
        main(["--study", "fake", "--runs", str(tmp_path), "--out", str(tmp_path / "out"), "--no-redundancy"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert ("no study 'fake'" if case == "missing" else "no finished trials") in err


def test_module_entry_point_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ablate.figures", "--study", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_arm_stats_matches_scipy_t_interval():
    from scipy import stats

    values = [0.5, 0.7, 0.65]
    df = pd.DataFrame({"state": "complete", "base": "b", "method": "dus", "m": 1.0, "n": 4, "s": 6,
                       "params_total": 1, "params_active": 1, "tokens": 1, "objective": values})
    row = plots.arm_stats(df).iloc[0]
    lo, hi = stats.t.interval(0.95, 2, loc=np.mean(values), scale=stats.sem(values))
    assert row["count"] == 3 and row["lo"] == pytest.approx(lo) and row["hi"] == pytest.approx(hi)
    one = plots.arm_stats(df.iloc[:1]).iloc[0]
    assert one["count"] == 1 and math.isnan(one["half"])


def test_pareto_front_and_task_metric_choice():
    points = [(1, 0.5), (2, 0.4), (3, 0.7), (3, 0.6), (4, 0.65)]
    assert plots._pareto(points, "maximize") == [(1, 0.5), (3, 0.7)]
    assert plots._pareto(points, "minimize") == [(1, 0.5), (2, 0.4)]
    cols = ["objective", "a/acc", "a/acc_stderr", "a/acc_norm", "b/acc", "c/exact_match_stderr,strict-match",
            "c/exact_match,strict-match"]
    assert plots.task_metrics(cols) == ["a/acc_norm", "b/acc", "c/exact_match,strict-match"]


def test_results_table_best_and_control(full_study):
    from ablate.results import load

    df = load(full_study)
    table = results_table(df[df["state"] != "running"], direction="maximize")
    a = table[table["base"] == "tiny-a"]
    assert list(a["m"]) == ["0", "1", "2", "-", "-"] and list(a["method"]) == ["DUS"] * 3 + ["MoE", "no CPT"]
    assert a.iloc[4]["note"] == "reference: the base with no CPT" and a.iloc[4]["tokens"] == "0"
    assert a.iloc[2]["note"].startswith("unchanged base") and "best m" in a.iloc[1]["note"]  # best at n/4
    assert all("[" in v for v, method in zip(table["score (95% CI)"], table["method"], strict=True)
               if method != "no CPT")  # one no-CPT trial per base: no interval


def test_multi_budget_study_figures_and_tables(home, tmp_path):
    """A real study of the tiny kit with two budget points, an lr grid and two repeats: the budget figures, the
    paired tables in results.md and results.tex, and loss curves without the cooldown branches' rows."""
    from ablate.config import parse_config
    from ablate.figures import budget_tables, read_branches, read_curves
    from ablate.results import load_budgets
    from ablate.study import run_study

    train = {"schedule": "wsd", "warmup_tokens": 128, "cooldown": 0.25, "tokens_per_step": 128, "budgets": [256, 512],
             "micro_batch_size": 4, "lr": [1e-3, 3e-3], "eval_every": 2, "eval_rows": 8, "precision": "fp32"}
    config = parse_config(home.tree("multi", train=train, repeats=2,
                                    bases=[{"model": str(home.base), "label": "tiny", "m": [1, 2]}]))
    run_study(config, trials=20, out=tmp_path, progress=False)  # 13 configurations: no-CPT, then 3 arms x 2 lr x 2
    study_dir = tmp_path / "multi"
    paths = make_figures(study_dir, tmp_path / "out", redundancy=False)
    names = FIGURES + BUDGET_FIGURES
    assert sorted(p.name for p in paths) == sorted([f"{f}.{e}" for f in names for e in ("pdf", "png")] +
                                                   ["results.md", "results.tex", "numbers.tex"])
    assert all(p.stat().st_size > 500 for p in paths)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "at the last budget point, each arm at the lr chosen on held-out loss" in md
    assert md.count("| tiny | 256 |") == 2 + 3 + 1 + 1  # gaps (m = 1, MoE), lr (3 arms), best m, Spearman
    assert "| tiny | 512 | MoE |" in md and "| control lr |" in md and "The learning rate of each arm" in md
    tex = (tmp_path / "out" / "results.tex").read_text()
    assert all(f"\\label{{tab:{t}}}" in tex for t in ("results", "gaps", "best-m", "spearman", "lr"))
    assert tex.isascii()  # pdfLaTeX without extra packages: no U+2212 minus

    points = load_budgets(study_dir)
    tables = budget_tables(points, direction="minimize")
    # numbers.tex: the numbers a paper cites, each the study's own (here the paired gap at the last point)
    import re

    from ablate.stats import best_lr, paired_gaps

    numbers = dict(re.findall(r"\\csname abl@(.+?)\\endcsname\{(.*)\}$", (tmp_path / "out" / "numbers.tex").read_text(),
                              flags=re.M))
    gap = paired_gaps(best_lr(points)[0], "objective", "minimize")
    last = gap[(gap["budget"] == 512) & (gap["arm"] == "DUS m=1")].iloc[0]
    assert float(numbers["tiny/gap/DUS m=1/last"].split()[0]) == pytest.approx(last["arm_minus_control"], abs=1e-4)
    assert numbers["tiny/verdict/DUS m=1/512"] == last["verdict"] and numbers["tiny/pairs/DUS m=1/last"] == "2"
    assert numbers["budgets"] == "256, 512" and numbers["tiny/best/last"] in {"1", "2"}
    assert "tiny/trend/MoE" in numbers and "tiny/nocpt" in numbers
    assert list(tables["gaps"]["pairs"]) == ["2"] * 4 and len(tables["lr"]) == 6
    assert set(tables["gaps"]["verdict"]) <= {"better", "worse", "cannot be ordered"}
    dus = int(points.loc[(points["method"] == "dus") & (points["m"] == 1), "trial"].iloc[0])
    curve = read_curves(study_dir, [dus])[dus]
    # the main run only (the branch's eval at 256 is not in it): step 0, eval_early's step 1, eval_every's 2 and 4
    assert list(curve["tokens"]) == [0, 128, 256, 512]
    branch = read_branches(study_dir, [dus])[dus]
    assert list(branch["branch"]) == [256] and list(branch["fork_tokens"]) == [128] and list(branch["tokens"]) == [256]
    lines = (study_dir / "trials" / str(dus) / "metrics.jsonl").read_text().splitlines()
    end = next(r for r in map(json.loads, lines) if r.get("branch") == 256 and "val_loss" in r)
    assert branch["val_loss"].iloc[0] == end["val_loss"]


def test_budget_figures_say_why_when_there_is_nothing_to_draw():
    columns = ["state", "base", "method", "n", "m", "repeat", "lr", "budget_tokens", "tokens", "flops",
               "flops_per_token", "val_loss", "objective"]
    empty = pd.DataFrame(columns=columns)
    for draw in (plots.score_vs_budget, plots.gap_vs_budget, plots.best_m_vs_budget, plots.score_vs_flops):
        assert "not enough trials" in _texts(draw(empty))
    # an arm without its control: scores, but no pair
    alone = pd.DataFrame([["complete", "b", "dus", 4, 0, r, None, b, b, 6 * b, 6, 2.0, 2.0 - b / 1e4]
                          for r in (0, 1) for b in (100, 400)], columns=columns)
    assert "not enough trials" in _texts(plots.gap_vs_budget(alone))
    assert "not enough trials" not in _texts(plots.score_vs_budget(alone))
    assert "not enough trials" not in _texts(plots.best_m_vs_budget(alone))


LONG_LABEL = "held-out loss (nats/token) (lower is better)"  # objective_label's for a val_loss study


def _drawn(fig):
    """``fig`` laid out and drawn on an Agg canvas; its renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def _label_clashes(fig) -> list[str]:
    """Each y label that runs off the figure or into a title, an x label or another y label, after layout."""
    renderer = _drawn(fig)
    every = [a for ax in fig.axes for a in (ax, *ax.child_axes)]
    ylabels = [ax.yaxis.label for ax in every if ax.yaxis.label.get_text() and ax.yaxis.label.get_visible()]
    ylabels += [fig._supylabel] if fig._supylabel is not None else []
    others = [t for ax in every for t in (ax.title, ax.xaxis.label) if t.get_text()]
    box = fig.bbox
    out = []
    for i, label in enumerate(ylabels):
        b = label.get_window_extent(renderer)
        if b.x0 < box.x0 - 1 or b.y0 < box.y0 - 1 or b.x1 > box.x1 + 1 or b.y1 > box.y1 + 1:
            out.append(f"{label.get_text()!r} runs off the figure")
        out += [f"{label.get_text()!r} overlaps {t.get_text()!r}" for t in others + ylabels[i + 1:]
                if b.overlaps(t.get_window_extent(renderer))]
    return out


def test_y_labels_never_overlap_titles_or_each_other(full_study):
    """A long objective label (a val_loss study's) on the two-panel figures ran past its panel into the
    title above and the other panel's label."""
    from ablate.figures import load_points
    from ablate.results import load

    df = load(full_study)
    df = df[df["state"] != "running"].reset_index(drop=True)
    points = load_points(full_study, df)
    figures = {"score_vs_params": plots.score_vs_params(df, label=LONG_LABEL, direction="minimize"),
               "score_vs_flops": plots.score_vs_flops(points, label=LONG_LABEL, direction="minimize"),
               "score_vs_m": plots.score_vs_m(df, label=LONG_LABEL, direction="minimize")}
    for name, fig in figures.items():
        assert _label_clashes(fig) == [], name
    assert figures["score_vs_params"]._supylabel.get_text().replace("\n", " ") == LONG_LABEL  # said once


def test_redundancy_marks_the_base_when_the_base_is_best():
    """Best m = n/2 is DUS giving the base back: nothing twice, nothing dropped, so nothing was marked."""
    distances = {"four": [0.4, 0.1, 0.08, 0.2], "six": [0.4, 0.1, 0.05, 0.1, 0.15, 0.16]}
    fig = plots.redundancy(distances, {"four": 2, "six": 1})
    (ax,) = fig.axes
    marked = [line for line in ax.lines if line.get_gid() == "base-best"]
    assert len(marked) == 1 and list(marked[0].get_xdata()) == [0, 1, 2, 3]  # every layer of "four", once
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["four, best m = 2 = n/2: the unchanged base is best",
                      "six, best m = 1: layers 1–4 twice"]
    assert "unchanged base itself" in ax.get_title()
    renderer = _drawn(fig)
    assert fig.bbox.x0 - 1 <= ax.title.get_window_extent(renderer).x0  # the note fits the column
    assert ax.title.get_window_extent(renderer).x1 <= fig.bbox.x1 + 1
    plain = plots.redundancy(distances, {"four": 1, "six": 1})  # no base best: no squares, no note
    assert not [line for line in plain.axes[0].lines if line.get_gid() == "base-best"]
    assert "unchanged base itself" not in plain.axes[0].get_title()


def test_loss_curves_draw_every_evaluation_early_ones_spread_out(full_study):
    """Each run's line goes through every held-out evaluation of its metrics.jsonl (the early ones of
    eval_early at steps 1, 2, 4, 8 too, each a dot), on an x axis that is logarithmic after the first one."""
    from ablate.figures import read_curves
    from ablate.results import load

    df = load(full_study)
    df = df[df["state"] != "running"].reset_index(drop=True)
    curves = read_curves(full_study, df["trial"])
    complete = int(df.loc[(df["state"] == "complete") & (df["method"] == "dus"), "trial"].iloc[0])
    assert list(curves[complete]["step"]) == list(EVALS)
    fig = plots.loss_curves(df, curves)
    drawn = {tuple(line.get_xdata()) for ax in fig.axes for line in ax.lines if line.get_marker() == "o"}
    assert tuple(410 * k for k in EVALS) in drawn  # all seven points, dots on
    assert {ax.get_xscale() for ax in fig.axes if ax.get_xlabel()} == {"symlog"}
    _drawn(fig)
    for ax in fig.axes:
        if ax.get_xscale() == "symlog":  # the first evaluations are apart on screen, not one blot at 0
            x = ax.transData.transform([(410 * k, 2.0) for k in (0, 1, 2, 4)])[:, 0]
            assert min(np.diff(x)) > 10, x


def test_task_figure_has_error_bars_over_repeats_or_items():
    """Two repeats of an m: the t interval over them; one repeat: the Wilson interval over the items, their
    number (100) read off lm-eval's stderr of another trial, so p = 1 still gets a bar; the legend says which."""
    from matplotlib.container import ErrorbarContainer
    from scipy import stats

    def se(p, n=100):
        return math.sqrt(p * (1 - p) / (n - 1))

    rows = [(0, 0.50), (0, 0.60), (1, 0.30), (2, 1.0)]  # (m, synth_k2/acc): m = 0 twice, m = 1 and 2 once
    df = pd.DataFrame([{"state": "complete", "base": "b", "method": "dus", "m": m, "n": 4, "synth_k2/acc": p,
                        "synth_k2/acc_stderr": se(p)} for m, p in rows])
    table = plots.task_intervals(df, "synth_k2/acc").set_index("m")
    assert list(table["kind"]) == ["repeats", "items", "items"] and set(table["items"]) == {100}
    lo, hi = stats.t.interval(0.95, 1, loc=0.55, scale=stats.sem([0.5, 0.6]))
    assert (table.loc[0, "lo"], table.loc[0, "hi"]) == (pytest.approx(lo), pytest.approx(hi))
    for m, k in ((1, 30), (2, 100)):
        ci = stats.binomtest(k, 100).proportion_ci(0.95, method="wilson")
        assert (table.loc[m, "lo"], table.loc[m, "hi"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert table.loc[2, "lo"] < 0.97  # p = 1 of 100 items is not certainty

    fig = plots.tasks_vs_m(df)
    bars = [c for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 2 and sorted(len(c.lines[2][0].get_segments()) for c in bars) == [1, 2]
    legend = " ".join(t.get_text() for t in fig.legends[0].get_texts())
    assert "t interval over the repeats" in legend and "Wilson interval over the items" in legend
    # without a standard error, one repeat gets no bar (and no legend line claiming one)
    alone = plots.task_intervals(df.drop(columns="synth_k2/acc_stderr"), "synth_k2/acc")
    assert list(alone["kind"]) == ["repeats", "none", "none"]
