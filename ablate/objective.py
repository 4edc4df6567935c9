"""The study's objective: the single number a trial is scored by, and which way is better.

:class:`ObjectiveConfig` is the ``eval.objective`` block of a study config; :func:`objective_value`
reads it off a trial's metrics (``ablate.evaluate``'s perplexity and task results, merged) and
:func:`direction` tells Optuna whether to minimise or maximise. Pure Python and pydantic: the
config schema, the study, the figures and the summary all read it without importing torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ablate.errors import UserError

__all__ = ["ObjectiveConfig", "direction", "objective_value"]

_LOSS_KEYS = ("val_loss", "val_ppl")


class ObjectiveConfig(BaseModel):
    """The single number a study optimises, read from a trial's metrics.

    ``{kind: val_loss}`` (the default), ``{kind: metric, keys: [arc_challenge/acc_norm]}`` or
    ``{kind: mean, keys: [synth_k1/acc, synth_k2/acc]}``.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["val_loss", "metric", "mean"] = Field(
        "val_loss",
        description="val_loss: held-out loss (minimise; the least noisy signal at small budgets). "
        "metric: one 'task/metric' (maximise). mean: mean of several 'task/metric' (maximise).",
    )
    keys: list[str] = Field(
        default_factory=list,
        description="The 'task/metric' result keys: exactly one for kind=metric, one or more for kind=mean, "
        "none for kind=val_loss.",
    )

    @model_validator(mode="after")
    def _keys_match_kind(self) -> ObjectiveConfig:
        if self.kind == "val_loss" and self.keys:
            raise ValueError("kind 'val_loss' takes no keys; use kind 'metric' or 'mean' to optimise task metrics")
        if self.kind == "metric" and len(self.keys) != 1:
            raise ValueError(f"kind 'metric' needs exactly one key, got {len(self.keys)}; use kind 'mean' for several")
        if self.kind == "mean" and not self.keys:
            raise ValueError("kind 'mean' needs at least one key, e.g. keys: [synth_k1/acc, synth_k2/acc]")
        if any(key in _LOSS_KEYS for key in self.keys):
            raise ValueError("val_loss/val_ppl are minimised: use kind 'val_loss' instead of listing them as keys")
        bad = [key for key in self.keys if "/" not in key]
        if bad:
            raise ValueError(f"keys must look like 'task/metric' (e.g. arc_challenge/acc_norm), got {bad}")
        return self

    def describe(self) -> str:
        """A short human-readable name: 'held-out loss', 'arc_challenge/acc_norm', 'mean of a, b'."""
        if self.kind == "val_loss":
            return "held-out loss"
        return self.keys[0] if self.kind == "metric" else f"mean of {', '.join(self.keys)}"


def direction(cfg: ObjectiveConfig) -> Literal["minimize", "maximize"]:
    """Optuna's direction for ``cfg``: the held-out loss is minimised, task metrics maximised."""
    return "minimize" if cfg.kind == "val_loss" else "maximize"


def objective_value(metrics: Mapping[str, float], cfg: ObjectiveConfig) -> float:
    """The objective from a trial's metrics (``perplexity`` and ``evaluate`` results merged)."""
    keys = ["val_loss"] if cfg.kind == "val_loss" else cfg.keys
    for key in keys:
        if key not in metrics:
            available = ", ".join(sorted(metrics)) or "none"
            raise UserError(f"objective key {key!r} is not in the evaluation results; available: {available}")
    return float(sum(float(metrics[key]) for key in keys) / len(keys))
