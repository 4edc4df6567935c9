"""Crashes, concurrency and determinism of the study command.

- Ctrl-C (and SIGTERM, a scheduler's preemption): one line, exit 130, and the rerun runs the
  interrupted configuration again;
- a worker killed after writing its trial folder but before recording it: the rerun fails the
  trial at once (SQLite has one worker), removes the unrecorded folder and the half-written
  ones, and runs the configuration again;
- three workers on one journal file share a study; one is killed mid-trial and the survivors
  notice at once (its liveness lock is free), run its configuration again and together stop at
  ``--trials`` without running a configuration twice;
- two trials drawing one configuration: the later stands down and gives it back; a
  configuration whose worker dies runs again however often, and a failure of its own keeps its
  configuration until --retry-failed; workers with another config cannot join a study;
- SQLite refuses a second worker; passwords never reach messages; trust_remote_code needs
  the command-line flag; the same study twice gives the same numbers.
"""

import signal

import optuna
import pandas as pd
import pytest
from _studykit import (
    finished_arms,
    freeze_when,
    kill,
    kill_one_of_three,
    load_trials,
    running_partial,
)
from optuna.trial import TrialState

from ablate.check import check_study
from ablate.config import parse_config
from ablate.errors import UserError
from ablate.preflight import validate_study
from ablate.search import Arm, SearchSpace, requeue_lost
from ablate.storage import WORKER_ATTR, Worker, default_storage_url, open_storage, redact
from ablate.study import run_study
from ablate.trial import Objective

ARM_KEYS = ("base", "method", "m", "repeat")


def arm_of(trial) -> tuple:
    return tuple(trial.user_attrs.get(k) for k in ARM_KEYS)


# SIGTERM takes the same path as Ctrl-C (study._interrupt raises KeyboardInterrupt): slow tier, ~15 s
@pytest.mark.parametrize("sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
                         ids=["ctrl-c", "sigterm"])
def test_ctrl_c_stops_with_one_line_and_the_rerun_continues(home, tmp_path, sig):
    config = home.write(tmp_path, repeats=2)
    study_dir = tmp_path / "runs" / "tiny-study"
    proc = home.start(["--config", str(config), "--trials", "4", "--out", "runs", "--quiet"], tmp_path)
    partial = freeze_when(proc, lambda: running_partial(study_dir) if (study_dir / "trials" / "0").is_dir() else None)
    done = kill(proc, sig)
    assert done.returncode == 130
    assert done.stderr.strip().splitlines() == ["interrupted; rerun the same command to continue"]
    number = int(partial.name.split(".")[1])
    trials = {t.number: t for t in load_trials(study_dir)}
    assert trials[number].state == TrialState.FAIL and trials[number].user_attrs.get("interrupted")
    assert running_partial(study_dir) is None  # the half-written folder went with the interruption

    run_study(parse_config(home.tree(repeats=2)), trials=4, out=tmp_path / "runs", progress=False)
    assert check_study(study_dir) == []
    trials = load_trials(study_dir)
    arms = finished_arms(trials)
    assert len(arms) == len(set(arms)) == 4
    retry = [t for t in trials if t.user_attrs.get("retry_of") == number]
    assert [arm_of(t) for t in retry] == [arm_of(trials[number])] and retry[0].state == TrialState.COMPLETE


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # the test plays the dead worker by hand
def test_a_trial_killed_before_it_was_recorded_runs_again(home, tmp_path):
    """The worst moment to die: the folder is complete, the storage still says RUNNING."""
    config = parse_config(home.tree())
    run_study(config, trials=1, out=tmp_path, progress=False)
    study_dir = tmp_path / "tiny-study"
    study = optuna.load_study(study_name="tiny-study", storage=open_storage(default_storage_url(study_dir)))
    space = SearchSpace(config, {"tiny": 4})
    ghost = study.ask()  # the next queued control, as a dead worker left it
    arm = space.suggest(ghost)
    for key, value in arm.to_dict().items():
        ghost.set_user_attr(key, value)
    (study_dir / "trials" / str(ghost.number)).mkdir()
    (study_dir / "trials" / str(ghost.number) / "result.json").write_text('{"status": "completed"}')
    (study_dir / "trials" / f".{ghost.number}.partial-abc").mkdir()
    (study_dir / "trials" / ".0.old-123").mkdir()
    problems = check_study(study_dir)
    assert any("looks complete but the storage has the trial RUNNING" in p for p in problems)
    assert any("leftover" in p for p in problems)

    run_study(config, trials=3, out=tmp_path, progress=False)
    assert check_study(study_dir) == []
    trials = load_trials(study_dir)
    assert trials[ghost.number].state == TrialState.FAIL
    assert not (study_dir / "trials" / str(ghost.number)).exists()
    retry = [t for t in trials if t.user_attrs.get("retry_of") == ghost.number]
    assert [arm_of(t) for t in retry] == [tuple(arm.to_dict().values())]
    assert len(finished_arms(trials)) == len(set(finished_arms(trials))) == 3


