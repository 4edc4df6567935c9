"""The study engine on a tiny real study: the objective under ``optuna.trial.FixedTrial``, a
3-trial study end to end (controls first, no configuration twice, results.csv, trial folders
and storage in agreement), continuing a finished study, and resuming after ``SIGKILL``."""

import json

import pytest
from _studykit import finished_arms, freeze_when, kill, load_trials, running_partial
from optuna.trial import FixedTrial

from ablate.check import check_study
from ablate.config import parse_config
from ablate.search import Arm, SearchSpace
from ablate.study import run_study
from ablate.trial import Objective, Workspace

# the base with no CPT, then m=n/2, MoE, m=n/4
CONTROLS = [("tiny", "nocpt", None, 0), ("tiny", "dus", 2, 0), ("tiny", "moe", None, 0), ("tiny", "dus", 1, 0)]


def test_objective_with_a_fixed_trial(home, tmp_path):
    config = parse_config(home.tree())
    space = SearchSpace(config, {"tiny": 4})
    objective = Objective(space, Workspace(config, "cpu", None, progress=False), tmp_path, "minimize")
    arm = Arm("tiny", "dus", 1, 0)
    value = objective(FixedTrial(space.params(arm), number=7))
    folder = tmp_path / "trials" / "7"
    result = json.loads((folder / "result.json").read_text())
    assert (result["trial"], result["status"], result["m"], result["n"], result["s"]) == (7, "completed", 1, 4, 6)
    assert value == result["objective"] == pytest.approx(result["metrics"]["val_loss"])
    assert {"config.yaml", "env.json", "metrics.jsonl", "result.json"} <= {p.name for p in folder.iterdir()}
    assert not [p for p in (tmp_path / "trials").iterdir() if p.name.startswith(".")]  # nothing half-written


def test_repeats_train_the_same_rows_in_another_order(home, tmp_path):
    """DUS has no random init, so a repeat that only changed the seed would rerun the same numbers
    (the first default study did): a repeat reorders the CPT rows and keeps the held-out rows."""
    config = parse_config(home.tree(repeats=2))
    space = SearchSpace(config, {"tiny": 4})
    objective = Objective(space, Workspace(config, "cpu", None, progress=False), tmp_path, "minimize")
    results = []
    for number, repeat in enumerate((0, 1)):
        objective(FixedTrial(space.params(Arm("tiny", "dus", 1, repeat)), number=number))
        results.append(json.loads((tmp_path / "trials" / str(number) / "result.json").read_text()))
    first, second = results
    assert (first["data_order_seed"], second["data_order_seed"]) == (None, 1)
    assert second["seed"] == first["seed"] + 1
    # same held-out rows, same starting point: the loss before any update is identical ...
    assert second["train"]["initial_val_loss"] == first["train"]["initial_val_loss"]
    # ... and the other order leads somewhere else
    assert second["metrics"]["val_loss"] != first["metrics"]["val_loss"]


def test_tiny_study_end_to_end_and_continued(home, tmp_path):
    config = parse_config(home.tree())
    summary = run_study(config, trials=4, out=tmp_path, progress=False)
    study_dir = tmp_path / "tiny-study"
    assert check_study(study_dir) == []
    trials = load_trials(study_dir)
    assert finished_arms(trials) == CONTROLS  # the controls were queued first, in order
    assert summary["tiny"]["complete"] == 4 and summary["tiny"]["control"] is not None
    before = {p.name: (p / "result.json").read_bytes() for p in (study_dir / "trials").iterdir()}

    run_study(config, trials=10, out=tmp_path, progress=False)  # only 5 configurations exist: stops at 5
    trials = load_trials(study_dir)
    arms = finished_arms(trials)
    assert len(arms) == len(set(arms)) == 5 and arms[:4] == CONTROLS
    assert all((study_dir / "trials" / name / "result.json").read_bytes() == data for name, data in before.items())
    assert check_study(study_dir) == []


def test_resume_after_sigkill(home, tmp_path, capsys):
    """A worker killed mid-trial: the rerun fails that trial, runs its configuration again and
    leaves every trial finished before the kill as it was."""
    config = home.write(tmp_path, repeats=2)  # 8 configurations
    args = ["--config", str(config), "--trials", "5", "--out", "runs", "--quiet"]
    study_dir = tmp_path / "runs" / "tiny-study"
    proc = home.start(args, tmp_path)
    partial = freeze_when(proc, lambda: running_partial(study_dir) if (study_dir / "trials" / "0").is_dir() else None)
    kill(proc)
    number = int(partial.name.split(".")[1])
    survivors = {p.name: (p / "result.json").read_bytes()
                 for p in (study_dir / "trials").iterdir() if p.name.isdigit() and int(p.name) != number}
    killed = next(t for t in load_trials(study_dir) if t.number == number)
    assert killed.state.name == "RUNNING"  # nobody told the storage: the worker just vanished

    # the rerun in this process (the same code as the command's; a second interpreter costs ~5 s)
    capsys.readouterr()
    run_study(parse_config(home.tree(repeats=2)), trials=5, out=tmp_path / "runs", progress=False)
    assert f"trial {number} was left running" in capsys.readouterr().out
    assert check_study(study_dir) == []
    trials = load_trials(study_dir)
    arms = finished_arms(trials)
    assert len(arms) == len(set(arms)) == 5
    by_number = {t.number: t for t in trials}
    assert by_number[number].state.name == "FAIL"
    retry = [t for t in trials if t.user_attrs.get("retry_of") == number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    assert [retry[0].user_attrs[k] for k in ("base", "method", "m", "repeat")] == \
        [killed.user_attrs[k] for k in ("base", "method", "m", "repeat")]
    for name, data in survivors.items():  # finished before the kill: intact, counted once
        assert (study_dir / "trials" / name / "result.json").read_bytes() == data
        assert by_number[int(name)].state.name == "COMPLETE"
