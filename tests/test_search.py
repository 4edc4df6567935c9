"""The study's search space: FixedTrial round trips, no configuration ever repeats (sweep, TPE,
random, grid), the sweep covers every configuration before a second seed, the controls run
first, and a killed trial's configuration becomes free again. An lr grid runs every arm at every
lr; the no-CPT reference is one configuration per base; the pruner never prunes before its guard."""

import math

import optuna
import pytest
from optuna.trial import FixedTrial, TrialState

from ablate.config import parse_config
from ablate.search import (
    Arm,
    GuardedPruner,
    SearchSpace,
    controls,
    enqueue_controls,
    make_pruner,
    make_sampler,
    report_steps,
    train_config_for,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)
LRS = [1e-3, 3e-3]


def make_space(repeats=1, moe=True, sampler="tpe", lr=1e-3, nocpt=True):
    tree = {
        "name": "t",
        "bases": [{"model": "a"}, {"model": "b", "m": [0, 2, 4, 5], "moe": False}],
        "methods": {"dus": True, "moe": {"experts": 4, "top_k": 2} if moe else None, "nocpt": nocpt},
        "train": {"tokens": 1000, "lr": lr},
        "repeats": repeats,
        "sampler": {"kind": sampler, "seed": 3},
    }
    config = parse_config(tree)
    return config, SearchSpace(config, {"a": 8, "b": 12})


@pytest.mark.parametrize("lr", [1e-3, LRS], ids=["one-lr", "lr-grid"])
def test_fixed_trial_round_trip_for_every_arm(lr):
    _, space = make_space(repeats=2, lr=lr)
    arms = space.arms()
    lrs = len(lr) if isinstance(lr, list) else 1
    # a: m 0..4 (5) + moe, times 2 repeats; b: m in the list (4), no moe, times 2; each at every lr; one nocpt per base
    assert len(arms) == ((5 + 1) * 2 + 4 * 2) * lrs + 2 == len(set(arms)) == space.count()
    for arm in arms:
        assert space.suggest(FixedTrial(space.params(arm))) == arm
        assert space.arm_of(space.params(arm)) == arm
        assert set(space.distributions(arm)) == set(space.params(arm))
        for name, value in space.params(arm).items():
            assert space.distributions(arm)[name]._contains(space.distributions(arm)[name].to_internal_repr(value))


@pytest.mark.parametrize("lr", [1e-3, LRS], ids=["one-lr", "lr-grid"])
def test_a_stored_trial_names_its_arm(lr):
    """Through a storage: parameters are stored as indices into the distributions, lr included."""
    _, space = make_space(repeats=2, lr=lr)
    study = optuna.create_study()
    for arm in space.arms():
        study.add_trial(optuna.trial.create_trial(params=space.params(arm), distributions=space.distributions(arm),
                                                  value=0.0))
    assert [space.trial_arm(t) for t in study.get_trials()] == space.arms()
    assert set(space.holders(study)) == set(space.arms())


def test_one_lr_keeps_the_old_parameters_and_records():
    """A study with one lr (a float, or a grid of one) has no lr parameter, and its records no lr."""
    for lr in (1e-3, [1e-3]):
        _, space = make_space(repeats=2, lr=lr)
        arm = Arm("a", "dus", 1, 1)
        assert space.params(arm) == {"base": "a", "method_a": "dus", "m_a": 1, "repeat": 1}
        assert arm.to_dict() == {"base": "a", "method": "dus", "m": 1, "repeat": 1}
        assert all(a.lr is None for a in space.arms())
    assert Arm("a", "dus", 1, 1, 3e-3).to_dict()["lr"] == 3e-3


def test_an_lr_grid_runs_every_configuration_at_every_lr():
    _, space = make_space(repeats=2, lr=LRS)
    trained = [a for a in space.arms() if a.method != "nocpt"]
    assert {a.lr for a in trained} == set(LRS)
    assert {a.lr for a in space.arms() if a.method == "nocpt"} == {None}
    cells = {(a.base, a.method, a.m, a.repeat) for a in trained}
    assert {(a.base, a.method, a.m, a.repeat, a.lr) for a in trained} == {(*c, lr) for c in cells for lr in LRS}
    assert space.params(Arm("a", "moe", None, 1, 3e-3)) == {"base": "a", "method_a": "moe", "lr": 3e-3, "repeat": 1}
    assert space.arm_of({"base": "a", "method_a": "moe", "repeat": 1}) is None  # no lr: incomplete


