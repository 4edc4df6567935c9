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
FIGURES = ["score_vs_m", "val_loss_vs_m", "score_vs_params", "loss_curves", "tasks_vs_m", "study_history",
           "study_importance", "study_timeline"]
KEYS = ["synth_k1/acc", "synth_k2/acc_norm", "synth/acc"]
START = datetime.datetime(2025, 1, 1, 9, 0, 0)


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
    metrics = {"val_loss": 2.0 - quality, "val_ppl": math.exp(2.0 - quality),
               "synth_k1/acc": 0.9 + quality / 4, "synth_k1/acc_stderr": 0.03,
               "synth_k2/acc": 0.6 + quality / 2, "synth_k2/acc_norm": 0.62 + quality / 2,
               "synth_k2/acc_stderr": 0.05, "synth/acc": 0.75 + quality / 3}
    s = 2 * (n - m) if m is not None else n
    size = 1000 * s + 500
    attrs = {"base": base, "method": method, "m": m, "repeat": repeat, "n": n, "s": s, "seed": repeat,
             "params_total": size * (3 if method == "moe" else 1),
             "params_active": size * (2 if method == "moe" else 1),
             "tokens": 4096, "flops": 6 * size * 4096, "device": "cpu", "metrics": metrics,
             "train_s": 1.0, "eval_s": 0.5, "wall_s": 2.0}
    params = {"base": base}
    dists = {"base": CategoricalDistribution(list(BASES))}
    if base == "tiny-a":
        params[f"method_{base}"] = method
        dists[f"method_{base}"] = CategoricalDistribution(["dus", "moe"])
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
    arm_attrs = {k: attrs[k] for k in ("base", "method", "m", "repeat", "fail_reason") if k in attrs}
    trial = create_trial(state=state, value=value, params=params, distributions=dists, user_attrs=arm_attrs,
                         intermediate_values={s: -metrics["val_loss"] for s in (5, 10) if s <= steps})
    trial.datetime_start = START + datetime.timedelta(minutes=2 * number)  # a trial every 2 minutes, 90 s each
    if state != TrialState.RUNNING:
        trial.datetime_complete = trial.datetime_start + datetime.timedelta(seconds=45 * steps / 5)
    study.add_trial(trial)
    start = 2.0 + (0 if m == n / 2 else 3.0 + (m or 0))  # a fresh variant first loses, then recovers
    return {"curve": [{"step": k, "tokens": 410 * k, "train_loss": 3.0, "lr": 1e-3,
                       **({"val_loss": metrics["val_loss"] + (start - 2.0) * math.exp(-k / 2)} if k % 5 == 0
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
    arms += [("tiny-a", "moe", None, r) for r in (0, 1)]
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
    return sorted([f"{f}.{ext}" for f in names for ext in ("pdf", "png")] + ["results.md", "results.tex"])


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
    assert "unchanged base" in md and "best m" in md and "MoE" in md
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
    table = (tmp_path / "out" / "results.md").read_text()
    assert "(n=1)" in table and table.count("\n") == 5  # caption, blank, header, rule, one arm


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
    assert list(a["m"]) == ["0", "1", "2", "-"] and list(a["method"]) == ["DUS"] * 3 + ["MoE"]
    assert a.iloc[2]["note"].startswith("unchanged base") and "best m" in a.iloc[1]["note"]  # best at n/4
    assert all("[" in v for v in table["score (95% CI)"])
