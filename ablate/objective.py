"""The Optuna objective: one trial from sampled configuration to recorded result.

A callable class (Optuna's recommended shape): ``trial.suggest_*`` happens only in
:meth:`ablate.search.SearchSpace.suggest`; this class reports held-out loss during CPT
so the pruner can stop hopeless trials, records every number as user attributes, and
writes the trial's folder ``<study>/trials/<number>/`` atomically: the resolved
config, ``env.json``, CPT's ``metrics.jsonl`` and ``result.json``.

With a :class:`~ablate.storage.Worker` (the study command always passes one) the trial is
marked with the process that runs it, and once its configuration is in the storage the
study's sampling lock is released. A trial whose configuration another trial already holds
(possible only where workers cannot lock each other out) stands down before doing any work:
it fails with ``duplicate_of`` set, which gives the configuration back to the study, so no
configuration ever runs twice, at worst it is drawn again later.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import optuna
import yaml

from ablate.fsutil import atomic_dir, atomic_write_json, atomic_write_text
from ablate.search import SearchSpace
from ablate.storage import Worker
from ablate.trial import TrialFailed, Workspace, environment, run_trial

__all__ = ["Objective", "RECORDED"]

# Record fields stored as Optuna user attributes (the rest stays in result.json).
RECORDED = ("n", "s", "seed", "data_order_seed", "params_total", "params_active", "tokens", "flops", "device",
            "metrics", "build_s", "train_s", "eval_s", "wall_s")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__


class Objective:
    """``objective(trial) -> float``: the study's objective value of one sampled configuration."""

    def __init__(self, space: SearchSpace, workspace: Workspace, study_dir: Path, direction: str,
                 worker: Worker | None = None):
        self.space = space
        self.ws = workspace
        self.study_dir = Path(study_dir)
        self.direction = direction
        self.worker = worker

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            return self._run(trial)
        except KeyboardInterrupt:
            # Optuna fails the trial; the mark keeps Ctrl-C from counting as a crash of this configuration
            with contextlib.suppress(Exception):
                trial.set_user_attr("interrupted", True)
            raise

    def _claim(self, trial: optuna.Trial):
        """Draw the configuration and make it this trial's, under the worker's sampling lock."""
        if self.worker is not None:
            self.worker.mark(trial)
        arm = self.space.suggest(trial)
        for key, value in arm.to_dict().items():
            trial.set_user_attr(key, value)
        if self.worker is None:
            return arm
        holders = self.space.holders(trial.study, exclude=trial.number).get(arm)
        self.worker.release()
        if holders:
            reason = f"duplicate of trial {holders[0]} (drawn by two workers at once); not run"
            trial.set_user_attr("duplicate_of", holders[0])
            trial.set_user_attr("fail_reason", reason)
            raise TrialFailed(reason)
        return arm

    def _run(self, trial: optuna.Trial) -> float:
        arm = self._claim(trial)
        sign = 1.0 if self.direction == "minimize" else -1.0  # pruners read intermediate values in the
        # study's direction, so a maximised objective gets minus the held-out loss

        def on_eval(step: int, tokens: int, val_loss: float) -> bool:
            trial.report(sign * val_loss, step)
            return trial.should_prune()

        failure = None
        with atomic_dir(self.study_dir / "trials" / str(trial.number), overwrite=True) as folder:
            resolved = self.ws.config.model_dump(mode="json")
            atomic_write_text(folder / "config.yaml", yaml.safe_dump({"arm": arm.to_dict(), "study": resolved},
                                                                     sort_keys=False))
            atomic_write_json(folder / "env.json", environment(str(self.ws.device)))
            try:
                record = run_trial(self.ws, arm, folder, on_eval)
            except (KeyboardInterrupt, SystemExit):
                raise  # not the configuration's fault: the trial stays unrecorded and runs again
            except Exception as exc:  # any failure of this configuration is recorded, the study goes on
                failure = _one_line(exc)
                record = {**arm.to_dict(), "status": "failed", "fail_reason": failure}
            record["trial"] = trial.number
            atomic_write_json(folder / "result.json", record)
        for key in RECORDED:
            if key in record:
                trial.set_user_attr(key, record[key])
        if failure is not None:
            trial.set_user_attr("fail_reason", failure)
            raise TrialFailed(failure)
        if record["status"] == "stopped":
            raise optuna.TrialPruned(record.get("reason", "pruned"))
        return float(record["objective"])
