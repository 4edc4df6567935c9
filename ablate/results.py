"""Study results as a tidy table: one row per trial, read from the Optuna storage.

``load`` is what notebooks and the figures command use; ``results.csv`` in the study
folder is the same table, refreshed after every trial, so results travel without the
database. Nothing here trains or builds a model.
"""

from __future__ import annotations

import json
from pathlib import Path

from ablate.errors import UserError
from ablate.fsutil import atomic_write_text

__all__ = ["COLUMNS", "trial_rows", "load", "write_csv", "study_dir_info", "storage_url"]

# Fixed leading columns; task metrics ("synth_k1/acc", ...) follow in sorted order.
COLUMNS = ["study", "trial", "state", "base", "method", "n", "m", "s", "repeat", "seed", "data_order_seed",
           "params_total", "params_active", "tokens", "flops", "val_loss", "val_ppl", "objective", "wall_s", "train_s",
           "eval_s", "device", "fail_reason"]


def trial_rows(study) -> list[dict]:
    """One dict per trial of an ``optuna.Study`` (every state, the running ones included)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        metrics = a.get("metrics", {})
        row = {
            "study": study.study_name, "trial": t.number, "state": t.state.name.lower(),
            "base": a.get("base"), "method": a.get("method"), "n": a.get("n"), "m": a.get("m"),
            "s": a.get("s"), "repeat": a.get("repeat"), "seed": a.get("seed"),
            "data_order_seed": a.get("data_order_seed"),
            "params_total": a.get("params_total"), "params_active": a.get("params_active"),
            "tokens": a.get("tokens"), "flops": a.get("flops"),
            "val_loss": metrics.get("val_loss"), "val_ppl": metrics.get("val_ppl"),
            "objective": t.value if t.values is not None and len(t.values) == 1 else None,
            "wall_s": a.get("wall_s"), "train_s": a.get("train_s"), "eval_s": a.get("eval_s"),
            "device": a.get("device"), "fail_reason": a.get("fail_reason"),
        }
        row.update({k: v for k, v in metrics.items() if k not in ("val_loss", "val_ppl")})
        rows.append(row)
    return rows


def _frame(rows: list[dict]):
    import pandas as pd

    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    frame = pd.DataFrame(rows, columns=COLUMNS + extra)
    for col in ("trial", "n", "m", "s", "repeat", "seed", "data_order_seed", "params_total", "params_active", "tokens"):
        frame[col] = frame[col].astype("Int64")  # integers with gaps (m of an MoE arm), not floats
    return frame


def write_csv(study, path: str | Path) -> None:
    """Write the study's table to ``path`` atomically."""
    atomic_write_text(path, _frame(trial_rows(study)).to_csv(index=False))


def study_dir_info(path: str | Path) -> dict:
    """The ``study.json`` record of a study folder (name, storage, config)."""
    info = Path(path) / "study.json"
    if not info.is_file():
        raise UserError(f"{path} is not a study folder (no study.json); pass <out>/<study name>")
    return json.loads(info.read_text())


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


def load(path: str | Path, *, storage: str | None = None, study_name: str | None = None):
    """A pandas DataFrame with one row per trial.

    ``path`` is a study folder (``runs/<study>``). The storage recorded there is read
    (pass ``storage=`` for one whose URL held a password, which is never recorded); if it
    cannot be opened, the folder's ``results.csv`` is read instead.
    """
    import pandas as pd

    path = Path(path)
    info = study_dir_info(path)
    url = storage_url(path, info, storage)
    if url is not None:
        import optuna

        from ablate.storage import open_storage

        try:
            study = optuna.load_study(study_name=study_name or info["name"], storage=open_storage(url))
            return _frame(trial_rows(study))
        except (KeyError, ValueError, OSError, UserError):
            pass
    csv = path / "results.csv"
    if not csv.is_file():
        raise UserError(f"{path}: the storage cannot be opened and there is no results.csv yet")
    return pd.read_csv(csv)