def test_journal_workers_share_a_study_and_survive_a_kill(home, tmp_path):
    journal = tmp_path / "shared.log"
    url = f"journal:{journal}"
    config = home.write(tmp_path, repeats=2)  # 8 configurations
    args = ["--config", str(config), "--storage", url, "--out", "runs", "--trials", "6", "--quiet"]
    study_dir = tmp_path / "runs" / "tiny-study"
    victim, survivors = kill_one_of_three(home, args, tmp_path, study_dir, url)
    # noticed at once by a survivor (the victim's liveness lock is free), with no heartbeat
    assert any(f"trial {victim.number} was left running" in s.stdout for s in survivors)
    assert check_study(study_dir) == []
    trials = load_trials(study_dir, url)
    arms = finished_arms(trials)
    assert len(arms) == len(set(arms)) == 6  # together exactly --trials, never one configuration twice
    assert not [t for t in trials if "duplicate_of" in t.user_attrs]  # the sampling lock kept them apart
    assert trials[victim.number].state == TrialState.FAIL and arm_of(trials[victim.number]) in arms
    # the victim ran a trial and someone else finished the study (how the survivors split the rest
    # depends on which one got through its start-up first)
    assert len({t.system_attrs[WORKER_ATTR]["pid"] for t in trials}) >= 2


class _Alone:
    """A stand-in worker: no locks to take (the test runs one process)."""

    def mark(self, trial):
        pass

    def release(self):
        pass


def _study_with(space, arms_done: list[Arm]):
    study = optuna.create_study()
    for arm in arms_done:
        study.add_trial(optuna.trial.create_trial(params=space.params(arm), distributions=space.distributions(arm),
                                                  value=1.0, user_attrs=arm.to_dict()))
    return study


def test_a_configuration_drawn_twice_runs_once(home):
    config = parse_config(home.tree())
    space = SearchSpace(config, {"tiny": 4})
    arm = Arm("tiny", "dus", 0, 0)
    study = _study_with(space, [arm])
    study.enqueue_trial(space.params(arm))  # e.g. two workers queued it at once
    objective = Objective(space, workspace=None, study_dir=home.root, direction="minimize", worker=_Alone())
    from ablate.trial import TrialFailed

    study.optimize(objective, n_trials=1, catch=(TrialFailed,))
    stood_down = study.trials[-1]
    assert stood_down.state == TrialState.FAIL and stood_down.user_attrs["duplicate_of"] == 0
    assert space.holders(study) == {arm: [0]}  # the duplicate holds nothing
    assert requeue_lost(study, space) == []  # and is not queued again


def test_a_configuration_whose_worker_dies_is_never_dropped(home):
    """Issue 12 item 6: a configuration leaves the queue only by finishing or by failing for a reason
    of its own; one whose worker is killed runs again however often that happens."""
    config = parse_config(home.tree())
    space = SearchSpace(config, {"tiny": 4})
    arm = Arm("tiny", "dus", 1, 0)
    study = optuna.create_study()
    study.enqueue_trial(space.params(arm))

    def die(interrupted=False):  # the queued trial starts, and its worker dies
        trial = study.ask()
        assert space.suggest(trial) == arm
        if interrupted:
            trial.set_user_attr("interrupted", True)
        study.tell(trial, state=TrialState.FAIL)

    die(interrupted=True)
    for _ in range(5):  # more than the three deaths that used to retire it
        assert arm not in space.taken(study)
        assert requeue_lost(study, space) == [arm]
        die()
    assert requeue_lost(study, space) == [arm]
    assert not [t for t in study.trials if "fail_reason" in t.user_attrs]  # no failure charged to it
    trial = study.ask()  # the sixth try finishes
    assert space.suggest(trial) == arm
    study.tell(trial, 1.0)
    assert requeue_lost(study, space) == [] and space.holders(study) == {arm: [trial.number]}


def test_retry_failed_runs_a_failure_again_once(home):
    """A failure with a reason of its own keeps its configuration until --retry-failed queues it again."""
    from ablate.search import retried, retry_failed

    config = parse_config(home.tree())
    space = SearchSpace(config, {"tiny": 4})
    arm = Arm("tiny", "dus", 2, 0)
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, params=space.params(arm),
                                              distributions=space.distributions(arm),
                                              user_attrs={**arm.to_dict(), "fail_reason": "diverged"}))
    assert requeue_lost(study, space) == [] and space.holders(study) == {arm: [0]}
    assert retry_failed(study, space) == [arm]
    assert retry_failed(study, space) == []  # queued once, not twice
    assert retried(study.trials) == {0} and space.holders(study) == {arm: [1]}


