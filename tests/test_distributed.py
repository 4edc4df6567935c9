"""A study worker of several processes (torchrun, gloo on CPU) and FSDP2 training, checked against one process.

- ``continue_pretraining`` with ``train.distributed: fsdp`` on 2 processes gives the 1-process run's losses
  (cosine, and wsd with a cooldown branch forked off the sharded state), and ``save_full_checkpoint`` writes
  a checkpoint that ``AutoModelForCausalLM`` loads and that gives the 1-process model's logits;
- ``torchrun --nproc_per_node 2 -m ablate.study`` runs a study as one worker: the same trials and
  held-out losses as one process, rank 0 alone in the storage and writing the records;
- a rank killed mid-trial (under torchrun, and under a launcher that leaves rank 0 running) fails that
  trial for the worker, and the next run completes the study with every configuration finished exactly
  once (slow tier);
- a process group whose backend does not fit the device, and fsdp in a process that belongs to no
  group, are one-line errors (fsdp without a launcher on the command line is in tests/test_bad_input.py).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _studykit import finished_arms, load_trials
from transformers import AutoModelForCausalLM

from ablate import distributed
from ablate.config import load_study_config
from ablate.errors import UserError
from ablate.keep import kept_folders
from ablate.study import run_study

TESTS = Path(__file__).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(_port()), *args]


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_fsdp_on_two_processes_matches_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS.parent))
    done = subprocess.run(torchrun([str(TESTS / "_fsdp_worker.py"), str(tmp_path / "fsdp"), "fsdp"]), env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    import _fsdp_worker

    threads = torch.get_num_threads()
    try:
        _fsdp_worker.main(tmp_path / "single", "ddp")  # one process, no group: plain training
    finally:
        torch.set_num_threads(threads)
    from test_train import random_data
    from transformers import AutoModelForCausalLM

    ids = torch.from_numpy(random_data().val[:4].astype("int64"))
    for run in _fsdp_worker.RUNS:
        sharded, single = _metrics(tmp_path / "fsdp" / run / "metrics.jsonl"), \
            _metrics(tmp_path / "single" / run / "metrics.jsonl")
        assert [r.get("branch") for r in sharded] == [r.get("branch") for r in single]
        _same_losses(sharded, single)  # the same global batch on 2 processes: equal up to float summation order
        assert single[-1]["train_loss"] < single[1]["train_loss"]  # it learns: the comparison means something
        expected = torch.load(tmp_path / "single" / run / "logits.pt")
        for mode in ("fsdp", "single"):  # gathered from the shards, and written from a plain model
            folder = tmp_path / mode / run / "ckpt"
            assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
            loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
            with torch.no_grad():
                logits = loaded(input_ids=ids).logits
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.load(tmp_path / "fsdp" / run / "logits.pt"), expected, rtol=1e-4, atol=1e-5)
    assert "branch" in {k for r in _metrics(tmp_path / "fsdp" / "wsd" / "metrics.jsonl") for k in r}


def _study_args(config: Path, out: Path, trials: int) -> list[str]:
    return ["-m", "ablate.study", "--config", str(config), "--trials", str(trials), "--out", str(out), "--quiet"]


def _files(folder: Path) -> dict[str, set[str]]:
    """Each finished trial's folder: the names of the files it holds."""
    return {p.name: {f.name for f in p.iterdir()} for p in (folder / "trials").iterdir() if p.name.isdigit()}


