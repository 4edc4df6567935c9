"""Run a DUS layer-count study: ``python -m ablate.study --trials 20``.

With no options this runs the packaged default study (the zoo's small base models, the
synthetic corpus, offline, on the CPU or a GPU when present). Rerunning the same command
continues to ``--trials`` finished trials without redoing finished work, also after a
crash, a kill, Ctrl-C or SIGTERM: the trial that was cut short runs again. Several processes pointed
at one journal or PostgreSQL storage share the work (SQLite takes one worker).

    python -m ablate.study --trials 20
    python -m ablate.study --config studies/smoke.yaml --trials 3 --out /tmp/runs
    python -m ablate.study --config studies/hub-small.yaml --storage postgresql://u@db/ablate --trials 60

``trust_remote_code`` (models that ship their own code) needs both ``trust_remote_code: true``
in the study config, so the record says so, and ``--trust-remote-code`` on the command line, so
a config file alone can never run code.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ablate import distributed
from ablate.config import config_changes, load_study_config
from ablate.errors import UserError, cli
from ablate.fsutil import atomic_dir, atomic_write_json
from ablate.jobs import run_jobs
from ablate.keep import Keeper
from ablate.preflight import Plan, preflight, resolve_device
from ablate.results import write_csv
from ablate.search import SearchSpace, enqueue_controls, make_pruner, make_sampler, requeue_lost, retried, retry_failed
from ablate.storage import WORKER_ATTR, Worker, open_storage
from ablate.summary import describe_arm, print_summary
from ablate.synthetic import write_eval_tasks
from ablate.trackers import TrialLogger, check_installed
from ablate.train import check_processes, plan_budget
from ablate.trial import Objective, TrialFailed, Workspace, run_trial

__all__ = ["run_study", "main"]


def _failed(study) -> int:
    """Failed trials that hold their configuration (a reason of their own, not run again since)."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    again = retried(study.get_trials(deepcopy=False))
    return sum("fail_reason" in t.user_attrs and "duplicate_of" not in t.user_attrs and t.number not in again
               for t in trials)


def _counts(study) -> tuple[int, int, int]:
    """(finished, running, waiting) trials: finished means complete or pruned."""
    states = [t.state for t in study.get_trials(deepcopy=False)]
    finished = sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
    return finished, states.count(TrialState.RUNNING), states.count(TrialState.WAITING)


def _recover(study, space, worker, study_dir: Path) -> None:
    """Fail the trials of dead workers, queue their configurations again, tidy ``trials/``.

    Runs under the worker's sampling lock, so no other worker samples meanwhile.
    """

    trials_dir = study_dir / "trials"
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if worker.is_dead(t):
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            print(f"trial {t.number} was left running by a worker that is gone; its configuration runs again")
    running = set()
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.RUNNING:
            running.add(t.number)
        elif t.state == TrialState.FAIL and "fail_reason" not in t.user_attrs:
            # a folder written just before its worker died was never recorded: the retry replaces it
            shutil.rmtree(trials_dir / str(t.number), ignore_errors=True)
    requeue_lost(study, space)
    for path in trials_dir.glob(".*"):  # atomic_dir temporaries of trials that are no longer running
        match = re.match(r"^\.(\d+)\.(partial|old)-", path.name)
        if match and int(match.group(1)) not in running:
            shutil.rmtree(path, ignore_errors=True)
    worker.sweep(keep={t.system_attrs.get(WORKER_ATTR, {}).get("lock") for t in
                       study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))})


def _quiet_libraries() -> None:
    """No progress bars from transformers and datasets (weight loading, file reading)."""
    from transformers.utils import logging as hf_logging  # lazy: only --quiet needs it

    hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    else:  # read when datasets is imported; a cached corpus never imports it (two seconds saved)
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"


def _report(study, trial) -> None:
    if trial.state.name == "FAIL" and "fail_reason" in trial.user_attrs:
        print(f"trial {trial.number} failed: {trial.user_attrs['fail_reason']}")


