"""The audit of a study's records: the Optuna storage's trial states against the trial folders.

A trial's folder ``trials/<number>/`` (its ``result.json``) is its one record, and the storage
holds each trial's state and value; :func:`check_study` lists every disagreement between the two
(tests run it after each crash and kill). ``results.csv`` is derived from both and is not
audited. Checking a study's inputs before it starts is :mod:`ablate.preflight`'s job.

    python -m ablate.check runs/default              # prints the problems; exit 1 if any
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import optuna

from ablate.errors import UserError, cli
from ablate.results import study_dir_info
from ablate.search import retried
from ablate.storage import open_storage

__all__ = ["check_study", "main"]

STARTED = ("COMPLETE", "PRUNED", "RUNNING")


def _close(a, b) -> bool:
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)) or (isinstance(b, float) and math.isnan(b)):
        return (a is None or a != a) and (b is None or b != b)
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)


def _arm(attrs: dict) -> tuple:
    """A configuration as recorded: (base, method, m, repeat, lr), lr None where the study has one lr
    (its records carry no lr) and for the no-CPT reference."""
    return attrs.get("base"), attrs.get("method"), attrs.get("m"), attrs.get("repeat"), attrs.get("lr")


def _check_folder(folder: Path, t) -> list[str]:
    """A finished trial's folder against its storage record."""
    name = f"trials/{t.number}"
    missing = [f for f in ("config.yaml", "env.json", "result.json") if not (folder / f).is_file()]
    if missing:
        return [f"{name} lacks {', '.join(missing)}"]
    try:
        result = json.loads((folder / "result.json").read_text())
    except json.JSONDecodeError:
        return [f"{name}/result.json is not valid JSON"]
    out = []
    if result.get("trial") != t.number:
        out.append(f"{name}/result.json names trial {result.get('trial')}")
    if _arm(result) != _arm(t.user_attrs):
        out.append(f"{name}/result.json has configuration {_arm(result)} but the storage {_arm(t.user_attrs)}")
    expected = {"COMPLETE": "completed", "PRUNED": "stopped", "FAIL": "failed"}[t.state.name]
    if result.get("status") != expected:
        out.append(f"{name}/result.json has status {result.get('status')!r} but the trial is {t.state.name}")
    if t.state.name == "COMPLETE" and not _close(result.get("objective"), t.value):
        out.append(f"{name}/result.json has objective {result.get('objective')} but the storage {t.value}")
    return out


def _check_folders(study_dir: Path, trials: list) -> list[str]:
    folder = study_dir / "trials"
    entries = list(folder.iterdir()) if folder.is_dir() else []
    done = {int(p.name): p for p in entries if p.is_dir() and p.name.isdigit()}
    by_number = {t.number: t for t in trials}
    out = []
    for t in trials:
        state, path = t.state.name, done.get(t.number)
        if state in ("COMPLETE", "PRUNED"):
            out += _check_folder(path, t) if path else [f"trial {t.number} is {state} but has no folder trials/"
                                                        f"{t.number}"]
        elif state == "FAIL" and path is not None:
            if "fail_reason" not in t.user_attrs or "duplicate_of" in t.user_attrs:
                out.append(f"trials/{t.number} looks complete but trial {t.number} failed without running to a "
                           "result (killed, interrupted or a duplicate)")
            else:
                out += _check_folder(path, t)
        elif state in ("RUNNING", "WAITING") and path is not None:
            out.append(f"trials/{t.number} looks complete but the storage has the trial {state}")
    out += [f"trials/{n} has no trial in the storage" for n in sorted(done) if n not in by_number]
    for p in entries:
        match = re.match(r"^\.(\d+)\.(partial|old)-", p.name)
        owner = by_number.get(int(match.group(1))) if match else None
        if match and (owner is None or owner.state.name != "RUNNING"):
            out.append(f"trials/{p.name} is a leftover of an unfinished write")
    return out


def _check_configurations(trials: list) -> list[str]:
    """No configuration ran twice: duplicates that stood down, trials that died and failures that ran
    again do not count."""
    seen: dict[tuple, list[int]] = {}
    again = retried(trials)  # failed trials that --retry-failed ran again
    for t in trials:
        started = t.state.name in STARTED or (t.state.name == "FAIL" and "fail_reason" in t.user_attrs
                                              and t.number not in again)
        if started and "duplicate_of" not in t.user_attrs and t.user_attrs.get("base") is not None:
            seen.setdefault(_arm(t.user_attrs), []).append(t.number)
    return [f"configuration {arm} ran in trials {numbers}" for arm, numbers in seen.items() if len(numbers) > 1]


def check_study(study_dir: str | Path, storage: str | None = None) -> list[str]:
    """Every disagreement between a study's storage and its ``trials/`` folders.

    - a finished trial has a complete folder whose ``result.json`` matches its state, value and
      configuration, and a failed trial's folder (when it has one) records the failure;
    - no folder looks complete for a trial the storage has not finished (killed, running,
      queued or unknown), and no ``.N.partial-*`` leftover remains beside a finished trial;
    - no configuration ran twice.

    ``storage`` overrides the URL in ``study.json`` (needed when it held a password).
    """
    study_dir = Path(study_dir)
    info = study_dir_info(study_dir)
    url = storage or info.get("storage")
    if not url or "***" in url:
        raise UserError(f"{study_dir}: its storage URL held a password, which is never recorded; pass it again")
    try:
        study = optuna.load_study(study_name=info["name"], storage=open_storage(url))
    except KeyError:
        return [f"the storage {info.get('storage')} has no study {info['name']!r}"]
    trials = study.get_trials(deepcopy=False)
    return _check_folders(study_dir, trials) + _check_configurations(trials)


@cli
def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog or "python -m ablate.check",
                                     description="List disagreements between a study's storage and its trial "
                                                 "folders (exit 1 if there are any).")
    parser.add_argument("study", help="a study folder, e.g. runs/default")
    parser.add_argument("--storage", default=None, help="storage URL, when study.json's is redacted")
    args = parser.parse_args(argv)
    problems = check_study(args.study, args.storage)
    for line in problems:
        print(line)
    print(f"{len(problems)} problem(s) in {args.study}" if problems else f"{args.study}: consistent")
    return 1 if problems else 0


if __name__ == "__main__":
    main()
