"""Several workers of one study on this machine: ``python -m ablate.study --trials 20 --jobs 2``.

Small models train far below the CPU's matmul ceiling: a width-64 Llama's step is bound by the
cost of each operation, not by its FLOPs, so a second thread on the same training gains little
(about 1.2x), while two one-thread trainings side by side nearly double the tokens/s the machine
turns out (``bench/default_arms.py``). ``--jobs N`` therefore starts N worker processes of the same
study, each with ``cores // N`` torch threads, on a storage they share. The workers are ordinary
``python -m ablate.study`` processes (the sampling lock, liveness files and retries of
:mod:`ablate.storage` keep them apart); this parent shows the finished trials, relays failures,
stops the workers on Ctrl-C or SIGTERM, and prints the study's summary once, at the end.

A new study run with ``--jobs`` keeps its trials in ``journal:<out>/<study>/study.log`` (SQLite
takes one worker); a rerun with or without ``--jobs`` continues it there. A study started in
SQLite is continued by one worker: ``--jobs`` refuses it.

Written here rather than with Optuna's ``n_jobs``: that runs trials in threads of one process,
which share one interpreter lock and one torch thread pool, the two things small models are
bound by; and a process pool would have to carry the pruner's reports back and forth, which
the workers' shared storage already does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ablate.errors import UserError

__all__ = ["cores", "worker_threads", "jobs_storage", "run_jobs", "LOG_NAME"]

LOG_NAME = "job-{}.log"  # a worker's output, under <study>/.workers/
POLL_S = 1.0  # how often the parent reads the storage for finished trials


def cores() -> int:
    """The CPUs this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_threads(jobs: int, threads: int | None = None) -> int:
    """Torch threads per worker for ``jobs`` workers: ``threads`` when given (``--threads``), else
    the cores split evenly, one at least."""
    if jobs < 1:
        raise UserError(f"--jobs {jobs}: a study needs at least one worker; e.g. --jobs 2")
    if jobs > cores():
        raise UserError(f"--jobs {jobs} on {cores()} cores: at most one worker per core; use --jobs {cores()} "
                        "or fewer (several machines: --storage postgresql://...)")
    return threads if threads is not None else cores() // jobs


def jobs_storage(study_dir: Path, storage: str | None) -> str | None:
    """The storage ``--jobs`` runs a study on when ``--storage`` is not given: a journal in the
    study folder for a new study, else None (the storage the study was started with)."""
    if storage is not None or (study_dir / "study.json").is_file():
        return None
    return f"journal:{(study_dir / 'study.log').resolve()}"


def _worker_command(config_path: str | None, overrides: list[str], *, trials: int, out: Path, url: str,
                    device: str, threads: int, trust_remote_code: bool, retry_failed: bool) -> list[str]:
    command = [sys.executable, "-m", "ablate.study", "--trials", str(trials), "--out", str(out), "--storage", url,
               "--device", device, "--threads", str(threads), "--quiet"]
    if config_path is not None:
        command += ["--config", config_path]
    for override in overrides:
        command += ["--set", override]
    if trust_remote_code:
        command.append("--trust-remote-code")
    if retry_failed:
        command.append("--retry-failed")  # idempotent: a configuration queued again is not queued twice
    return command


def _last_line(path: Path) -> str:
    """A worker's error line from its log (``error: ...``), else its last line."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("error: ")]
    return errors[-1] if errors else (lines[-1] if lines else "")


def _stop(procs: list[subprocess.Popen], sig: int, wait_s: float = 120.0) -> None:
    """Send ``sig`` to the workers still running and wait for them (killed after ``wait_s``)."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
    deadline = time.monotonic() + wait_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_jobs(config, *, config_path: str | None, overrides: list[str], jobs: int, trials: int, out: Path,
             storage: str | None, device: str, progress: bool, trust_remote_code: bool,
             retry_failed: bool, threads: int | None = None) -> dict:
    """Run (or continue) the study with ``jobs`` worker processes here, ``threads`` torch threads
    each (default: the cores split evenly); return its summary.

    Everything is validated here first (:func:`ablate.preflight.preflight`), so a bad input fails
    once, in one line, before any worker starts.
    """
    from ablate.preflight import preflight
    from ablate.storage import storage_kind
    from ablate.trackers import check_installed

    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise UserError("--jobs starts its own workers; under torchrun each process is already one rank of a "
                        "worker: drop --jobs, or run several torchrun commands on one --storage")
    threads = worker_threads(jobs, threads)
    check_installed(config.log_with)  # as run_study: a missing tracker fails before anything is written
    study_dir = Path(out) / config.name
    journal = jobs_storage(study_dir, storage)
    plan = preflight(config, out, storage=storage, device=device, trust_remote_code=trust_remote_code,
                     progress=progress)
    if journal is not None:  # a new study: its folder, which holds the journal, is made below
        plan = dataclasses.replace(plan, url=journal, shown_url=journal)
    if storage_kind(plan.url) == "sqlite":
        raise UserError(f"study {config.name!r} keeps its trials in SQLite, which takes one worker; continue it "
                        "without --jobs, or start a new study with --jobs (--study NAME), which uses a journal")
    if not retry_failed and _finished(plan.url, config.name, trials):
        return _summary(config, plan, f"  {trials} trials finished already: no worker started")
    logs = plan.study_dir / ".workers"
    logs.mkdir(parents=True, exist_ok=True)  # also the study folder, where a new study's journal goes
    command = _worker_command(config_path, overrides, trials=trials, out=Path(out), url=plan.url, device=device,
                              threads=threads, trust_remote_code=trust_remote_code, retry_failed=retry_failed)
    # one thread pool per worker of `threads` threads: torch reads OMP_NUM_THREADS, and so do the
    # BLAS libraries numpy may use
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    if progress:
        print(f"study {config.name!r}: {jobs} workers x {threads} torch thread{'s' * (threads > 1)}, storage "
              f"{plan.shown_url}; worker logs in {logs}")
    start = time.perf_counter()
    procs: list[subprocess.Popen] = []
    paths = [logs / LOG_NAME.format(i) for i in range(jobs)]
    try:
        for path in paths:
            with open(path, "w") as log:  # the worker holds its own descriptor
                # a session of its own: a Ctrl-C at the terminal reaches this parent alone, which
                # passes one SIGINT on to each worker (two signals could cut a worker's clean-up short)
                procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              env=env, start_new_session=True))
        first = _watch(procs, plan.url, config.name, trials, progress, told=_failures(plan.url, config.name))
    except KeyboardInterrupt:
        _stop(procs, signal.SIGINT)
        raise
    except BaseException:
        _stop(procs, signal.SIGTERM)
        raise
    if first is not None:
        i, code = first, procs[first].returncode
        line = _last_line(paths[i])
        if code == 2 and line.startswith("error: "):
            raise UserError(line.removeprefix("error: "))
        raise SystemExit(f"error: worker {i} of {jobs} exited with status {code}: {line[:300]} (its log: "
                         f"{paths[i]}); rerun the same command to continue")
    return _summary(config, plan, f"  {jobs} workers x {threads} torch thread{'s' * (threads > 1)}: "
                                  f"{time.perf_counter() - start:,.0f} s")