def test_the_no_cpt_reference_is_one_configuration_per_base():
    _, space = make_space(repeats=3, lr=LRS)
    assert [a for a in space.arms() if a.method == "nocpt"] == [Arm("a", "nocpt", None, 0), Arm("b", "nocpt", None, 0)]
    # it is one more value of the method parameter, with no m, lr or repeat
    assert space.params(Arm("b", "nocpt", None, 0)) == {"base": "b", "method_b": "nocpt"}
    assert space.suggest(FixedTrial({"base": "b", "method_b": "nocpt"})) == Arm("b", "nocpt", None, 0)
    assert space.methods_of("a") == ["dus", "moe", "nocpt"] and space.methods_of("b") == ["dus", "nocpt"]
    _, off = make_space(repeats=3, lr=LRS, nocpt=False)
    assert not [a for a in off.arms() if a.method == "nocpt"] and off.count() == len(off.arms())
    assert off.methods_of("b") == ["dus"] and "method_b" not in off.params(Arm("b", "dus", 0, 0, 1e-3))


def test_sweep_order_puts_the_lrs_of_an_arm_next_to_each_other():
    _, space = make_space(repeats=2, lr=LRS)
    order = space.sweep_order()
    assert order[:2] == [Arm("a", "nocpt", None, 0), Arm("b", "nocpt", None, 0)]
    trained = order[2:]
    assert [a.repeat for a in trained] == sorted(a.repeat for a in trained)  # repeat 0 of all before repeat 1
    pairs = [trained[i:i + 2] for i in range(0, len(trained), 2)]
    assert all(x.lr == LRS[0] and y.lr == LRS[1] and (x.base, x.method, x.m, x.repeat) == (y.base, y.method, y.m,
                                                                                           y.repeat) for x, y in pairs)


def test_default_m_range_is_zero_to_half_depth():
    _, space = make_space()
    assert space.m_values == {"a": [0, 1, 2, 3, 4], "b": [0, 2, 4, 5]}


@pytest.mark.parametrize("lr", [1e-3, LRS], ids=["one-lr", "lr-grid"])
@pytest.mark.parametrize("sampler", ["sweep", "tpe", "random", "grid"])
def test_sampler_never_repeats_a_configuration(sampler, lr):
    config, space = make_space(repeats=2, sampler=sampler, lr=lr)
    study = optuna.create_study(sampler=make_sampler(config, space))
    seen = []

    def objective(trial):
        arm = space.suggest(trial)
        seen.append(arm)
        return (arm.m or 0) * 0.1 + arm.repeat + (arm.lr or 0)  # TPE keeps proposing low m: the wrapper moves it

    study.optimize(objective, n_trials=len(space.arms()))
    assert len(seen) == len(set(seen)) == len(space.arms())


@pytest.mark.parametrize("lr", [1e-3, LRS], ids=["one-lr", "lr-grid"])
def test_sweep_covers_every_configuration_before_any_second_seed(lr):
    """After the controls, every (base, method, m) once, in the listed order, then the second seeds,
    whichever base scores better."""
    config, space = make_space(repeats=2, sampler="sweep", lr=lr)
    study = optuna.create_study(sampler=make_sampler(config, space))
    queued = enqueue_controls(study, space)
    seen = []

    def objective(trial):
        arm = space.suggest(trial)
        seen.append(arm)
        return 0.0 if arm.base == "b" else 1.0  # base b "scores better"

    study.optimize(objective, n_trials=len(space.arms()))
    first = [a for a in space.sweep_order() if a.repeat == 0]
    assert seen[: len(queued)] == queued
    assert set(seen[: len(first)]) == set(first)  # all of repeat 0 before any repeat 1
    assert seen[len(queued):len(first)] == [a for a in first if a not in queued]  # in sweep order
    assert sorted(seen[len(first):], key=str) == sorted([a for a in space.arms() if a.repeat == 1], key=str)


def test_controls_are_enqueued_first_and_only_once():
    config, space = make_space()
    study = optuna.create_study(sampler=make_sampler(config, space))
    queued = enqueue_controls(study, space)
    assert enqueue_controls(study, space) == []  # a restart queues nothing twice
    seen = []
    study.optimize(lambda t: seen.append(space.suggest(t)) or 0.0, n_trials=len(queued) + 2)
    assert seen[: len(queued)] == queued
    assert Arm("a", "dus", 4, 0) in queued and Arm("a", "moe", None, 0) in queued  # control, MoE
    assert Arm("a", "dus", 2, 0) in queued  # SOLAR's m = n/4
    assert queued[:2] == [Arm("a", "nocpt", None, 0), Arm("b", "nocpt", None, 0)]  # the references first
    assert len(set(seen)) == len(seen)