def test_sqlite_takes_one_worker(home, tmp_path):
    config = parse_config(home.tree())
    study_dir = tmp_path / "tiny-study"
    study_dir.mkdir()
    other = Worker(default_storage_url(study_dir), "tiny-study", study_dir)  # holds the study's SQLite
    try:
        with pytest.raises(UserError, match="being run by another process"):
            run_study(config, trials=1, out=tmp_path, progress=False)
    finally:
        other.close()
    assert not (study_dir / "study.json").exists()


def test_passwords_stay_out_of_messages(home, tmp_path):
    url = "postgresql://alice:hunter2-secret@127.0.0.1:1/nowhere"
    assert redact(url) == "postgresql://alice:***@127.0.0.1:1/nowhere"
    assert "hunter2" not in redact("host=db password=hunter2-secret user=alice")
    with pytest.raises(UserError) as info:
        open_storage(url)
    assert "hunter2" not in str(info.value) and "***" in str(info.value)
    with pytest.raises(UserError) as info:
        run_study(parse_config(home.tree()), trials=1, out=tmp_path, storage=url, progress=False)
    assert "hunter2" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_trust_remote_code_needs_the_command_line_flag(home):
    config = parse_config(home.tree(trust_remote_code=True))
    with pytest.raises(UserError, match="--trust-remote-code"):
        validate_study(config, progress=False)
    assert validate_study(config, trust_remote_code=True, progress=False) == {"tiny": 4}


def test_same_seed_same_numbers(home, tmp_path):
    config = parse_config(home.tree(repeats=2, sampler={"kind": "tpe", "seed": 5}))
    tables = []
    for run in ("a", "b"):
        run_study(config, trials=5, out=tmp_path / run, progress=False)
        tables.append(pd.read_csv(tmp_path / run / "tiny-study" / "results.csv"))
    timing = ["wall_s", "train_s", "eval_s"]
    a, b = (t.drop(columns=timing) for t in tables)
    assert a["state"].eq("complete").all() and len(a) == 5
    pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_a_worker_with_another_config_is_refused_by_the_shared_storage(home, tmp_path):
    """Issue 12 item 7: two workers on one journal storage and one study name, other learning rates.

    Each has its own folder (as on two machines), so only the storage can tell them apart: the
    first records its config there, the second is refused before it runs a trial.
    """
    journal = f"journal:{tmp_path / 'shared.log'}"
    first = parse_config(home.tree(train={**home.tree()["train"], "lr": 1e-3}))
    other = parse_config(home.tree(train={**home.tree()["train"], "lr": 5e-2}))
    run_study(first, trials=1, out=tmp_path / "a", storage=journal, progress=False)
    with pytest.raises(UserError, match="runs another config \\(differs in train.lr\\)"):
        run_study(other, trials=2, out=tmp_path / "b", storage=journal, progress=False)

    def started() -> int:  # queued controls aside
        study = optuna.load_study(study_name="tiny-study", storage=open_storage(journal))
        return sum(t.state != TrialState.WAITING for t in study.trials)

    assert started() == 1  # the refused worker ran nothing
    run_study(first, trials=2, out=tmp_path / "c", storage=journal, progress=False)  # the same config joins
    assert started() == 2


def test_a_full_disk_stops_the_study_in_one_line_and_charges_no_configuration(home, tmp_path, monkeypatch, capsys):
    """Issue 12 item 14: ENOSPC mid-trial is the machine's problem, not the configuration's."""
    import errno

    from ablate import trial as trial_module
    from ablate.study import main

    config = home.write(tmp_path / "configs")
    real = trial_module.run_trial

    def full(ws, arm, out_dir, on_eval=None, on_point=None, keeper=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(out_dir / "metrics.jsonl"))

    monkeypatch.setattr(trial_module, "run_trial", full)
    argv = ["--config", str(config), "--out", str(tmp_path / "runs"), "--trials", "2", "--quiet"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "no space left on the device writing" in lines[0] and "MB free there" in lines[0]
    monkeypatch.setattr(trial_module, "run_trial", real)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    study_dir = tmp_path / "runs" / "tiny-study"
    assert check_study(study_dir) == []
    trials = optuna.load_study(study_name="tiny-study", storage=f"sqlite:///{study_dir / 'study.db'}").trials
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2
    assert not [t for t in trials if "fail_reason" in t.user_attrs]  # the full disk was charged to nobody
