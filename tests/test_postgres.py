"""Several workers on a real PostgreSQL storage: three ``python -m ablate.study`` processes share a
study, one is killed mid-trial, the other two notice at once (same machine: its liveness lock is
free), run its configuration again and together stop at ``--trials`` with no configuration run
twice; storage, results.csv and trial folders agree. The URL's password never reaches a file
(study folder, results, trial folders, figures), a log or a message. A trial left by a worker on
another machine is failed by Optuna's heartbeat after the grace period and runs again.

Needs ``ABLATE_TEST_POSTGRES_URL=postgresql://user:password@host:port/db`` (``.ci/run`` starts a
server and sets it). Without it the tests skip, except under ``CI=true``, where they fail.
"""

import os
import uuid

import optuna
import pytest
from _studykit import (
    finished_arms,
    kill_one_of_three,
    load_trials,
    make_kit,
)
from optuna.trial import TrialState

from ablate.check import check_study
from ablate.errors import UserError
from ablate.storage import WORKER_ATTR, open_storage

ENV = "ABLATE_TEST_POSTGRES_URL"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def postgres_url():
    url = os.environ.get(ENV)
    problem = None
    if not url:
        problem = f"{ENV} is not set (.ci/run starts PostgreSQL and sets it)"
    else:
        try:
            open_storage(url)
        except UserError as exc:
            problem = f"PostgreSQL at {ENV} is not reachable: {exc}"
    if problem:
        if _in_ci():
            pytest.fail(f"CI=true but {problem}")
        pytest.skip(problem)
    return url


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    return make_kit(tmp_path_factory.getbasetemp())


def _password(url: str) -> str | None:
    from urllib.parse import urlsplit

    return urlsplit(url).password


def test_workers_share_a_postgres_study_and_survive_a_kill(postgres_url, kit, tmp_path, monkeypatch):
    name = f"pg-{uuid.uuid4().hex[:8]}"  # the database outlives the test: a study of its own
    config = kit.write(tmp_path, name, repeats=2)  # 8 configurations
    study_dir = tmp_path / "runs" / name
    args = ["--config", str(config), "--storage", postgres_url, "--out", "runs", "--trials", "6", "--quiet"]
    try:
        victim, survivors = kill_one_of_three(kit, args, tmp_path, study_dir, postgres_url)
        assert any(f"trial {victim.number} was left running" in s.stdout for s in survivors)

        assert check_study(study_dir, storage=postgres_url) == []
        trials = load_trials(study_dir, postgres_url)
        arms = finished_arms(trials)
        assert len(arms) == len(set(arms)) == 6  # together exactly --trials, no configuration twice
        assert not [t for t in trials if "duplicate_of" in t.user_attrs]  # the advisory lock kept them apart
        by_number = {t.number: t for t in trials}
        assert by_number[victim.number].state == TrialState.FAIL
        lost = tuple(victim.user_attrs[k] for k in ("base", "method", "m", "repeat"))
        assert lost in arms
        assert len({t.system_attrs[WORKER_ATTR]["pid"] for t in trials}) >= 2  # the victim and a survivor

        from ablate.figures import main as figures

        monkeypatch.chdir(tmp_path)
        with pytest.raises(SystemExit) as exit_info:  # figures and tables, reading the storage
            figures(["--study", str(study_dir), "--storage", postgres_url, "--out", "figures", "--no-redundancy"])
        assert exit_info.value.code == 0 and any((tmp_path / "figures").iterdir())

        secret = _password(postgres_url)
        if secret:
            assert "***" in (study_dir / "study.json").read_text()
            for path in tmp_path.rglob("*"):  # study folder, results, trial folders, logs of every worker
                if path.is_file():
                    assert secret.encode() not in path.read_bytes(), path
            # the URL is not recorded, so continuing without it asks for it
            from ablate.study import main

            with pytest.raises(SystemExit) as exit_info:
                main([a for a in args if a not in ("--storage", postgres_url)])
            assert exit_info.value.code == 2
    finally:
        try:
            optuna.delete_study(study_name=name, storage=open_storage(postgres_url))
        except KeyError:
            pass


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # the test plays the far worker by hand
def test_a_trial_of_a_worker_on_another_machine_is_failed_by_the_heartbeat(postgres_url, kit, tmp_path):
    """No liveness lock to look at across machines: Optuna's heartbeat fails the silent trial after the
    grace period, queues its configuration again, and a worker here runs it."""
    from ablate.config import parse_config
    from ablate.search import Arm, SearchSpace

    name = f"pg-{uuid.uuid4().hex[:8]}"
    config = kit.write(tmp_path, name)  # 4 configurations
    storage = open_storage(postgres_url)
    space = SearchSpace(parse_config(kit.tree(name)), {"tiny": 4})
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="minimize")
        arm = Arm("tiny", "dus", 2, 0)
        study.enqueue_trial(space.params(arm))
        ghost = study.ask()
        space.suggest(ghost)
        for key, value in arm.to_dict().items():
            ghost.set_user_attr(key, value)
        storage.set_trial_system_attr(ghost._trial_id, WORKER_ATTR, {"host": "elsewhere/0", "pid": 1,
                                                                     "lock": "/elsewhere/worker.lock"})
        storage.record_heartbeat(ghost._trial_id)  # its last sign of life
        done = kit.run(["--config", str(config), "--storage", postgres_url, "--out", "runs", "--trials", "4",
                        "--quiet"], tmp_path, ABLATE_HEARTBEAT_S=1, ABLATE_GRACE_S=2)
        assert done.returncode == 0, done.stderr
        assert "was left running" not in done.stdout  # not judged here: another machine's worker
        study_dir = tmp_path / "runs" / name
        assert check_study(study_dir, storage=postgres_url) == []
        trials = load_trials(study_dir, postgres_url)
        assert trials[ghost.number].state == TrialState.FAIL
        retry = [t for t in trials if t.system_attrs.get("failed_trial") == ghost.number]
        assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and space.trial_arm(retry[0]) == arm
        arms = finished_arms(trials)
        assert len(arms) == len(set(arms)) == 4
    finally:
        try:
            optuna.delete_study(study_name=name, storage=storage)
        except KeyError:
            pass
