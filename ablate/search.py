"""The search space of a study and a sampler that never repeats a configuration.

A configuration (an :class:`Arm`) is (base, method, m, repeat, lr): lr only where the study
gives a grid of learning rates (``train.lr: [1e-3, 3e-3]``), a nuisance parameter every arm runs
at each value of; method "nocpt" is the base with no CPT at all, one reference configuration per
base whatever the repeats and the grid. Trials draw it with
``trial.suggest_*`` in exactly one place, :meth:`SearchSpace.suggest`. The space is
finite, so samplers like TPE happily propose a configuration that already ran;
:class:`NoRepeatSampler` wraps any Optuna sampler and moves such a proposal to the
nearest value that still leads to an unrun configuration, so a study of N trials runs N
distinct configurations (repeats add seeds, not duplicates). :class:`SweepSampler` (the
default) proposes the configurations in a fixed order instead. The controls are queued first
(:func:`enqueue_controls`), and a configuration whose trial died (a killed worker, Ctrl-C) is
queued again (:func:`requeue_lost`). :func:`make_pruner` builds the study's pruner behind a guard
(:class:`GuardedPruner`) that never prunes a trial early in its budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import optuna
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.pruners import BasePruner
from optuna.samplers import BaseSampler
from optuna.trial import TrialState

from ablate.config import StudyConfig
from ablate.train import TrainConfig

__all__ = ["Arm", "SearchSpace", "NoRepeatSampler", "SweepSampler", "GuardedPruner", "make_sampler", "make_pruner",
           "report_steps", "enqueue_controls", "requeue_lost", "retry_failed", "retried", "train_config_for"]

NOCPT = "nocpt"  # the method of the reference configuration: the base as it is, no CPT


@dataclass(frozen=True)
class Arm:
    """One configuration: a base, a method ("dus", "moe", a layer-plan operator spelt as ``ablate.plan`` spells
    it such as "llama_pro(2)", or "nocpt": the base with no CPT at all), m (DUS only), a repeat index, and the
    learning rate (None where the study has one lr, and for "nocpt")."""

    base: str
    method: str
    m: int | None
    repeat: int
    lr: float | None = None

    def to_dict(self) -> dict:
        """The fields; ``lr`` only when set, so a study with one lr records what it always did."""
        out = asdict(self)
        if out["lr"] is None:
            del out["lr"]
        return out


def train_config_for(train: TrainConfig, arm: Arm) -> TrainConfig:
    """The CPT settings of ``arm``: the study's, at the arm's lr where the study gives an lr grid."""
    if arm.lr is not None:
        return train.model_copy(update={"lr": arm.lr})
    if isinstance(train.lr, list):
        raise ValueError(f"{arm} has no lr but the study's lr is the grid {train.lr}")
    return train


def _m_distribution(values: list[int]):
    values = sorted(values)
    steps = {b - a for a, b in zip(values, values[1:], strict=False)}
    if len(steps) <= 1:
        return IntDistribution(values[0], values[-1], step=steps.pop() if steps else 1)
    return CategoricalDistribution(values)


class SearchSpace:
    """The finite set of configurations of a study, and the mapping to Optuna parameters."""

    def __init__(self, config: StudyConfig, depths: dict[str, int]):
        self.config = config
        self.depths = depths  # base label -> n (its number of layers)
        self.methods = (["dus"] if config.methods.dus else []) + (["moe"] if config.methods.moe else []) + \
            list(config.methods.operators) + ([NOCPT] if config.methods.nocpt else [])  # an operator is its spelling
        self.m_values = {b.name: sorted(b.m) if b.m is not None else list(range(depths[b.name] // 2 + 1))
                         for b in config.bases}
        self.lrs = config.train.lr_grid  # a parameter "lr" only where there are several

    def methods_of(self, base: str) -> list[str]:
        """The arms of one base: MoE only where the base takes part in it."""
        spec = next(b for b in self.config.bases if b.name == base)
        return [m for m in self.methods if m != "moe" or spec.moe]

    def m_param(self, base: str) -> str:
        return f"m_{base}"

    def lrs_of(self, method: str) -> list[float | None]:
        """The lr values of an arm: each of the grid, or [None] (one lr, or no CPT)."""
        return list(self.lrs) if len(self.lrs) > 1 and method != NOCPT else [None]

    def count(self) -> int:
        """The number of configurations, counted without listing them (:meth:`arms`)."""
        per_repeat = sum(len(self.m_values[b.name]) * ("dus" in self.methods) + ("moe" in self.methods_of(b.name))
                         + len(self.config.methods.operators) for b in self.config.bases)
        return per_repeat * self.config.repeats * len(self.lrs_of("dus")) + \
            len(self.config.bases) * (NOCPT in self.methods)

    def suggest(self, trial: optuna.trial.BaseTrial) -> Arm:
        """Draw a configuration: the only place a study calls ``trial.suggest_*``."""
        labels = [b.name for b in self.config.bases]
        base = trial.suggest_categorical("base", labels)
        methods = self.methods_of(base)
        method = trial.suggest_categorical(f"method_{base}", methods) if len(methods) > 1 else methods[0]
        if method == NOCPT:
            return Arm(base, NOCPT, None, 0)
        m = None
        if method == "dus":
            dist = _m_distribution(self.m_values[base])
            if isinstance(dist, IntDistribution):
                m = trial.suggest_int(self.m_param(base), dist.low, dist.high, step=dist.step)
            else:
                m = trial.suggest_categorical(self.m_param(base), dist.choices)
        lr = trial.suggest_categorical("lr", self.lrs) if len(self.lrs) > 1 else None
        repeats = self.config.repeats
        repeat = trial.suggest_int("repeat", 0, repeats - 1) if repeats > 1 else 0
        return Arm(base, method, m, repeat, lr)

    def params(self, arm: Arm) -> dict:
        """The Optuna parameters that make :meth:`suggest` return ``arm`` (for ``enqueue_trial``)."""
        out: dict = {"base": arm.base}
        if len(self.methods_of(arm.base)) > 1:
            out[f"method_{arm.base}"] = arm.method
        if arm.method == "dus":
            out[self.m_param(arm.base)] = arm.m
        if arm.method != NOCPT and len(self.lrs) > 1:
            out["lr"] = arm.lr
        if arm.method != NOCPT and self.config.repeats > 1:
            out["repeat"] = arm.repeat
        return out

    def distributions(self, arm: Arm) -> dict:
        """The Optuna distributions of :meth:`params` (for ``optuna.trial.create_trial``)."""
        out: dict = {"base": CategoricalDistribution([b.name for b in self.config.bases])}
        if len(self.methods_of(arm.base)) > 1:
            out[f"method_{arm.base}"] = CategoricalDistribution(self.methods_of(arm.base))
        if arm.method == "dus":
            out[self.m_param(arm.base)] = _m_distribution(self.m_values[arm.base])
        if arm.method != NOCPT and len(self.lrs) > 1:
            out["lr"] = CategoricalDistribution(self.lrs)
        if arm.method != NOCPT and self.config.repeats > 1:
            out["repeat"] = IntDistribution(0, self.config.repeats - 1)
        return out

    def arms(self) -> list[Arm]:
        """Every configuration of the study: per base, per method and m, each repeat at each lr."""
        out = []
        for b in self.config.bases:
            for method in self.methods_of(b.name):
                if method == NOCPT:
                    out.append(Arm(b.name, NOCPT, None, 0))
                    continue
                for m in self.m_values[b.name] if method == "dus" else [None]:
                    out.extend(Arm(b.name, method, m, r, lr) for r in range(self.config.repeats)
                               for lr in self.lrs_of(method))
        return out

    def arm_of(self, params: dict) -> Arm | None:
        """The configuration a complete set of parameters names (None if incomplete)."""
        base = params.get("base")
        if base is None:
            return None
        methods = self.methods_of(base)
        method = params.get(f"method_{base}", methods[0] if len(methods) == 1 else None)
        if method == NOCPT:
            return Arm(base, NOCPT, None, 0)
        m = params.get(self.m_param(base)) if method == "dus" else None
        lr = params.get("lr") if len(self.lrs) > 1 else None
        if method is None or (method == "dus" and m is None) or (len(self.lrs) > 1 and lr is None):
            return None
        return Arm(base, method, m, params.get("repeat", 0), lr)

    def trial_arm(self, trial) -> Arm | None:
        """The configuration of a (frozen) trial: its parameters, or the fixed ones of a queued trial."""
        params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
        return self.arm_of(params)

    def holders(self, study: optuna.Study, exclude: int | None = None) -> dict[Arm, list[int]]:
        """Configuration -> numbers of the trials that ran it, run it or are queued to run it.

        A trial that failed with a recorded reason (divergence, a broken variant) keeps its
        configuration: rerunning it would fail the same way, until :func:`retry_failed` queues it
        again. One that died without a reason (killed, stale, interrupted) gives its configuration
        back, and so does a trial that stood down because another trial held its configuration
        (``duplicate_of``).
        """
        out: dict[Arm, list[int]] = {}
        trials = study.get_trials(deepcopy=False)
        again = retried(trials)
        for t in trials:
            if t.number == exclude or "duplicate_of" in t.user_attrs:
                continue
            if t.state == TrialState.FAIL and ("fail_reason" not in t.user_attrs or t.number in again):
                continue
            arm = self.trial_arm(t)
            if arm is not None:
                out.setdefault(arm, []).append(t.number)
        return out

    def taken(self, study: optuna.Study, exclude: int | None = None) -> set[Arm]:
        """Configurations that ran, are running or are queued (see :meth:`holders`)."""
        return set(self.holders(study, exclude))

    def sweep_order(self) -> list[Arm]:
        """Every configuration, the no-CPT references first, then repeat 0 of each (base, method, m)
        before repeat 1 of any, the lrs of one (base, method, m, repeat) next to each other: a study
        of any length covers each base's whole m range before it adds seeds."""
        # stable: bases, methods, m and lrs as listed
        return sorted(self.arms(), key=lambda a: (a.method != NOCPT, a.repeat))

    def open_values(self, partial: dict, name: str, taken: set[Arm]) -> list:
        """Values of parameter ``name`` that, given ``partial``, still reach an untaken configuration."""
        values = []
        for arm in self.arms():
            if arm in taken:
                continue
            p = self.params(arm)
            if name in p and all(p.get(k) == v for k, v in partial.items() if k in p) and \
                    all(k in p for k in partial):
                values.append(p[name])
        return sorted(set(values), key=lambda v: (str(type(v)), v))