@pytest.mark.slow  # ~23 s; the default tier keeps test_fsdp_on_two_processes_matches_one_process
def test_a_study_worker_of_two_processes_matches_one_process(home, tmp_path):
    kit = home
    config = kit.write(tmp_path, train={"tokens": 1024, "tokens_per_step": 512, "micro_batch_size": 8, "lr": 1e-3,
                                        "eval_every": 1, "eval_rows": 8, "precision": "fp32", "distributed": "fsdp"})
    done = subprocess.run(torchrun(_study_args(config, tmp_path / "fsdp", 3)), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=kit.env(PYTHONPATH=str(TESTS.parent)))
    assert done.returncode == 0, done.stderr[-3000:]
    run_study(load_study_config(config, ["train.distributed=ddp"]), trials=3, out=tmp_path / "single", progress=False)
    two, one = tmp_path / "fsdp" / "tiny-study", tmp_path / "single" / "tiny-study"
    trials = load_trials(two)
    assert len(finished_arms(trials)) == 3 and finished_arms(trials) == finished_arms(load_trials(one))
    assert [t.state.name for t in trials] == [t.state.name for t in load_trials(one)]  # rank 0 alone asks Optuna
    assert len(list((two / ".workers").glob("*.lock"))) == 1  # one Worker: rank 0's
    assert _files(two) == _files(one)  # rank 0 writes each record once, and nothing else is written
    for number in _files(two):
        a, b = (json.loads((d / "trials" / number / "result.json").read_text()) for d in (two, one))
        assert a["status"] == b["status"] == "completed"
        assert a["objective"] == pytest.approx(b["objective"], rel=1e-5)
        if a["method"] != "nocpt":
            _same_losses(_metrics(two / "trials" / number / "metrics.jsonl"),
                         _metrics(one / "trials" / number / "metrics.jsonl"))
    # --keep best (the default): rank 0 writes the variant gathered from the shards, a plain checkpoint
    # that loads as the one process's kept variant does and gives its logits
    kept = sorted(p.relative_to(two) for p in kept_folders(two))
    assert kept and kept == sorted(p.relative_to(one) for p in kept_folders(one))
    ids = torch.arange(1, 17).reshape(2, 8)
    for folder in kept:
        architectures = [json.loads((d / folder / "config.json").read_text())["architectures"] for d in (two, one)]
        assert architectures[0] == architectures[1] and not architectures[0][0].startswith("FSDP")
        with torch.no_grad():
            got, want = (AutoModelForCausalLM.from_pretrained(d / folder).eval()(ids).logits for d in (two, one))
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (folder, (got - want).abs().max())


