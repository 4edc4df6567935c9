"""The study's search space: FixedTrial round trips, no configuration ever repeats (sweep, TPE,
random, grid), the sweep covers every configuration before a second seed, the controls run
first, and a killed trial's configuration becomes free again."""

import optuna
import pytest
from optuna.trial import FixedTrial, TrialState

from ablate.config import parse_config
from ablate.search import Arm, SearchSpace, controls, enqueue_controls, make_sampler

optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_space(repeats=1, moe=True, sampler="tpe"):
    tree = {
        "name": "t",
        "bases": [{"model": "a"}, {"model": "b", "m": [0, 2, 4, 5], "moe": False}],
        "methods": {"dus": True, "moe": {"experts": 4, "top_k": 2} if moe else None},
        "train": {"tokens": 1000},
        "repeats": repeats,
        "sampler": {"kind": sampler, "seed": 3},
    }
    config = parse_config(tree)
    return config, SearchSpace(config, {"a": 8, "b": 12})


def test_fixed_trial_round_trip_for_every_arm():
    _, space = make_space(repeats=2)
    arms = space.arms()
    # a: m 0..4 (5) + moe, times 2 repeats; b: m in the list (4), no moe, times 2
    assert len(arms) == (5 + 1) * 2 + 4 * 2 == len(set(arms))
    for arm in arms:
        assert space.suggest(FixedTrial(space.params(arm))) == arm
        assert space.arm_of(space.params(arm)) == arm


def test_default_m_range_is_zero_to_half_depth():
    _, space = make_space()
    assert space.m_values == {"a": [0, 1, 2, 3, 4], "b": [0, 2, 4, 5]}


@pytest.mark.parametrize("sampler", ["sweep", "tpe", "random", "grid"])
def test_sampler_never_repeats_a_configuration(sampler):
    config, space = make_space(repeats=2, sampler=sampler)
    study = optuna.create_study(sampler=make_sampler(config, space))
    seen = []

    def objective(trial):
        arm = space.suggest(trial)
        seen.append(arm)
        return (arm.m or 0) * 0.1 + arm.repeat  # TPE will keep proposing low m: the wrapper must move it

    study.optimize(objective, n_trials=len(space.arms()))
    assert len(seen) == len(set(seen)) == len(space.arms())


def test_sweep_covers_every_configuration_before_any_second_seed():
    """After the controls, every (base, method, m) once, in the listed order, then the second seeds,
    whichever base scores better."""
    config, space = make_space(repeats=2, sampler="sweep")
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
    assert len(set(seen)) == len(seen)


def test_control_order_and_odd_depth():
    _, space = make_space()
    # b has n=12 but its m list holds neither 6 (= n/2) nor 3 (= n/4): no control to queue for it.
    assert controls(space) == [Arm("a", "dus", 4, 0), Arm("a", "moe", None, 0), Arm("a", "dus", 2, 0)]


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