def _nearest(values: list, proposal):
    if isinstance(proposal, (int, float)) and all(isinstance(v, (int, float)) for v in values):
        return min(values, key=lambda v: (abs(v - proposal), v))
    return values[0]


class NoRepeatSampler(BaseSampler):
    """Wraps a sampler; moves a proposal that would repeat a configuration to the nearest open value."""

    def __init__(self, base: BaseSampler, space: SearchSpace):
        self.base = base
        self.space = space

    def infer_relative_search_space(self, study, trial):
        return {}  # independent sampling only: each value is checked as it is drawn

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        proposal = self.base.sample_independent(study, trial, param_name, param_distribution)
        open_values = self.space.open_values(dict(trial.params), param_name,
                                             self.space.taken(study, exclude=trial.number))
        if not open_values or proposal in open_values:
            return proposal
        return _nearest(open_values, proposal)

    def before_trial(self, study, trial):
        self.base.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()


class SweepSampler(BaseSampler):
    """Proposes the first configuration of :meth:`SearchSpace.sweep_order` that has not run.

    For a study whose question is "how does the score change with m", not "which m is best": the
    model-based samplers go where the objective is good, and across bases that means the base
    with the lower loss, not the one whose m range is still open (the first default study ran
    TPE: 15 of 20 trials on one base, and the other base's deepest variant never ran).
    """

    def __init__(self, space: SearchSpace, seed: int = 0):
        self.space = space
        self.fallback = optuna.samplers.RandomSampler(seed=seed)

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        partial, taken = dict(trial.params), self.space.taken(study, exclude=trial.number)
        for arm in self.space.sweep_order():
            params = self.space.params(arm)
            if arm not in taken and param_name in params and \
                    all(k in params and params[k] == v for k, v in partial.items()):
                return params[param_name]
        # every configuration ran (the study loop stops before this): any value
        return self.fallback.sample_independent(study, trial, param_name, param_distribution)


