"""The study's objective: the single number a trial is scored by, and which way is better.

:class:`ObjectiveConfig` is the ``eval.objective`` block of a study config; :func:`objective_value`
reads it off a trial's metrics (``ablate.evaluate``'s perplexity and task results and
``ablate.synthetic.answer_metrics``, merged) and :func:`direction` tells Optuna whether to minimise
or maximise. Pure Python and pydantic: the config schema, the study, the figures and the summary
all read it without importing torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ablate.errors import UserError

__all__ = ["ObjectiveConfig", "direction", "objective_value"]

_LOSS_KEYS = ("val_loss", "val_ppl")
# kind -> (the metric it reads, direction, describe() text); each takes no keys. describe() texts
# stay within ~30 characters: figures use them as axis labels.
_FIXED = {
    "val_loss": ("val_loss", "minimize", "held-out loss"),
    "answer_loss": ("answer/loss", "minimize", "answer loss (nats, mean of k)"),
    "answer_acc": ("answer/acc", "maximize", "answer accuracy (mean of k)"),
}


def _minimised_key(key: str) -> bool:
    """Keys that are losses (lower is better): kind metric/mean would maximise them."""
    task, _, metric = key.partition("/")
    return key in _LOSS_KEYS or (metric == "loss" and (task == "answer" or task.startswith("answer_k")))


class ObjectiveConfig(BaseModel):
    """The single number a study optimises, read from a trial's metrics.

    ``{kind: val_loss}`` (the default), ``{kind: answer_loss}``, ``{kind: answer_acc}``,
    ``{kind: metric, keys: [arc_challenge/acc_norm]}`` or ``{kind: mean, keys: [synth_k1/acc, synth_k2/acc]}``.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["val_loss", "answer_loss", "answer_acc", "metric", "mean"] = Field(
        "val_loss",
        description="val_loss: held-out loss over all tokens (minimise; the least noisy signal at small "
        "budgets). answer_loss: loss of the answer of the synthetic k-step queries, mean over the levels k "
        "(minimise; answer/loss of ablate.synthetic.answer_metrics; it moves with reasoning, which the "
        "held-out loss hardly sees: answers are about 4% of its tokens). answer_acc: their accuracy, mean "
        "over k (maximise; answer/acc). metric: one 'task/metric' (maximise). mean: mean of several "
        "'task/metric' (maximise).",
    )
    keys: list[str] = Field(
        default_factory=list,
        description="The 'task/metric' result keys: exactly one for kind=metric, one or more for kind=mean, "
        "none for kind=val_loss, answer_loss and answer_acc.",
    )

    @model_validator(mode="after")
    def _keys_match_kind(self) -> ObjectiveConfig:
        if self.kind in _FIXED and self.keys:
            raise ValueError(f"kind '{self.kind}' takes no keys; use kind 'metric' or 'mean' to optimise task metrics")
        if self.kind == "metric" and len(self.keys) != 1:
            raise ValueError(f"kind 'metric' needs exactly one key, got {len(self.keys)}; use kind 'mean' for several")
        if self.kind == "mean" and not self.keys:
            raise ValueError("kind 'mean' needs at least one key, e.g. keys: [synth_k1/acc, synth_k2/acc]")
        if any(key in _LOSS_KEYS for key in self.keys):
            raise ValueError("val_loss/val_ppl are minimised: use kind 'val_loss' instead of listing them as keys")
        losses = [key for key in self.keys if _minimised_key(key)]
        if losses:
            raise ValueError(f"{', '.join(losses)}: lower is better, but kind '{self.kind}' maximises; use kind "
                             "'answer_loss' for the answer loss")
        bad = [key for key in self.keys if "/" not in key]
        if bad:
            raise ValueError(f"keys must look like 'task/metric' (e.g. arc_challenge/acc_norm), got {bad}")
        return self

    def describe(self) -> str:
        """A short human-readable name: 'held-out loss', 'answer loss (nats, mean of k)',
        'arc_challenge/acc_norm', 'mean of a, b'."""
        if self.kind in _FIXED:
            return _FIXED[self.kind][2]
        return self.keys[0] if self.kind == "metric" else f"mean of {', '.join(self.keys)}"


def direction(cfg: ObjectiveConfig) -> Literal["minimize", "maximize"]:
    """Optuna's direction for ``cfg``: losses (held-out, answer) are minimised, accuracies and task metrics
    maximised."""
    return _FIXED[cfg.kind][1] if cfg.kind in _FIXED else "maximize"


def objective_value(metrics: Mapping[str, float], cfg: ObjectiveConfig) -> float:
    """The objective from a trial's metrics (``perplexity``, ``evaluate`` and ``answer_metrics`` results merged)."""
    keys = [_FIXED[cfg.kind][0]] if cfg.kind in _FIXED else cfg.keys
    for key in keys:
        if key not in metrics:
            available = ", ".join(sorted(metrics)) or "none"
            hint = f" (kind '{cfg.kind}' needs eval.synthetic_tasks: true)" if cfg.kind.startswith("answer_") else ""
            raise UserError(f"objective key {key!r} is not in the evaluation results{hint}; available: {available}")
    return float(sum(float(metrics[key]) for key in keys) / len(keys))