def _summary(config, plan, last_line: str) -> dict:
    """The study's tables brought up to date and its summary printed, once, by this parent."""
    import optuna

    from ablate.keep import Keeper
    from ablate.results import write_csv
    from ablate.search import SearchSpace
    from ablate.storage import open_storage
    from ablate.summary import print_summary

    study = optuna.load_study(study_name=config.name, storage=open_storage(plan.url))
    write_csv(plan.study_dir, study)
    keeper = Keeper(plan.study_dir, config, plan.direction)
    keeper.refresh(study)
    summary = print_summary(study, SearchSpace(config, plan.depths), plan.study_dir)
    keeper.print_report(study)
    print(last_line)
    return summary


def _existing(url: str, name: str):
    """The study ``name`` in storage ``url``, or None when it does not exist yet."""
    import optuna

    from ablate.storage import open_storage

    try:
        return optuna.load_study(study_name=name, storage=open_storage(url))
    except (KeyError, UserError, ValueError, OSError):  # a new study
        return None


def _finished(url: str, name: str, trials: int) -> bool:
    """Whether the study already holds ``trials`` finished trials and none running: then a worker
    would start, import torch and stop at once (11 s for nothing with two workers, measured)."""
    from optuna.trial import TrialState

    study = _existing(url, name)
    if study is None:
        return False
    states = [t.state for t in study.get_trials(deepcopy=False)]
    return TrialState.RUNNING not in states and sum(s in (TrialState.COMPLETE, TrialState.PRUNED)
                                                    for s in states) >= trials


def _failures(url: str, name: str) -> set[int]:
    """The failed trials a study already holds (None of them is news to this run)."""
    from optuna.trial import TrialState

    study = _existing(url, name)
    if study is None:
        return set()
    return {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}


def _watch(procs: list[subprocess.Popen], url: str, name: str, trials: int, progress: bool,
           told: set[int]) -> int | None:
    """Until every worker has exited: the finished trials on a bar, each new failure on a line.
    The first worker to exit with an error stops the others (a rerun continues the study); its
    index is returned (None when all exited cleanly)."""
    import optuna
    from optuna.trial import TrialState
    from tqdm.auto import tqdm

    from ablate.storage import open_storage

    bar = tqdm(total=trials, unit="trial", disable=not progress, dynamic_ncols=True)
    storage, study = None, None
    try:
        while None in [p.poll() for p in procs]:  # a list, not any(): every worker is polled
            time.sleep(POLL_S)
            bad = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if bad:
                _stop(procs, signal.SIGTERM)
                return bad[0]
            if study is None:
                with contextlib.suppress(KeyError, UserError, ValueError, OSError):  # not created yet
                    storage = storage or open_storage(url)
                    study = optuna.load_study(study_name=name, storage=storage)
            if study is None:
                continue
            trials_now = study.get_trials(deepcopy=False)
            bar.n = min(trials, sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials_now))
            bar.refresh()
            for t in trials_now:
                if t.state == TrialState.FAIL and "fail_reason" in t.user_attrs and t.number not in told:
                    told.add(t.number)
                    bar.write(f"trial {t.number} failed: {t.user_attrs['fail_reason']}")
    finally:
        bar.close()
    bad = [i for i, p in enumerate(procs) if p.returncode != 0]
    return bad[0] if bad else None