def make_sampler(config: StudyConfig, space: SearchSpace) -> BaseSampler:
    kind, seed = config.sampler.kind, config.sampler.seed
    if kind == "sweep":
        base = SweepSampler(space, seed)
    elif kind == "tpe":
        base = optuna.samplers.TPESampler(seed=seed)
    else:  # random, and grid: every configuration in random order (NoRepeatSampler moves repeats)
        base = optuna.samplers.RandomSampler(seed=seed)
    return NoRepeatSampler(base, space)


def report_steps(train: TrainConfig) -> tuple[list[int], int]:
    """The steps at which a trial reports intermediate values to the pruner, and the step of the full budget.

    Schedule wsd: the budget points, in tokens trained (``trial.report(value, step=point.tokens)``),
    each rounded down to whole steps of ``tokens_per_step`` as :func:`ablate.train.plan_points` does; a
    trial that reports the configured point instead meets the same rungs, since a point is at least
    one step from the next. Schedule cosine: the optimizer steps of the held-out evaluations (every
    ``eval_every`` steps and after the last), the full budget being ``tokens // tokens_per_step`` steps.
    """
    if train.schedule == "wsd":
        step = train.tokens_per_step
        return [b // step * step for b in train.budget_points], train.tokens // step * step
    steps = train.tokens // train.tokens_per_step
    return sorted({*range(train.eval_every, steps + 1, train.eval_every), steps}), steps


class GuardedPruner(BasePruner):
    """A pruner that never prunes a trial at a reported step below ``min_step``, nor at or past ``full``.

    A fresh variant's loss first jumps, then recovers: a rule on early values prunes exactly the arms
    under study. At the full budget the trial has trained everything, so there is nothing to save.
    The wrapped pruner still sees every report: successive halving records a trial's value at each
    rung it passes, and later trials compare with those values.
    """

    def __init__(self, pruner: BasePruner, min_step: float, full: int):
        self.pruner = pruner
        self.min_step = min_step
        self.full = full

    def prune(self, study, trial) -> bool:
        decision = self.pruner.prune(study, trial)
        step = trial.last_step
        return bool(decision) and step is not None and self.min_step <= step < self.full


def make_pruner(config: StudyConfig) -> BasePruner:
    """The study's pruner, in the unit of the steps trials report (:func:`report_steps`), guarded
    by ``pruner.min_fraction`` (:class:`GuardedPruner`)."""
    p, train = config.pruner, config.train
    if p.kind == "none":
        return optuna.pruners.NopPruner()
    points, full = report_steps(train)
    if p.kind == "median":  # warmup_evals counts evaluations (budget points), MedianPruner counts steps
        warmup = points[p.warmup_evals] if p.warmup_evals < len(points) else full + 1
        # n_min_trials: only finished trials that reported at the step count, never the no-CPT references
        inner = optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=warmup,
                                            n_min_trials=max(1, p.startup_trials))
    elif p.kind == "successive_halving":  # the config requires schedule wsd: points are budget points
        inner = optuna.pruners.SuccessiveHalvingPruner(min_resource=points[0], reduction_factor=p.reduction_factor)
    else:
        inner = optuna.pruners.HyperbandPruner(min_resource=points[0], max_resource=full,
                                               reduction_factor=p.reduction_factor)
    return GuardedPruner(inner, p.min_fraction * full, full)


