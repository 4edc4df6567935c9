"""Study results as a tidy table: one row per trial, read from the trial folders.

Each finished trial's ``trials/<number>/result.json`` is its one record (written by
:class:`ablate.trial.Objective`); the table's numbers come from there. The Optuna storage, when
it can be opened, adds each trial's state (running and queued trials included, with their
configuration) and a pruned trial's last reported value. ``load`` is what notebooks and the
figures command use; ``results.csv`` in the study folder is the same table, refreshed after
every trial, so results travel without the database. Nothing here trains or builds a model.
"""

from __future__ import annotations

import json
from pathlib import Path

from ablate.errors import UserError
from ablate.fsutil import atomic_write_text
from ablate.storage import open_storage

__all__ = ["COLUMNS", "BUDGET_COLUMNS", "STATES", "read_records", "trial_rows", "budget_rows", "load",
           "load_budgets", "read_items", "write_csv", "study_dir_info", "storage_url", "open_study"]

# Fixed leading columns; task metrics ("synth_k1/acc", ...) follow in sorted order.
COLUMNS = ["study", "trial", "state", "base", "method", "n", "m", "s", "repeat", "lr", "seed", "data_order_seed",
           "peak_lr", "trainable", "params_total", "params_active", "params_trainable", "tokens", "branch_tokens",
           "flops", "val_loss", "val_ppl",
           "objective", "wall_s", "train_s", "eval_s", "device", "fail_reason"]
# budgets.csv: one row per trial and budget point (``budget``: the point in the study's unit, tokens or
# FLOPs, the same for every arm; ``budget_tokens``: it in this arm's tokens; ``tokens`` and ``flops``: what
# the model scored there was trained on, its branch's cooldown included)
BUDGET_COLUMNS = ["study", "trial", "state", "base", "method", "n", "m", "s", "repeat", "lr", "seed",
                  "data_order_seed", "peak_lr", "params_total", "params_active", "flops_per_token", "budget",
                  "budget_tokens", "tokens", "flops", "branch", "val_loss", "val_ppl", "cpt_val_loss", "objective"]
_INTS = ("trial", "n", "m", "s", "repeat", "seed", "data_order_seed", "params_total", "params_active",
         "params_trainable", "tokens",
         "branch_tokens", "budget_tokens", "flops_per_token")
# result.json's status -> the table's state (Optuna's COMPLETE, PRUNED, FAIL)
STATES = {"completed": "complete", "stopped": "pruned", "failed": "fail"}
ARM = ("base", "method", "m", "repeat", "lr")


def read_records(study_dir: str | Path) -> dict[int, dict]:
    """trial number -> its ``result.json``, for every trial folder that has a readable one."""
    out = {}
    folder = Path(study_dir) / "trials"
    for path in folder.glob("*/result.json") if folder.is_dir() else []:
        if not path.parent.name.isdigit():
            continue
        try:
            record = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            continue  # ablate.check reports it; the table leaves it out
        if isinstance(record, dict):
            out[int(path.parent.name)] = record
    return dict(sorted(out.items()))


def _row(name: str, number: int, state: str, record: dict, objective) -> dict:
    metrics = record.get("metrics") or {}
    row = {k: record.get(k) for k in COLUMNS}
    row.update(study=name, trial=number, state=state, val_loss=metrics.get("val_loss"),
               val_ppl=metrics.get("val_ppl"), objective=objective)
    row.update({k: v for k, v in metrics.items() if k not in ("val_loss", "val_ppl")})
    return row


def _point_rows(name: str, number: int, state: str, record: dict) -> list[dict]:
    rows = []
    for point in record.get("budgets") or []:
        metrics = point.get("metrics") or {}
        row = {k: record.get(k) for k in BUDGET_COLUMNS}
        row.update(study=name, trial=number, state=state, **{k: point.get(k) for k in
                   ("budget", "budget_tokens", "tokens", "flops", "branch", "cpt_val_loss", "objective")},
                   val_loss=metrics.get("val_loss"), val_ppl=metrics.get("val_ppl"))
        row.update({k: v for k, v in metrics.items() if k not in ("val_loss", "val_ppl")})
        rows.append(row)
    return rows


def read_items(study_dir: str | Path) -> dict[tuple[int, float, str], dict]:
    """(trial, budget point, task) -> ``{"hit": [...], "loss": [...]}``: every evaluation item's score, from
    each trial folder's ``items.jsonl`` (the synthetic answer items; the same items in every trial)."""
    out = {}
    folder = Path(study_dir) / "trials"
    for path in folder.glob("*/items.jsonl") if folder.is_dir() else []:
        if not path.parent.name.isdigit():
            continue
        try:
            for line in path.read_text().splitlines():
                row = json.loads(line)
                out[(int(path.parent.name), float(row["budget"]), row["task"])] = {"hit": row["hit"],
                                                                                   "loss": row["loss"]}
        except (json.JSONDecodeError, UnicodeDecodeError, OSError, KeyError, TypeError):
            continue  # a damaged file: those items are left out, the table is not
    return out


def budget_rows(study_dir: str | Path, study=None) -> list[dict]:
    """One dict per trial and budget point, for the trials :func:`trial_rows` has a record of."""
    records = read_records(study_dir)
    states = {}
    if study is not None:
        for t in study.get_trials(deepcopy=False):
            state = t.state.name.lower()
            if state in ("complete", "pruned") or (state == "fail" and "fail_reason" in t.user_attrs):
                states[t.number] = state
        records = {n: r for n, r in records.items() if n in states}
        name = study.study_name
    else:
        name = study_dir_info(study_dir).get("name", Path(study_dir).name)
    rows = []
    for number, record in records.items():
        rows += _point_rows(name, number, states.get(number, STATES.get(record.get("status"), "fail")), record)
    return rows