def test_control_order_and_odd_depth():
    _, space = make_space()
    # b has n=12 but its m list holds neither 6 (= n/2) nor 3 (= n/4): no control to queue for it.
    assert controls(space) == [Arm("a", "nocpt", None, 0), Arm("b", "nocpt", None, 0), Arm("a", "dus", 4, 0),
                               Arm("a", "moe", None, 0), Arm("a", "dus", 2, 0)]
    _, off = make_space(nocpt=False)
    assert controls(off) == [Arm("a", "dus", 4, 0), Arm("a", "moe", None, 0), Arm("a", "dus", 2, 0)]


def test_controls_run_at_every_lr_of_the_grid():
    config, space = make_space(lr=LRS)
    assert controls(space) == [Arm("a", "nocpt", None, 0), Arm("b", "nocpt", None, 0),
                               Arm("a", "dus", 4, 0, 1e-3), Arm("a", "dus", 4, 0, 3e-3),
                               Arm("a", "moe", None, 0, 1e-3), Arm("a", "moe", None, 0, 3e-3),
                               Arm("a", "dus", 2, 0, 1e-3), Arm("a", "dus", 2, 0, 3e-3)]
    study = optuna.create_study(sampler=make_sampler(config, space))
    queued = enqueue_controls(study, space)
    seen = []
    study.optimize(lambda t: seen.append(space.suggest(t)) or 0.0, n_trials=len(queued))
    assert seen == queued == controls(space)


def test_train_config_for_an_arm_sets_its_lr():
    config, _ = make_space(lr=LRS)
    assert train_config_for(config.train, Arm("a", "dus", 1, 0, 3e-3)).lr == 3e-3
    assert config.train.lr == LRS  # the study's config is left as it was
    with pytest.raises(ValueError, match="no lr"):
        train_config_for(config.train, Arm("a", "dus", 1, 0))
    one, _ = make_space(lr=2e-3)
    assert train_config_for(one.train, Arm("a", "dus", 1, 0)) is one.train


def test_a_trial_killed_without_a_reason_frees_its_configuration():
    config, space = make_space()
    study = optuna.create_study(sampler=make_sampler(config, space))
    arm = Arm("a", "dus", 1, 0)
    study.enqueue_trial(space.params(arm))
    trial = study.ask()
    space.suggest(trial)
    assert arm in space.taken(study)
    study.tell(trial, state=TrialState.FAIL)  # what a stale (killed) trial becomes
    assert arm not in space.taken(study)
    failed = study.ask({})
    study.enqueue_trial(space.params(Arm("a", "dus", 3, 0)))
    recorded = study.ask()
    space.suggest(recorded)
    recorded.set_user_attr("fail_reason", "diverged")
    study.tell(recorded, state=TrialState.FAIL)
    assert Arm("a", "dus", 3, 0) in space.taken(study)  # a recorded failure keeps its configuration
    study.tell(failed, state=TrialState.FAIL)


def wsd_config(pruner: dict, budgets=(1024, 4096, 16384), **train):
    tree = {"name": "t", "bases": [{"model": "a"}], "pruner": pruner,
            "train": {"tokens": budgets[-1], "budgets": list(budgets), "schedule": "wsd", "warmup_tokens": 256,
                      "tokens_per_step": 256, **train}}
    return parse_config(tree)


def test_report_steps_are_budget_points_or_evaluation_steps():
    wsd = wsd_config({"kind": "none"}, budgets=(1000, 4096))
    assert report_steps(wsd.train) == ([768, 4096], 4096)  # whole steps of 256 tokens, as trained
    cosine = parse_config({"name": "t", "bases": [{"model": "a"}],
                           "train": {"tokens": 4200, "tokens_per_step": 256, "eval_every": 5}})
    assert report_steps(cosine.train) == ([5, 10, 15, 16], 16)  # optimizer steps, the last one included


def simulate(pruner, points, trials=40, seed=0):
    """Trials that report a random value at each point and stop when pruned; the steps they were pruned at."""
    import random

    rng = random.Random(seed)
    study = optuna.create_study(pruner=pruner)
    pruned = []
    for _ in range(trials):
        trial = study.ask()
        level = rng.random()
        for step in points:
            trial.report(level + 0.01 * rng.random(), step)
            if trial.should_prune():
                pruned.append(step)
                study.tell(trial, state=TrialState.PRUNED)
                break
        else:
            study.tell(trial, level)
    return pruned


@pytest.mark.parametrize("kind", ["hyperband", "successive_halving", "median"])
def test_no_trial_is_pruned_before_the_guard_nor_at_the_last_budget_point(kind):
    budgets = (1024, 4096, 16384)
    config = wsd_config({"kind": kind, "min_fraction": 0.25, "startup_trials": 2, "warmup_evals": 0})
    pruner = make_pruner(config)
    assert isinstance(pruner, GuardedPruner)
    pruned = simulate(pruner, budgets)
    assert pruned and set(pruned) == {4096}  # 1024 < 0.25 * 16384; 16384 is the end: nothing left to save
    unguarded = simulate(pruner.pruner, budgets)  # the same pruner without the guard prunes at 1024 too
    assert 1024 in unguarded


