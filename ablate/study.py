"""Run a DUS layer-count study: ``python -m ablate.study --trials 20``.

With no options this runs the packaged default study (the zoo's small base models, the
synthetic corpus, offline, on the CPU or a GPU when present). Rerunning the same command
continues to ``--trials`` finished trials without redoing finished work; several
processes pointed at one storage share the work.

    python -m ablate.study --trials 20
    python -m ablate.study --config studies/smoke.yaml --trials 3 --out /tmp/runs
    python -m ablate.study --config studies/hub-small.yaml --storage postgresql://u:p@db/ablate --trials 60
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ablate.errors import UserError, cli

__all__ = ["run_study", "main"]


def _device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {choice}: CUDA is not available here; use --device cpu")
    return choice


def _finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _running(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def _check_m(config, depths: dict[str, int]) -> None:
    for b in config.bases:
        n = depths[b.name]
        bad = [m for m in (b.m or []) if not 0 <= m < n]
        if bad:
            raise UserError(f"bases[{b.name}].m: {bad} out of range for n={n}; choose 0 <= m < {n}")


def _prepare(config, out: Path, storage: str | None, device: str):
    """Validate everything a study needs before anything is written; return what it needs."""
    from ablate.evaluate import direction
    from ablate.storage import default_storage_url, open_storage, redact
    from ablate.trial import base_depth

    depths = {b.name: base_depth(b.model, trust_remote_code=config.trust_remote_code) for b in config.bases}
    _check_m(config, depths)
    study_dir = out / config.name
    info_path = study_dir / "study.json"
    resolved = config.model_dump(mode="json")
    if info_path.is_file():
        recorded = json.loads(info_path.read_text())
        if recorded.get("config") != resolved:
            raise UserError(f"study {config.name!r} in {out} was run with another config; rerun it with the same "
                            "config, or start a new study with --study NAME")
        storage = storage or recorded.get("storage")
        if storage and "***" in storage:
            raise UserError(f"study {config.name!r} uses a storage with a password; pass it again with --storage")
    url = storage or default_storage_url(study_dir)
    if storage is not None:
        open_storage(url)  # an unreachable or malformed URL fails here, before any folder exists
    return depths, study_dir, url, redact(url), direction(config.eval.objective), _device(device)


def run_study(config, *, trials: int, out: str | Path = "runs", storage: str | None = None,
              device: str = "auto", progress: bool = True) -> dict:
    """Run (or continue) the study until it has ``trials`` finished trials; return its summary."""
    import optuna

    from ablate.fsutil import atomic_dir, atomic_write_json
    from ablate.objective import Objective
    from ablate.results import write_csv
    from ablate.search import SearchSpace, enqueue_controls, make_pruner, make_sampler
    from ablate.storage import open_storage
    from ablate.summary import print_summary
    from ablate.trial import TrialFailed, Workspace

    if trials < 1:
        raise UserError(f"--trials {trials}: a study needs at least one trial")
    out = Path(out).expanduser()
    depths, study_dir, url, shown_url, direction, device = _prepare(config, out, storage, device)
    study_dir.mkdir(parents=True, exist_ok=True)
    tasks_dir = study_dir / "tasks"
    if config.eval.synthetic_tasks and not tasks_dir.is_dir():
        from ablate.synthetic import write_eval_tasks

        with atomic_dir(tasks_dir) as tmp:
            write_eval_tasks(tmp)
    space = SearchSpace(config, depths)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=config.name, storage=open_storage(url), direction=direction,
                                sampler=make_sampler(config, space), pruner=make_pruner(config),
                                load_if_exists=True)
    if not (study_dir / "study.json").is_file():
        atomic_write_json(study_dir / "study.json", {"name": config.name, "storage": shown_url,
                                                     "direction": direction, "config": config.model_dump(mode="json"),
                                                     "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    enqueue_controls(study, space)
    workspace = Workspace(config, device, tasks_dir if config.eval.synthetic_tasks else None, progress=progress)
    objective = Objective(space, workspace, study_dir, direction)
    csv = study_dir / "results.csv"
    total = len(space.arms())
    while _finished(study) + _running(study) < trials:
        if len(space.taken(study)) >= total:
            print(f"all {total} configurations of the study have run; raise repeats or widen the m ranges "
                  "for more trials")
            break
        done = _finished(study)
        if progress:
            print(f"trial {done + 1}/{trials} of study {config.name!r}")
        study.optimize(objective, n_trials=1, catch=(TrialFailed,),
                       callbacks=[lambda s, t: write_csv(s, csv)])
    write_csv(study, csv)
    return print_summary(study, space, study_dir)


@cli
def main(argv: list[str] | None = None) -> int:
    from ablate.config import apply_overrides  # noqa: F401  (re-exported for --help readers)
    from ablate.config import load_study_config

    parser = argparse.ArgumentParser(
        prog="python -m ablate.study",
        description="Run a Depth Up-Scaling layer-count study with Optuna (continues where it stopped).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m ablate.study --trials 20\n"
               "  python -m ablate.study --config studies/smoke.yaml --trials 3 --out /tmp/runs\n"
               "  python -m ablate.study --set train.lr=1e-3 --set repeats=3 --trials 40\n"
               "  python -m ablate.study --storage journal:runs/shared.log --trials 40   # several workers",
    )
    parser.add_argument("--trials", type=int, default=20,
                        help="finished (complete or pruned) trials the study should end with (default 20)")
    parser.add_argument("--config", default=None,
                        help="study YAML (default: the packaged default study, same as studies/default.yaml)")
    parser.add_argument("--study", default=None, help="study name (default: the config's name), e.g. --study lr-1e-3")
    parser.add_argument("--storage", default=None,
                        help="Optuna storage URL: default sqlite in <out>/<study>/study.db; journal:PATH.log for "
                             "several workers on one machine; postgresql://user:pass@host/db across machines")
    parser.add_argument("--out", default="runs", help="output folder (default runs/): <out>/<study>/ holds results")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a config value, e.g. --set train.tokens=200000 (repeatable)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:1")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler and of training (default: config)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.trials < 1:
        raise UserError(f"--trials {args.trials}: a study needs at least one trial; e.g. --trials 20")
    overrides = list(args.overrides)
    if args.study is not None:
        overrides.append(f"name={args.study}")
    if args.seed is not None:
        overrides += [f"sampler.seed={args.seed}", f"train.seed={args.seed}"]
    config = load_study_config(args.config, overrides)
    run_study(config, trials=args.trials, out=args.out, storage=args.storage, device=args.device,
              progress=not args.quiet)
    return 0


if __name__ == "__main__":
    main()