def run_study(config, *, trials: int, out: str | Path = "runs", storage: str | None = None,
              device: str = "auto", progress: bool = True, trust_remote_code: bool = False,
              retry_failed: bool = False) -> dict:
    """Run (or continue) the study until it has ``trials`` finished trials; return its summary.

    ``retry_failed`` queues again the configurations whose trials failed for a reason of their
    own (a diverged loss, a broken variant); without it they keep their place as failures.

    ``trust_remote_code`` is the command line's permission: a config that sets
    ``trust_remote_code: true`` is refused without it. Everything is validated before the
    study folder is created; a Ctrl-C (KeyboardInterrupt) leaves a study a rerun continues.
    """
    if trials < 1:
        raise UserError(f"--trials {trials}: a study needs at least one trial")
    out = Path(out).expanduser()
    check_installed(config.log_with)  # a missing tracker fails before anything is written
    if not progress:
        _quiet_libraries()
    group = distributed.setup(resolve_device(device))  # None unless torchrun / accelerate launch started us
    if config.train.distributed == "fsdp" and group is None:
        raise UserError("train.distributed: fsdp shards a trial over several processes; launch the study with "
                        "torchrun --nproc_per_node G -m ablate.study ... (or accelerate launch), or set "
                        "train.distributed: ddp")
    if group is not None:  # every rank: a budget that does not split over the processes is the config's error
        plan_budget(config.train, seq_len=config.data.seq_len, num_train_rows=sys.maxsize, num_processes=group.world)
        check_processes(config.train, group.world)
    if group is not None and not group.main:
        return _follow(config, group, out, device)
    try:
        result = _lead(config, trials, out, storage, device, progress, trust_remote_code, retry_failed, group)
    except (KeyboardInterrupt, distributed.GroupLost):
        raise  # the other ranks got the same signal, or are gone
    except BaseException:
        if group is not None:  # an error between trials (the followers wait for the next arm): release them
            with contextlib.suppress(Exception):
                group.send(None)
        raise
    if group is not None:
        group.send(None)
    return result


def _follow(config, group, out: Path, device: str) -> dict:
    """A rank > 0 of a worker: run every arm rank 0 sends, in step with it, until it sends None; write nothing."""
    tasks_dir = out / config.name / "tasks" if config.eval.synthetic_tasks else None
    workspace = Workspace(config, resolve_device(device), tasks_dir, progress=False)
    while (message := group.receive()) is not None:
        failure = None
        if message["plan"] is not None:
            workspace.use_plan(message["arm"], message["plan"])
        try:
            run_trial(workspace, message["arm"], None)
        except (KeyboardInterrupt, SystemExit, distributed.GroupLost):
            raise
        except Exception as exc:  # rank 0 records it (it meets the same failure, or hears of it)
            failure = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]
        group.together(failure)
    return {}


def _lead(config, trials: int, out: Path, storage, device: str, progress: bool, trust_remote_code: bool,
          retry_failed: bool, group) -> dict:
    """Rank 0 of a worker (or the one process): the study's storage, its lock and every record."""
    plan = preflight(config, out, storage=storage, device=device, trust_remote_code=trust_remote_code,
                     progress=progress)
    plan.study_dir.mkdir(parents=True, exist_ok=True)
    storage = open_storage(plan.url)  # a broken storage file fails here, before .workers/ is made
    worker = Worker(plan.url, config.name, plan.study_dir)
    try:
        return _run(config, trials, plan, progress, worker, storage, retry_failed, group)
    finally:
        worker.close()


CONFIG_ATTR = "ablate:config"  # the study's resolved config, kept in the storage beside its trials


def _claim_config(study, config) -> None:
    """Record the study's config in its storage, or refuse a worker whose config differs.

    ``study.json`` is written per folder, so workers on other machines (or started at once with
    other ``--set`` values) would otherwise share one study with different settings. The storage
    is what they share; this runs under the sampling lock, so the check and the write are one step.
    """
    mine = config.model_dump(mode="json")
    recorded = study.user_attrs.get(CONFIG_ATTR)
    if recorded is None:
        study.set_user_attr(CONFIG_ATTR, mine)
    elif recorded != mine:
        raise UserError(f"study {config.name!r} in this storage runs another config (differs in "
                        f"{config_changes(recorded, mine)}); use the same config, or another --study NAME")