def test_multi_fidelity_pruners_take_the_budget_points_as_rungs():
    hb = make_pruner(wsd_config({"kind": "hyperband", "reduction_factor": 2}, budgets=(1024, 2048, 4096, 8192)))
    assert isinstance(hb.pruner, optuna.pruners.HyperbandPruner)
    assert (hb.pruner._min_resource, hb.pruner._max_resource, hb.pruner._reduction_factor) == (1024, 8192, 2)
    sh = make_pruner(wsd_config({"kind": "successive_halving"}))
    assert isinstance(sh.pruner, optuna.pruners.SuccessiveHalvingPruner)
    assert (sh.pruner._min_resource, sh.pruner._reduction_factor) == (1024, 4)
    assert sh.min_step == 0.25 * 16384 and sh.full == 16384
    assert isinstance(make_pruner(wsd_config({"kind": "none"})), optuna.pruners.NopPruner)


def test_the_median_guard_and_warmup_count_in_optimizer_steps_under_cosine():
    """Cosine trials report at optimizer steps: the guard is min_fraction of the steps, and warmup_evals
    counts evaluations (here every 4 steps), not steps."""
    def config(**pruner):
        return parse_config({"name": "t", "bases": [{"model": "a"}], "pruner": {"kind": "median", **pruner},
                             "train": {"tokens": 4096, "tokens_per_step": 256, "eval_every": 4}})

    steps = [4, 8, 12, 16]
    pruner = make_pruner(config(startup_trials=1, warmup_evals=0, min_fraction=0.6))
    assert pruner.min_step == pytest.approx(0.6 * 16) and pruner.full == 16
    assert set(simulate(pruner, steps)) == {12}  # 4, 8 < 9.6; 16 is the end
    after_one = simulate(make_pruner(config(startup_trials=1, warmup_evals=1, min_fraction=0)), steps)
    assert 8 in after_one and set(after_one) <= {8, 12}  # one evaluation (step 4) before it may be pruned
    assert 4 in simulate(make_pruner(config(startup_trials=1, warmup_evals=0, min_fraction=0)), steps)
    assert simulate(make_pruner(config(startup_trials=1, warmup_evals=4, min_fraction=0)), steps) == []


def test_a_nan_report_is_pruned_only_past_the_guard():
    pruner = make_pruner(wsd_config({"kind": "successive_halving"}))
    study = optuna.create_study(pruner=pruner)
    trial = study.ask()
    trial.report(math.nan, 1024)
    assert not trial.should_prune()
    trial.report(math.nan, 4096)
    assert trial.should_prune()


def test_check_tells_the_lrs_of_one_arm_apart():
    """ablate.check's audit: one arm at two lrs is two configurations; at one lr twice is a repeat."""
    from ablate.check import _check_configurations

    def done(arm: Arm, number: int):
        trial = optuna.trial.create_trial(value=0.0, user_attrs=arm.to_dict())
        trial.number = number
        return trial

    two_lrs = [done(Arm("a", "dus", 1, 0, 1e-3), 0), done(Arm("a", "dus", 1, 0, 3e-3), 1),
               done(Arm("a", "nocpt", None, 0), 2), done(Arm("a", "dus", 1, 0), 3)]
    assert _check_configurations(two_lrs) == []
    twice = [*two_lrs, done(Arm("a", "dus", 1, 0, 3e-3), 4)]
    assert _check_configurations(twice) == ["configuration ('a', 'dus', 1, 0, 0.003) ran in trials [1, 4]"]


def test_the_no_cpt_references_do_not_count_as_the_median_s_startup_trials():
    """They finish without reporting: only trials that ran to the end and reported count."""
    pruner = make_pruner(wsd_config({"kind": "median", "startup_trials": 2, "warmup_evals": 0, "min_fraction": 0}))
    study = optuna.create_study(pruner=pruner)
    for _ in range(3):
        study.tell(study.ask(), 0.5)  # nocpt: a value, no intermediate values
    good = study.ask()
    good.report(1.0, 1024)
    study.tell(good, 1.0)
    bad = study.ask()
    bad.report(9.0, 1024)
    assert not bad.should_prune()  # one reporting trial finished, two needed
    study.tell(bad, 9.0)
    worse = study.ask()
    worse.report(10.0, 1024)
    assert worse.should_prune()