def controls(space: SearchSpace) -> list[Arm]:
    """The configurations every study runs first: each base with no CPT at all, then for every base
    the unchanged base (m = n/2, same CPT) and the MoE upcycle (same CPT), then SOLAR's m = n/4;
    each at every lr of the study's grid."""
    out = [Arm(b.name, NOCPT, None, 0) for b in space.config.bases if NOCPT in space.methods]
    lrs = space.lrs_of("dus")
    for b in space.config.bases:
        n = space.depths[b.name]
        if "dus" in space.methods and n // 2 in space.m_values[b.name] and n % 2 == 0:
            out.extend(Arm(b.name, "dus", n // 2, 0, lr) for lr in lrs)
        if "moe" in space.methods_of(b.name):
            out.extend(Arm(b.name, "moe", None, 0, lr) for lr in lrs)
    for b in space.config.bases:
        n = space.depths[b.name]
        if "dus" in space.methods and n % 4 == 0 and n // 4 in space.m_values[b.name]:
            out.extend(Arm(b.name, "dus", n // 4, 0, lr) for lr in lrs)
    return out


def enqueue_controls(study: optuna.Study, space: SearchSpace) -> list[Arm]:
    """Queue the controls that have not run yet (safe to call on every start)."""
    queued = []
    taken = space.taken(study)
    for arm in controls(space):
        if arm not in taken:
            study.enqueue_trial(space.params(arm), skip_if_exists=True)
            queued.append(arm)
    return queued


def retried(trials) -> set[int]:
    """Numbers of the failed trials that a later trial runs again (its ``retry_of``)."""
    return {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}


def requeue_lost(study: optuna.Study, space: SearchSpace) -> list[Arm]:
    """Queue again each configuration whose trial died without a reason and that no trial holds now.

    A killed or interrupted trial is failed without a reason and frees its configuration; this
    puts it back at the front of the queue so it runs next, however often its worker died: a
    configuration leaves the queue only by finishing, or by failing for a reason of its own (a
    diverged loss, a broken variant), which its trial records. A kill is never such a reason: a
    user's ``kill -9`` and the kernel's out-of-memory killer look the same from here, and the
    summary reports how often each configuration's worker died. Call it where no other worker
    samples at the same time.
    """
    lost: dict[Arm, list] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        arm = space.trial_arm(t)
        if arm is not None and "fail_reason" not in t.user_attrs and "duplicate_of" not in t.user_attrs:
            lost.setdefault(arm, []).append(t)
    taken = space.taken(study)
    queued = []
    for arm, dead in lost.items():
        if arm in taken:
            continue
        study.enqueue_trial(space.params(arm), user_attrs={**arm.to_dict(), "retry_of": dead[-1].number})
        queued.append(arm)
    return queued


def retry_failed(study: optuna.Study, space: SearchSpace) -> list[Arm]:
    """Queue again every configuration whose last trial failed for a reason of its own (``--retry-failed``).

    The failed trial stays in the storage as it was; the new one names it (``retry_of``), which
    gives the configuration back. Call it where no other worker samples at the same time.
    """
    trials = study.get_trials(deepcopy=False)
    again = retried(trials)
    queued = []
    for t in trials:
        arm = space.trial_arm(t)
        if t.state != TrialState.FAIL or "fail_reason" not in t.user_attrs or "duplicate_of" in t.user_attrs \
                or t.number in again or arm is None:
            continue
        if space.holders(study).get(arm) != [t.number]:  # another trial holds (or ran) it meanwhile
            continue
        study.enqueue_trial(space.params(arm), user_attrs={**arm.to_dict(), "retry_of": t.number})
        queued.append(arm)
    return queued