def _run(config, trials: int, plan: Plan, progress: bool, worker, storage, retry: bool = False,
         group=None) -> dict:
    study_dir, direction = plan.study_dir, plan.direction
    space = SearchSpace(config, plan.depths)
    # Optuna logs a failed trial with its traceback; we print one line per failure instead
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(study_name=config.name, storage=storage, direction=direction,
                                sampler=make_sampler(config, space), pruner=make_pruner(config),
                                load_if_exists=True)
    with worker.sampling():  # one worker at a time: the first records its config, the others compare
        _claim_config(study, config)
    if not (study_dir / "study.json").is_file():
        atomic_write_json(study_dir / "study.json", {"name": config.name, "storage": plan.shown_url,
                                                     "direction": direction, "config": config.model_dump(mode="json"),
                                                     "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    tasks_dir = study_dir / "tasks"
    if config.eval.synthetic_tasks and not tasks_dir.is_dir():
        try:
            with atomic_dir(tasks_dir) as tmp:
                write_eval_tasks(tmp, final=tasks_dir)
        except FileExistsError:  # another worker wrote them first (the same files)
            pass
    workspace = Workspace(config, plan.device, tasks_dir if config.eval.synthetic_tasks else None, progress=progress)
    keeper = Keeper(study_dir, config, direction)  # --keep: the trained variants left behind (ablate.keep)
    objective = Objective(space, workspace, study_dir, direction, worker=worker, group=group,
                          keeper=keeper if config.keep != "none" else None)
    callbacks = [_report, lambda s, t: write_csv(study_dir, s)]
    if config.keep == "best":  # the few best cards follow the study; --keep all's are refreshed at its end
        callbacks.append(lambda s, t: keeper.refresh(s))
    if config.log_with:
        callbacks.append(TrialLogger(config.log_with, study_dir, config.name))
    total = len(space.arms())
    with worker.sampling():
        enqueue_controls(study, space)
        if retry and (again := retry_failed(study, space)):
            print(f"queued again {len(again)} configuration{'s' * (len(again) > 1)} that failed: "
                  + ", ".join(describe_arm(a) for a in again))
    if min(trials, total) > _counts(study)[0]:  # trials to run: their zoo bases first, in parallel
        workspace.build_zoo()
    try:
        while True:
            with worker.sampling():  # released by the objective once the trial's configuration is stored
                _recover(study, space, worker, study_dir)
                done, running, waiting = _counts(study)
                if done + running >= trials:
                    break
                if not waiting and len(space.taken(study)) >= total:
                    failed = _failed(study)
                    print(f"all {total} configurations of the study have run"
                          + (f" ({failed} failed for a reason of their own: --retry-failed runs them again)"
                             if failed else "") + "; raise repeats or widen the m ranges for more trials")
                    break
                if progress:
                    print(f"trial {done + running + 1}/{trials} of study {config.name!r}")
                study.optimize(objective, n_trials=1, catch=(TrialFailed,), callbacks=callbacks)
    finally:
        with contextlib.suppress(Exception):  # also after Ctrl-C: the table shows the interrupted trial
            write_csv(study_dir, study)
    keeper.refresh(study)
    summary = print_summary(study, space, study_dir)
    keeper.print_report(study)
    return summary


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@cli
def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m ablate.study",
        description="Run a Depth Up-Scaling layer-count study with Optuna (continues where it stopped).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m ablate.study --trials 20\n"
               "  python -m ablate.study --config studies/smoke.yaml --trials 3 --out /tmp/runs\n"
               "  python -m ablate.study --set train.lr=1e-3 --set repeats=3 --trials 40\n"
               "  ablate study --keep all --log-with tensorboard --trials 20\n"
               "  python -m ablate.study --trials 20 --jobs 2          # two workers, one thread each on 2 cores\n"
               "  python -m ablate.study --storage journal:runs/shared.log --trials 40   # several workers",
    )
    parser.add_argument("--trials", type=int, default=20,
                        help="finished (complete or pruned) trials the study should end with (default 20)")
    parser.add_argument("--config", default=None,
                        help="study YAML (default: the packaged default study, same as studies/default.yaml)")
    parser.add_argument("--study", default=None, help="study name (default: the config's name), e.g. --study lr-1e-3")
    parser.add_argument("--storage", default=None,
                        help="Optuna storage URL: default sqlite in <out>/<study>/study.db; journal:PATH.log for "
                             "several workers on one machine; postgresql://user@host/db across machines (password in "
                             "PGPASSWORD or ~/.pgpass; one written in the URL is never recorded)")
    parser.add_argument("--out", default="runs", help="output folder (default runs/): <out>/<study>/ holds results")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a config value, e.g. --set train.tokens=200000 (repeatable)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:1")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler and of training (default: config)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--keep", default=None, metavar="best|all|none",
                        help="trained variants kept as Hugging Face checkpoints with a model card in <study>/kept/: "
                             "best per base, operator and budget point (default), all, or none")
    parser.add_argument("--log-with", default=None, metavar="tensorboard|wandb|mlflow",
                        help="log every trial (CPT curves, budget points, final metrics, config) to this tracker; "
                             "needs pip install 'ablate[NAME]'")
    parser.add_argument("--retry-failed", action="store_true",
                        help="run again the configurations whose trials failed for a reason of their own (a "
                             "diverged loss, a broken variant); a killed trial's configuration always runs again")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="worker processes of this study on this machine, each with cores/N torch threads "
                             "(default 1); small models run nearly N times the tokens/s. A new study then keeps "
                             "its trials in journal:<out>/<study>/study.log")
    parser.add_argument("--threads", type=int, default=None, metavar="K",
                        help="torch threads of this process, or of each worker with --jobs (default: one per "
                             "core, split evenly between the --jobs workers)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow hub models to run their own code; needed (with trust_remote_code: true in "
                             "the config) for architectures transformers does not ship")
    args = parser.parse_args(argv)
    if args.trials < 1:
        raise UserError(f"--trials {args.trials}: a study needs at least one trial; e.g. --trials 20")
    overrides = list(args.overrides)
    if args.study is not None:
        overrides.append(f"name={args.study}")
    if args.seed is not None:
        overrides += [f"sampler.seed={args.seed}", f"train.seed={args.seed}"]
    if args.keep is not None:
        overrides.append(f"keep={args.keep}")
    if args.log_with is not None:
        overrides.append(f"log_with={args.log_with}")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads {args.threads}: a process needs at least one thread; e.g. --threads 1")
        import torch  # lazy: --help and bad input stay fast

        torch.set_num_threads(args.threads)
    config = load_study_config(args.config, overrides)
    # SIGTERM (a scheduler's preemption, `kill PID`) ends the run like Ctrl-C: the trial cut short is
    # recorded as interrupted, not as a crash of its configuration
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.jobs != 1:  # N workers of this study in processes of their own (ablate.jobs)
            run_jobs(config, config_path=args.config, overrides=overrides, jobs=args.jobs, trials=args.trials,
                     out=Path(args.out).expanduser(), storage=args.storage, device=args.device,
                     progress=not args.quiet, trust_remote_code=args.trust_remote_code,
                     retry_failed=args.retry_failed, threads=args.threads)
        else:
            run_study(config, trials=args.trials, out=args.out, storage=args.storage, device=args.device,
                      progress=not args.quiet, trust_remote_code=args.trust_remote_code,
                      retry_failed=args.retry_failed)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue", file=sys.stderr)
        sys.exit(130)
    return 0


if __name__ == "__main__":
    main()
