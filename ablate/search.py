"""The search space of a study and a sampler that never repeats a configuration.

A configuration (an :class:`Arm`) is (base, method, m, repeat). Trials draw it with
``trial.suggest_*`` in exactly one place, :meth:`SearchSpace.suggest`. The space is
finite, so samplers like TPE happily propose a configuration that already ran;
:class:`NoRepeatSampler` wraps any Optuna sampler and moves such a proposal to the
nearest value that still leads to an unrun configuration, so a study of N trials runs N
distinct configurations (repeats add seeds, not duplicates). :class:`SweepSampler` (the
default) proposes the configurations in a fixed order instead. The controls are queued first
(:func:`enqueue_controls`), and a configuration whose trial died (a killed worker, Ctrl-C) is
queued again (:func:`requeue_lost`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import optuna
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.samplers import BaseSampler
from optuna.trial import TrialState

from ablate.config import StudyConfig

__all__ = ["Arm", "SearchSpace", "NoRepeatSampler", "SweepSampler", "make_sampler", "make_pruner", "enqueue_controls",
           "requeue_lost", "retry_failed", "retried"]


@dataclass(frozen=True)
class Arm:
    """One configuration: a base, a method ("dus" or "moe"), m (DUS only) and a repeat index."""

    base: str
    method: str
    m: int | None
    repeat: int

    def to_dict(self) -> dict:
        return asdict(self)


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
        self.methods = (["dus"] if config.methods.dus else []) + (["moe"] if config.methods.moe else [])
        self.m_values = {b.name: sorted(b.m) if b.m is not None else list(range(depths[b.name] // 2 + 1))
                         for b in config.bases}

    def methods_of(self, base: str) -> list[str]:
        """The arms of one base: MoE only where the base takes part in it."""
        spec = next(b for b in self.config.bases if b.name == base)
        return [m for m in self.methods if m != "moe" or spec.moe]

    def m_param(self, base: str) -> str:
        return f"m_{base}"

    def suggest(self, trial: optuna.trial.BaseTrial) -> Arm:
        """Draw a configuration: the only place a study calls ``trial.suggest_*``."""
        labels = [b.name for b in self.config.bases]
        base = trial.suggest_categorical("base", labels)
        methods = self.methods_of(base)
        method = trial.suggest_categorical(f"method_{base}", methods) if len(methods) > 1 else methods[0]
        m = None
        if method == "dus":
            dist = _m_distribution(self.m_values[base])
            if isinstance(dist, IntDistribution):
                m = trial.suggest_int(self.m_param(base), dist.low, dist.high, step=dist.step)
            else:
                m = trial.suggest_categorical(self.m_param(base), dist.choices)
        repeats = self.config.repeats
        repeat = trial.suggest_int("repeat", 0, repeats - 1) if repeats > 1 else 0
        return Arm(base, method, m, repeat)

    def params(self, arm: Arm) -> dict:
        """The Optuna parameters that make :meth:`suggest` return ``arm`` (for ``enqueue_trial``)."""
        out: dict = {"base": arm.base}
        if len(self.methods_of(arm.base)) > 1:
            out[f"method_{arm.base}"] = arm.method
        if arm.method == "dus":
            out[self.m_param(arm.base)] = arm.m
        if self.config.repeats > 1:
            out["repeat"] = arm.repeat
        return out

    def distributions(self, arm: Arm) -> dict:
        """The Optuna distributions of :meth:`params` (for ``optuna.trial.create_trial``)."""
        out: dict = {"base": CategoricalDistribution([b.name for b in self.config.bases])}
        if len(self.methods_of(arm.base)) > 1:
            out[f"method_{arm.base}"] = CategoricalDistribution(self.methods_of(arm.base))
        if arm.method == "dus":
            out[self.m_param(arm.base)] = _m_distribution(self.m_values[arm.base])
        if self.config.repeats > 1:
            out["repeat"] = IntDistribution(0, self.config.repeats - 1)
        return out

    def arms(self) -> list[Arm]:
        """Every configuration of the study."""
        out = []
        for b in self.config.bases:
            for method in self.methods_of(b.name):
                for m in self.m_values[b.name] if method == "dus" else [None]:
                    out.extend(Arm(b.name, method, m, r) for r in range(self.config.repeats))
        return out

    def arm_of(self, params: dict) -> Arm | None:
        """The configuration a complete set of parameters names (None if incomplete)."""
        base = params.get("base")
        if base is None:
            return None
        methods = self.methods_of(base)
        method = params.get(f"method_{base}", methods[0] if len(methods) == 1 else None)
        m = params.get(self.m_param(base)) if method == "dus" else None
        if method is None or (method == "dus" and m is None):
            return None
        return Arm(base, method, m, params.get("repeat", 0))

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
        """Every configuration, repeat 0 of each (base, method, m) before repeat 1 of any: a study
        of any length covers each base's whole m range before it adds seeds."""
        return sorted(self.arms(), key=lambda a: a.repeat)  # stable: bases, methods and m as listed

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


def make_pruner(config: StudyConfig):
    if config.pruner.kind == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=config.pruner.startup_trials,
                                       n_warmup_steps=config.pruner.warmup_evals)


def controls(space: SearchSpace) -> list[Arm]:
    """The configurations every study runs first, for every base: the unchanged base
    (m = n/2, same CPT), the MoE upcycle (same CPT), and SOLAR's m = n/4."""
    out = []
    for b in space.config.bases:
        n = space.depths[b.name]
        if "dus" in space.methods and n // 2 in space.m_values[b.name] and n % 2 == 0:
            out.append(Arm(b.name, "dus", n // 2, 0))
        if "moe" in space.methods_of(b.name):
            out.append(Arm(b.name, "moe", None, 0))
    for b in space.config.bases:
        n = space.depths[b.name]
        if "dus" in space.methods and n % 4 == 0 and n // 4 in space.m_values[b.name]:
            out.append(Arm(b.name, "dus", n // 4, 0))
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