def trial_rows(study_dir: str | Path, study=None) -> list[dict]:
    """One dict per trial: the folder records, with the states of ``study`` (an ``optuna.Study``) when given.

    With the study, every trial of the storage has a row (running and queued ones with their
    configuration only), and a folder counts only for a trial the storage has finished. Without
    it, the rows are the folder records, their state read from the record.
    """
    records = read_records(study_dir)
    if study is None:
        name = study_dir_info(study_dir).get("name", Path(study_dir).name)
        return [_row(name, n, STATES.get(r.get("status"), "fail"), r, r.get("objective")) for n, r in records.items()]
    rows = []
    for t in study.get_trials(deepcopy=False):
        state = t.state.name.lower()
        finished = state in ("complete", "pruned") or (state == "fail" and "fail_reason" in t.user_attrs)
        record = records.get(t.number, {}) if finished else {}
        if not record:  # no folder (yet): the configuration and, for a failure, why
            record = {k: t.user_attrs.get(k) for k in (*ARM, "fail_reason")}
        value = t.value if t.values is not None and len(t.values) == 1 else None  # pruned: its last loss
        rows.append(_row(study.study_name, t.number, state, record, value))
    return rows


def _frame(rows: list[dict], columns: list[str] = COLUMNS):
    import pandas as pd

    extra = sorted({k for r in rows for k in r} - set(columns))
    frame = pd.DataFrame(rows, columns=columns + extra)
    for col in _INTS:
        if col in frame:
            frame[col] = frame[col].astype("Int64")  # integers with gaps (m of an MoE arm), not floats
    return frame


def write_csv(study_dir: str | Path, study=None) -> Path:
    """Write ``results.csv`` (one row per trial) and ``budgets.csv`` (one per trial and budget point)
    into ``study_dir`` atomically; return the first's path."""
    path = Path(study_dir) / "results.csv"
    atomic_write_text(path, _frame(trial_rows(study_dir, study)).to_csv(index=False))
    atomic_write_text(Path(study_dir) / "budgets.csv",
                      _frame(budget_rows(study_dir, study), BUDGET_COLUMNS).to_csv(index=False))
    return path


def study_dir_info(path: str | Path) -> dict:
    """The ``study.json`` record of a study folder (name, storage, config)."""
    info = Path(path) / "study.json"
    if not info.is_file():
        raise UserError(f"{path} is not a study folder (no study.json); pass <out>/<study name>")
    try:
        record = json.loads(info.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{info} is not valid JSON; restore it from the study's copy") from None
    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        raise UserError(f"{info} is not a study record (no study name); restore it from the study's copy")
    return record


def storage_url(path: str | Path, info: dict, storage: str | None = None) -> str | None:
    """The storage to read a study folder from: ``storage`` if given, else the recorded one.

    A recorded SQLite file that is gone (the folder was moved or copied, e.g. into ``paper/``)
    is replaced by the folder's own ``study.db``. None when nothing can be opened without
    creating an empty database or knowing a password.
    """
    url = storage or info.get("storage")
    if not url or "***" in url:
        return None
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        local = Path(path) / "study.db"
        return f"sqlite:///{local.resolve()}" if local.is_file() else None
    return url


def open_study(path: str | Path, info: dict | None = None, storage: str | None = None):
    """The ``optuna.Study`` of a study folder, or None when its storage cannot be opened here."""
    import optuna  # lazy: reading a copied study folder needs no database

    info = study_dir_info(path) if info is None else info
    url = storage_url(path, info, storage)
    if url is None:
        return None
    try:
        return optuna.load_study(study_name=info["name"], storage=open_storage(url))
    except (KeyError, ValueError, OSError, UserError):
        return None


def load_budgets(path: str | Path, *, storage: str | None = None):
    """A pandas DataFrame with one row per trial and budget point of the study folder ``path``.

    Columns: :data:`BUDGET_COLUMNS` then every metric. ``budget_tokens`` is the point (0 for the
    no-CPT reference), ``tokens`` and ``flops`` what the model scored there was trained on. A
    single-budget (cosine) trial has one row, the same numbers as its row of :func:`load`. Trial
    states come from the storage when it opens, else from the records.
    """
    import pandas as pd

    path = Path(path)
    info = study_dir_info(path)
    study = open_study(path, info, storage)
    if study is not None or (path / "trials").is_dir():
        return _frame(budget_rows(path, study), BUDGET_COLUMNS)
    csv = path / "budgets.csv"
    if not csv.is_file():
        raise UserError(f"{path}: the storage cannot be opened and there are no trial folders nor budgets.csv")
    return pd.read_csv(csv)


def load(path: str | Path, *, storage: str | None = None):
    """A pandas DataFrame with one row per trial of the study folder ``path`` (``runs/<study>``).

    The numbers come from the trial folders; the states from the storage recorded in
    ``study.json`` (pass ``storage=`` for one whose URL held a password, which is never
    recorded). Without a storage that opens, the folders alone give the finished trials; a folder
    without trial folders (an older copy) falls back to its ``results.csv``.
    """
    import pandas as pd

    path = Path(path)
    info = study_dir_info(path)
    study = open_study(path, info, storage)
    if study is not None or (path / "trials").is_dir():
        return _frame(trial_rows(path, study))
    csv = path / "results.csv"
    if not csv.is_file():
        raise UserError(f"{path}: the storage cannot be opened and there are no trial folders nor results.csv")
    return pd.read_csv(csv)
