"""Experiment trackers: each finished trial logged to TensorBoard, Weights & Biases or MLflow.

``--log-with tensorboard|wandb|mlflow`` (the study config's ``log_with``) adds :class:`TrialLogger`
as an Optuna callback. When a trial ends it reads the trial's folder (the records are the source,
as for every result of ``ablate``) and logs, through accelerate's tracker classes, one run per
trial named ``trial-<number>``:

- the resolved config (the arm and the study, flattened to ``study.train.lr``-style keys) as
  hyper-parameters;
- the CPT curves of ``metrics.jsonl``: ``cpt/train_loss``, ``cpt/lr``, ``cpt/tokens_per_s``,
  ``cpt/grad_norm`` and ``cpt/val_loss`` (a cooldown branch's under ``cpt/branch-<tokens>/``);
- every budget point's scores (``budget/<metric>``) and the final metrics (``final/<metric>``,
  with ``final/objective``).

The x axis of every series is CPT tokens, the unit budgets are stated in. Where the runs go:
TensorBoard ``<study>/tensorboard/trial-<n>/`` (``tensorboard --logdir runs/<study>/tensorboard``);
W&B project ``<study>`` with local files under the study folder (``WANDB_MODE=offline`` works
without a network); MLflow experiment ``<study>`` wherever ``MLFLOW_TRACKING_URI`` points (e.g.
``sqlite:///mlflow.db``). Each tracker is an optional extra; asking for one that is not installed stops the
study before it starts, with the ``pip install`` line.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ablate.errors import UserError, one_line

__all__ = ["TRACKERS", "check_installed", "TrialLogger", "flatten"]

# tracker -> (the extra that installs it, the package a user would miss)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def _installed(kind: str) -> bool:
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    return {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available,
            "mlflow": is_mlflow_available}[kind]()


def check_installed(kind: str | None) -> None:
    """Raise a one-line :class:`UserError` naming the extra when tracker ``kind`` is not installed."""
    if kind is None:
        return
    if kind not in TRACKERS:
        raise UserError(f"--log-with {kind!r}: choose one of {', '.join(TRACKERS)}")
    if not _installed(kind):
        extra, package = TRACKERS[kind]
        raise UserError(f"--log-with {kind}: the {package} package is not installed; pip install 'ablate[{extra}]' "
                        "(or run without --log-with)")


def flatten(tree, prefix: str = "") -> dict:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": 1, "c": "[1, 2]"}``: the scalar hyper-parameters trackers take."""
    out = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    key = prefix.rstrip(".")
    if isinstance(tree, (bool, int, float, str)):
        out[key] = tree
    else:  # None, lists: as text (TensorBoard's hparams hold bool, number or string only)
        out[key] = json.dumps(tree)
    return out


def _scalars(metrics: dict, prefix: str) -> dict:
    return {f"{prefix}{k}": float(v) for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}


CURVES = ("train_loss", "lr", "tokens_per_s", "grad_norm", "val_loss", "aux_loss", "lm_loss")


class TrialLogger:
    """An Optuna callback: log each finished trial's folder to the tracker ``kind``."""

    def __init__(self, kind: str, study_dir: Path, study_name: str):
        check_installed(kind)
        self.kind = kind
        self.study_dir = Path(study_dir)
        self.study_name = study_name

    def _tracker(self, number: int):
        from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

        run = f"trial-{number}"
        if self.kind == "tensorboard":
            return TensorBoardTracker(run, self.study_dir / "tensorboard")
        if self.kind == "wandb":
            return WandBTracker(self.study_name, name=run, group=self.study_name, dir=str(self.study_dir))
        return MLflowTracker(experiment_name=self.study_name, run_name=run)

    def __call__(self, study, trial) -> None:
        folder = self.study_dir / "trials" / str(trial.number)
        if not (folder / "result.json").is_file():  # stood down as a duplicate, or cut short: nothing ran
            return
        try:
            self.log_trial(folder, trial.number, trial.state.name.lower())
        except Exception as exc:  # a tracker's outage must not stop a study whose records are on disk
            print(f"--log-with {self.kind}: trial {trial.number} was not logged ({one_line(exc, 200)})")

    def log_trial(self, folder: Path, number: int, state: str) -> None:
        """Log the trial folder ``folder`` as one tracker run."""
        record = json.loads((folder / "result.json").read_text())
        config = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").is_file() else {}
        tracker = self._tracker(number)
        tracker.start()
        try:
            tracker.store_init_configuration({**flatten(config), "trial": number, "state": state})
            metrics = folder / "metrics.jsonl"
            for line in metrics.read_text().splitlines() if metrics.is_file() else []:
                row = json.loads(line)
                prefix = f"cpt/branch-{row['branch']}/" if row.get("branch") else "cpt/"
                values = {f"{prefix}{k}": float(row[k]) for k in CURVES if row.get(k) is not None}
                if values:
                    tracker.log(values, step=int(row["tokens"]))
            for point in record.get("budgets") or []:
                tracker.log({**_scalars(point.get("metrics"), "budget/"),
                             **_scalars({"objective": point.get("objective")}, "budget/")}, step=int(point["tokens"]))
            final = {**_scalars(record.get("metrics"), "final/"), **_scalars({"objective": record.get("objective")},
                                                                             "final/")}
            if final:
                tracker.log(final, step=int(record.get("tokens") or 0))
        finally:
            tracker.finish()
