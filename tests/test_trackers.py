"""Experiment trackers and the dashboard on a finished tiny study, run through the ``ablate`` command:
``ablate study --log-with tensorboard`` writes one TensorBoard run per trial whose event files hold
the CPT loss curve of ``metrics.jsonl``, every budget point's scores, the final metrics and the
config as hyper-parameters; a tracker that is not installed is a one-line error naming its extra;
and optuna-dashboard, started on 127.0.0.1 against the study's storage, lists the study in its API."""

import importlib.util
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from ablate import cli
from ablate.results import read_records


@pytest.fixture(scope="module")
def finished(kit, tmp_path_factory):
    """A tiny study of 3 trials run with ``ablate study --keep none --log-with tensorboard``."""
    import torch

    root = tmp_path_factory.mktemp("tracked")
    path = kit.write(root / "configs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("ABLATE_HOME", str(kit.home))
            with pytest.raises(SystemExit) as exit_info:
                cli.main(["study", "--config", str(path), "--trials", "3", "--out", str(root / "out"), "--quiet",
                          "--keep", "none", "--log-with", "tensorboard"])
    finally:
        torch.set_num_threads(threads)
    assert exit_info.value.code == 0
    return root / "out" / "tiny-study"


def test_tensorboard_holds_the_loss_curve(finished):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = read_records(finished)
    trained = [n for n, r in records.items() if r["method"] != "nocpt"]
    assert len(records) == 3 and trained
    runs = sorted(p.name for p in (finished / "tensorboard").iterdir())
    assert runs == sorted(f"trial-{n}" for n in records)
    number = trained[0]
    events = EventAccumulator(str(finished / "tensorboard" / f"trial-{number}")).Reload()
    curve = [(e.step, e.value) for e in events.Scalars("cpt/train_loss")]
    lines = [json.loads(x) for x in (finished / "trials" / str(number) / "metrics.jsonl").read_text().splitlines()]
    expected = [(r["tokens"], r["train_loss"]) for r in lines if "train_loss" in r]
    assert len(curve) == len(expected) >= 2
    assert all(s == t and v == pytest.approx(x, rel=1e-6) for (s, v), (t, x) in zip(curve, expected, strict=True))
    assert {"cpt/lr", "cpt/tokens_per_s", "cpt/val_loss", "budget/val_loss", "final/objective"} <= \
        set(events.Tags()["scalars"])
    final = events.Scalars("final/val_loss")[-1]
    assert final.value == pytest.approx(records[number]["metrics"]["val_loss"], rel=1e-6)
    hparams = list((finished / "tensorboard" / f"trial-{number}").glob("*/hparams.yml"))
    assert hparams and "study.train.lr" in hparams[0].read_text()


@pytest.mark.parametrize("kind", ["tensorboard", "wandb", "mlflow"])
def test_a_tracker_that_is_not_installed_is_one_line(kind, kit, tmp_path, capsys, monkeypatch):
    from ablate import trackers

    monkeypatch.setattr(trackers, "_installed", lambda name: False)
    _one_line_error(kit, tmp_path, capsys, ["--log-with", kind], f"pip install 'ablate[{kind}]'")


def test_a_real_missing_tracker(kit, tmp_path, capsys):
    missing = [k for k in ("wandb", "mlflow") if importlib.util.find_spec(k) is None]
    if not missing:
        pytest.skip("wandb and mlflow are both installed")
    _one_line_error(kit, tmp_path, capsys, ["--log-with", missing[0]], f"the {missing[0]} package is not installed")


def _one_line_error(kit, tmp_path, capsys, extra: list[str], expect: str) -> None:
    path = kit.write(tmp_path / "configs")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["study", "--config", str(path), "--out", str(tmp_path / "out"), "--quiet", *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and expect in err, err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_lists_the_study(finished, tmp_path):
    pytest.importorskip("optuna_dashboard")
    command = shutil.which("optuna-dashboard")
    if command is None:
        pytest.skip("the optuna-dashboard command is not on PATH")
    port = _free_port()
    url = f"sqlite:///{finished / 'study.db'}"  # the README's command
    with open(tmp_path / "log.txt", "w") as log:
        server = subprocess.Popen([command, url, "--host", "127.0.0.1", "--port", str(port), "--quiet"],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        end, studies = time.monotonic() + 60, None
        while time.monotonic() < end and studies is None:
            if server.poll() is not None:
                pytest.fail(f"optuna-dashboard ended: {(tmp_path / 'log.txt').read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as reply:
                    studies = json.loads(reply.read())["study_summaries"]
            except OSError:
                time.sleep(0.2)
        assert studies is not None, "the dashboard did not answer"
        assert [s["study_name"] for s in studies] == ["tiny-study"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert server.returncode is not None


def test_no_tracker_files_without_log_with(finished):
    """``--keep none`` left no kept folder; only the asked-for tracker wrote files."""
    assert not (finished / "kept").exists() and not (finished / "wandb").exists()
    assert Path(finished / "tensorboard").is_dir()


def test_wandb_offline_run(finished, monkeypatch):
    """W&B (when installed): an offline run per trial, under the study folder, holding the loss curve."""
    pytest.importorskip("wandb")
    from ablate.trackers import TrialLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    number = next(n for n, r in read_records(finished).items() if r["method"] != "nocpt")
    TrialLogger("wandb", finished, "tiny-study").log_trial(finished / "trials" / str(number), number, "complete")
    runs = list((finished / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and b"cpt/train_loss" in runs[0].read_bytes() and b"final/objective" in runs[0].read_bytes()


@pytest.mark.slow
def test_mlflow_run(finished, tmp_path, monkeypatch):
    """MLflow (when installed; about 13 s to create its database): the loss curve and the final metrics."""
    pytest.importorskip("mlflow")
    import mlflow

    from ablate.trackers import TrialLogger

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    records = read_records(finished)
    number = next(n for n, r in records.items() if r["method"] != "nocpt")
    TrialLogger("mlflow", finished, "tiny-study").log_trial(finished / "trials" / str(number), number, "complete")
    client = mlflow.tracking.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("tiny-study").experiment_id])
    lines = [json.loads(x) for x in (finished / "trials" / str(number) / "metrics.jsonl").read_text().splitlines()]
    curve = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "cpt/train_loss")]
    assert curve == [(r["tokens"], pytest.approx(r["train_loss"])) for r in lines if "train_loss" in r]
    assert run.info.run_name == f"trial-{number}" and run.data.params["study.train.lr"] == "0.001"
    assert run.data.metrics["final/val_loss"] == pytest.approx(records[number]["metrics"]["val_loss"])
