"""``ablate study --jobs N``: N worker processes of one study on this machine (ablate.jobs)."""

from __future__ import annotations

import fcntl
import json
import signal
import subprocess
import sys

import pytest
from _studykit import finish, wait_for
from test_reliability import finished_arms, load_trials

from ablate import jobs
from ablate.check import check_study
from ablate.config import parse_config
from ablate.storage import WORKER_ATTR
from ablate.study import main, run_study

needs_two_cores = pytest.mark.skipif(jobs.cores() < 2, reason="--jobs 2 needs two cores")


def _free(lock) -> bool:
    """True when no process holds ``lock`` (a worker's liveness file)."""
    with open(lock) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


@needs_two_cores
def test_two_jobs_share_a_new_study_in_a_journal_and_the_parent_prints_the_summary(home, tmp_path, capsys,
                                                                                   monkeypatch):
    config = home.write(tmp_path, repeats=2)  # 8 configurations
    study_dir = tmp_path / "runs" / "tiny-study"
    done = home.run(["--config", str(config), "--trials", "4", "--out", "runs", "--quiet", "--jobs", "2"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("Study tiny-study") == 1  # the summary, once, from the parent
    assert "2 workers x 1 torch thread" in done.stdout
    url = f"journal:{(study_dir / 'study.log').resolve()}"  # a new study with --jobs: a journal in its folder
    assert json.loads((study_dir / "study.json").read_text())["storage"] == url
    assert not (study_dir / "study.db").exists()
    assert check_study(study_dir) == []
    trials = load_trials(study_dir, url)
    arms = finished_arms(trials)
    assert len(arms) == len(set(arms)) == 4
    assert len({t.system_attrs[WORKER_ATTR]["pid"] for t in trials}) == 2
    assert (study_dir / "results.csv").read_text().count("\n") == len(trials) + 1
    assert all(_free(lock) for lock in (study_dir / ".workers").glob("*.lock"))  # no worker is left running
    assert "Study tiny-study" in (study_dir / ".workers" / "job-0.log").read_text()  # each worker's own output


    def no_worker(*args, **kwargs):
        raise AssertionError("a finished study started a worker")

    monkeypatch.setattr(jobs.subprocess, "Popen", no_worker)  # the rerun: nothing left to run, no worker
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as ended:
        main(["--config", str(config), "--trials", "4", "--out", "runs", "--quiet", "--jobs", "2"])
    assert ended.value.code == 0
    out = capsys.readouterr().out
    assert out.count("Study tiny-study") == 1 and "4 trials finished already: no worker started" in out


@pytest.mark.slow  # two runs of a parent and two workers: ~40 s on 2 shared cores
@needs_two_cores
def test_ctrl_c_stops_every_job_and_a_rerun_without_jobs_continues_in_the_journal(home, tmp_path, capsys):
    config = home.write(tmp_path, repeats=2)
    study_dir = tmp_path / "runs" / "tiny-study"
    proc = home.start(["--config", str(config), "--trials", "6", "--out", "runs", "--quiet", "--jobs", "2"], tmp_path)
    wait_for(lambda: list((study_dir / "trials").glob("*/result.json")), proc=proc)
    proc.send_signal(signal.SIGINT)  # Ctrl-C reaches the parent alone: the workers have sessions of their own
    done = finish(proc, 120)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "interrupted; rerun the same command to continue"
    assert all(_free(lock) for lock in (study_dir / ".workers").glob("*.lock"))  # no worker is left running

    run_study(parse_config(home.tree(repeats=2)), trials=6, out=tmp_path / "runs", progress=False)
    assert not (study_dir / "study.db").exists()  # the recorded journal, not a new SQLite study
    assert check_study(study_dir) == []
    arms = finished_arms(load_trials(study_dir))
    assert len(arms) == len(set(arms)) == 6


def test_jobs_refuses_a_study_started_in_sqlite_before_writing_anything(home, tmp_path, capsys):
    config = home.write(tmp_path)
    study_dir = tmp_path / "runs" / "tiny-study"
    study_dir.mkdir(parents=True)
    info = {"name": "tiny-study", "storage": f"sqlite:///{study_dir.resolve()}/study.db",
            "config": parse_config(home.tree()).model_dump(mode="json")}
    (study_dir / "study.json").write_text(json.dumps(info))
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(config), "--out", str(tmp_path / "runs"), "--jobs", "2", "--quiet"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "keeps its trials in SQLite, which takes one worker" in err[0]
    assert sorted(p.name for p in study_dir.iterdir()) == ["study.json"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--jobs", "0"], "--jobs 0: a study needs at least one worker"),
    (["--jobs", "3"], "--jobs 3 on 2 cores: at most one worker per core"),
    (["--threads", "0"], "--threads 0: a process needs at least one thread"),
])
def test_bad_jobs_and_threads_are_one_line_errors(home, tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(jobs, "cores", lambda: 2)
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(home.write(tmp_path)), "--out", str(tmp_path / "runs"), "--quiet", *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}")
    assert not (tmp_path / "runs").exists()


def test_the_first_worker_to_fail_stops_the_others_and_its_error_line_is_found(tmp_path):
    log = tmp_path / "job-1.log"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open(log, "w") as out:
        failing = subprocess.Popen([sys.executable, "-c", "import sys; print('loading'); "
                                    "print('error: the base is missing; fix the path'); print('bye'); sys.exit(2)"],
                                   stdout=out)
    first = jobs._watch([sleeper, failing], f"journal:{tmp_path}/absent.log", "x", 1, False, told=set())
    assert first == 1
    assert sleeper.returncode == -signal.SIGTERM  # stopped, not left running
    assert jobs._last_line(log) == "error: the base is missing; fix the path"


def test_a_new_study_gets_a_journal_in_its_folder_and_an_existing_one_keeps_its_storage(tmp_path):
    study_dir = tmp_path / "s"
    assert jobs.jobs_storage(study_dir, None) == f"journal:{(study_dir / 'study.log').resolve()}"
    assert jobs.jobs_storage(study_dir, "journal:/x/y.log") is None  # given: preflight checks it
    study_dir.mkdir()
    (study_dir / "study.json").write_text("{}")
    assert jobs.jobs_storage(study_dir, None) is None  # the recorded one


def test_threads_per_worker_split_the_cores_unless_given(monkeypatch):
    monkeypatch.setattr(jobs, "cores", lambda: 8)
    assert [jobs.worker_threads(n) for n in (1, 2, 3, 8)] == [8, 4, 2, 1]
    assert jobs.worker_threads(2, threads=1) == 1  # --threads: each worker's, as given