def _same_losses(got: list[dict], expected: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(got, expected, strict=True):
        for key in ("train_loss", "val_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a, b)


def test_a_config_that_does_not_split_over_the_processes_is_refused_on_every_rank(kit, tmp_path):
    config = kit.write(tmp_path, train={"tokens": 1024, "tokens_per_step": 512, "eval_rows": 7, "distributed": "fsdp"})
    done = subprocess.run(torchrun(_study_args(config, tmp_path / "runs", 1)), cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=kit.env(PYTHONPATH=str(TESTS.parent)))
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]
    assert done.returncode != 0 and len(errors) == 2, done.stderr[-2000:]  # each rank says it, in one line
    assert all("set train.eval_rows to a multiple of 2" in e for e in errors)
    assert not (tmp_path / "runs").exists()


def _ranks(launcher: int) -> dict[int, int]:
    """The rank processes a torchrun started: {RANK: pid}."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        ranks = [v.split(b"=", 1)[1] for v in environ if v.startswith(b"RANK=")]
        if ranks and parent in (launcher,):
            found[int(ranks[0])] = int(entry.name)
    return found


def _bare_ranks(args: list[str], cwd: Path, env: dict, log) -> list[subprocess.Popen]:
    """The ranks of a 2-process worker started without a launcher that stops the others when one dies."""
    port = str(_port())
    return [subprocess.Popen([sys.executable, *args], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                             env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in range(2)]


@pytest.mark.slow  # two workers of 2 processes and a kill: about a minute on 2 shared cores
@pytest.mark.parametrize("launcher", ["torchrun", "bare"])
def test_a_rank_killed_mid_trial_fails_the_trial_and_the_next_run_completes_the_study(kit, tmp_path, launcher):
    """torchrun stops rank 0 when rank 1 dies (the trial is interrupted); started bare, rank 0 finds the
    dead rank in its next collective and stops with one line (GroupLost). Either way the trial is failed
    without a reason of its own and the next run completes the study."""
    config = kit.write(tmp_path, train={"tokens": 8192, "tokens_per_step": 512, "micro_batch_size": 8, "lr": 1e-3,
                                        "eval_every": 1, "eval_rows": 8, "precision": "fp32", "distributed": "fsdp"})
    study_dir, total = tmp_path / "runs" / "tiny-study", 5  # nocpt, DUS m = 0, 1, 2, MoE
    env = kit.env(PYTHONPATH=str(TESTS.parent))
    log = open(tmp_path / "first.txt", "w")
    args = _study_args(config, tmp_path / "runs", total)
    if launcher == "torchrun":
        first = subprocess.Popen(torchrun(args), cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs = [first]
    else:
        procs = _bare_ranks(args, tmp_path, env, log)
        first = procs[0]
    end, victim = time.monotonic() + 240, None
    while victim is None and time.monotonic() < end and first.poll() is None:
        partial = sorted((study_dir / "trials").glob(".*.partial-*")) if (study_dir / "trials").is_dir() else []
        metrics = [p / "metrics.jsonl" for p in partial if (p / "metrics.jsonl").is_file()]
        if metrics and len(metrics[0].read_text().splitlines()) >= 3:  # CPT has taken steps: mid-trial
            ranks = _ranks(first.pid) if launcher == "torchrun" else {r: p.pid for r, p in enumerate(procs)}
            for pid in ranks.values():
                os.kill(pid, signal.SIGSTOP)
            victim = int(metrics[0].parent.name.split(".")[1])
            os.kill(ranks[1], signal.SIGKILL)
            os.kill(ranks[0], signal.SIGCONT)
        time.sleep(0.05)
    assert victim is not None, (tmp_path / "first.txt").read_text()[-3000:]
    for proc in procs:
        proc.wait(timeout=120)
    log.close()
    assert first.returncode != 0
    trials = {t.number: t for t in load_trials(study_dir)}
    assert trials[victim].state.name in ("FAIL", "RUNNING") and "fail_reason" not in trials[victim].user_attrs
    assert not (study_dir / "trials" / str(victim)).exists()  # never recorded as the configuration's result
    if launcher == "bare":  # no signal: rank 0 met the dead rank in a collective
        assert first.returncode == 2 and "interrupted" not in trials[victim].user_attrs
        last = [line for line in (tmp_path / "first.txt").read_text().splitlines() if line.startswith("error:")]
        assert last and last[-1].startswith("error: a process of this 2-process worker is gone"), last

    again = subprocess.run(torchrun(args), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = load_trials(study_dir)
    arms = finished_arms(trials)
    assert len(arms) == total and len(set(arms)) == total  # nothing lost, nothing twice
    assert all("fail_reason" not in t.user_attrs for t in trials)
    check = subprocess.run([sys.executable, "-m", "ablate.check", str(study_dir)], env=env, capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_process_group_whose_backend_does_not_fit_the_device_is_refused(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(UserError, match="uses gloo, which cannot carry cuda tensors"):
            distributed._check_backend("cuda")
        distributed._check_backend("cpu")  # fits
        with pytest.raises(UserError, match="model.model.layers"):
            distributed.shard(torch.nn.Linear(2, 2), torch.device("cpu"), "fp32")
    finally:
        dist.destroy_process_group()
    with pytest.raises(UserError, match="needs a process group"):
        distributed.shard(torch.nn.Linear(2, 2), torch.device("cpu"), "fp32")


def test_continue_pretraining_with_fsdp_and_no_process_group_is_refused_before_touching_the_model():
    from conftest import tiny_model
    from test_train import random_data, small_config

    from ablate.train import continue_pretraining

    model = tiny_model(num_layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="train.distributed: fsdp needs a process group"):
        continue_pretraining(model, random_data(), small_config(distributed="fsdp", trainable="new"), progress=False,
                             new_layers=[1])
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen and left frozen
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
