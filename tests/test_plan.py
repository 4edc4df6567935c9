"""Layer plans (pure Python): SOLAR's recipe, its edge cases and its errors; every other family (stack, llama_pro,
mid, similar, prune) by hand on small n; the one spelling of an operator and its one-line errors."""

import pytest

from ablate.plan import (
    FAMILIES,
    Operator,
    Plan,
    PlanError,
    layer_plan,
    llama_pro,
    mergekit_slices,
    mid,
    parse_plan,
    prune,
    resolve_plan,
    similar,
    solar,
    stack,
    upscaled_depth,
)


def solar_recipe(n, m):
    """The recipe as the paper states it: drop the last m of one copy and the first m of the other."""
    original, copy = list(range(n)), list(range(n))
    return original[: n - m] + copy[m:]


@pytest.mark.parametrize("n", [1, 2, 3, 8, 12, 32])
def test_plan_matches_the_solar_recipe_for_every_legal_m(n):
    for m in range(n):
        plan = layer_plan(n, m)
        assert plan == solar_recipe(n, m)
        assert len(plan) == upscaled_depth(n, m) == 2 * (n - m)


def test_solar_10_7b_plan():
    plan = layer_plan(32, 8)
    assert plan == list(range(24)) + list(range(8, 32))
    assert len(plan) == 48


def test_half_depth_is_the_base_and_zero_stacks_twice():
    assert layer_plan(8, 4) == list(range(8))
    assert layer_plan(4, 0) == [0, 1, 2, 3, 0, 1, 2, 3]
    assert layer_plan(8, 6) == [0, 1, 6, 7]  # m > n/2 prunes the middle


@pytest.mark.parametrize("n,m", [(8, -1), (8, 8), (8, 9), (0, 0), (8, 2.0), (8, True)])
def test_out_of_range_m_names_n_and_m(n, m):
    with pytest.raises(ValueError) as info:
        layer_plan(n, m)
    assert "n=" in str(info.value) and "m=" in str(info.value)


def test_mergekit_slices_cover_the_plan():
    for n, m in [(32, 8), (12, 0), (12, 6), (12, 9)]:
        expanded = [i for a, b in mergekit_slices(n, m) for i in range(a, b)]
        assert expanded == layer_plan(n, m)


def test_plan_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, ablate.plan; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# Plans as data: every family on small n, by hand (issue 16).


def test_solar_family_is_the_dus_plan():
    for n in (1, 4, 7, 32):
        for m in range(n):
            plan = solar(m).plan(n)
            assert list(plan.sources) == layer_plan(n, m) and not any(plan.zero) and plan.name == f"solar({m})"


def test_stack_by_hand_and_stack_2_is_solar_0():
    assert stack(3).plan(2).sources == (0, 1, 0, 1, 0, 1)
    assert stack(1).plan(5).is_base
    for n in (1, 3, 8):
        assert stack(2).plan(n).sources == solar(0).plan(n).sources
        assert stack(2).plan(n).zero == solar(0).plan(n).zero


def test_llama_pro_by_hand():
    plan = llama_pro(2).plan(4)
    assert plan.sources == (0, 1, 1, 2, 3, 3)
    assert plan.zero_layers == [2, 5] and plan.new_layers == [2, 5]
    assert llama_pro(1).plan(3).sources == (0, 1, 2, 2) and llama_pro(1).plan(3).zero_layers == [3]
    every = llama_pro(4).plan(4)
    assert every.sources == (0, 0, 1, 1, 2, 2, 3, 3) and every.zero_layers == [1, 3, 5, 7]
    assert len(llama_pro(8).plan(32)) == 40  # LLaMA Pro 8B: 32 + 8 blocks


def test_llama_pro_p_must_divide_n():
    with pytest.raises(PlanError, match=r"p must divide n=8; choose p in \[1, 2, 4, 8\]"):
        llama_pro(3).plan(8)


def test_mid_by_hand():
    assert mid(1, 2, 2).plan(4).sources == (0, 1, 2, 1, 2, 3)
    assert mid(1, 2, 3).plan(4).sources == (0, 1, 2, 1, 2, 1, 2, 3)
    assert mid(0, 4, 2).plan(4).sources == stack(2).plan(4).sources
    assert mid(2, 1, 1).plan(4).is_base
    assert mid(1, 2, 3).plan(4).new_layers == [3, 4, 5, 6]
    with pytest.raises(PlanError, match="lies outside a model of n=4"):
        mid(3, 2, 2).plan(4)


def test_similar_places_the_window_where_the_layers_turn_the_stream_least():
    n, m = 6, 2  # duplicates n - 2m = 2 layers; the window may start at 0..2m
    flat_tail = {("angular", 1): [0.5, 0.4, 0.3, 0.2, 0.01, 0.02]}
    assert similar(m).needs(n) == (("angular", 1),)
    assert similar(m).plan(n, flat_tail).sources == (0, 1, 2, 3, 4, 5, 4, 5)  # window 4..5
    flat_head = {("angular", 1): [0.01, 0.01, 0.3, 0.2, 0.5, 0.4]}
    assert similar(m).plan(n, flat_head).sources == (0, 1, 0, 1, 2, 3, 4, 5)  # window 0..1
    even = {("angular", 1): [0.1] * 6}  # a tie goes to SOLAR's middle
    assert similar(m).plan(n, even).sources == solar(m).plan(n).sources
    assert len(similar(m).plan(n, flat_tail)) == len(solar(m).plan(n))


def test_similar_without_a_choice_needs_no_measurement():
    assert similar(2).needs(4) == () and similar(2).plan(4).is_base  # m = n/2: the base
    assert similar(0).needs(4) == () and similar(0).plan(4).sources == stack(2).plan(4).sources
    with pytest.raises(PlanError, match="needs 0 <= m <= n/2"):
        similar(3).plan(4)


def test_prune_by_last_angular_and_influence():
    assert prune(2, "last").plan(5).sources == (0, 1, 2)
    assert prune(0, "angular").plan(5).is_base and prune(0, "angular").needs(5) == ()
    gromov = {("gromov", 2): [0.3, 0.2, 0.05, 0.1]}  # d(x^l, x^(l+2)) for l = 0..3 of n = 5
    assert prune(2, "angular").needs(5) == (("gromov", 2),)
    assert prune(2, "angular").plan(5, gromov).sources == (0, 1, 4)  # the block 2..3 goes
    tie = {("gromov", 2): [0.1, 0.2, 0.1, 0.3]}
    assert prune(2, "angular").plan(5, tie).sources == (2, 3, 4)  # the first of equal minima, as argmin
    influence = {("influence", 1): [0.9, 0.05, 0.5, 0.01, 0.7]}
    assert prune(2, "influence").needs(5) == (("influence", 1),)
    assert prune(2, "influence").plan(5, influence).sources == (0, 2, 4)  # ShortGPT: the 2 least influential
    with pytest.raises(PlanError, match="must leave one; choose 0 <= k < 5"):
        prune(5, "last").plan(5)


def test_measured_plans_say_what_they_lack_and_check_what_they_get():
    with pytest.raises(PlanError, match="got no gromov measurement; pass measured="):
        prune(2, "angular").plan(5)
    with pytest.raises(PlanError, match="needs 4 finite values for n=5, got 3"):
        prune(2, "angular").plan(5, {("gromov", 2): [0.1, 0.2, 0.3]})
    with pytest.raises(PlanError, match="finite"):
        prune(1, "influence").plan(3, {("influence", 1): [0.1, float("nan"), 0.3]})


def test_plan_validates_itself_and_merges_runs_into_slices():
    with pytest.raises(PlanError, match="base layer 4 does not exist"):
        Plan.of(4, [0, 4])
    with pytest.raises(PlanError, match="leaves no layer"):
        Plan.of(4, [])
    plan = llama_pro(2).plan(4)
    assert plan.slices() == [(0, 2, False), (1, 2, True), (2, 4, False), (3, 4, True)]
    assert solar(1).plan(4).slices() == [(0, 3, False), (1, 4, False)]
    assert solar(2).plan(4).slices() == [(0, 4, False)]
    assert plan.to_dict() == {"operator": "llama_pro(2)", "n": 4, "s": 6, "plan": [0, 1, 1, 2, 3, 3],
                              "zero_output": [2, 5]}


@pytest.mark.parametrize("text,op", [
    ("solar(8)", solar(8)), ("llama_pro(8)", llama_pro(8)), ("stack(2)", stack(2)), ("mid(10, 6, 2)", mid(10, 6, 2)),
    ("prune(4, by=angular)", prune(4, "angular")), ("similar(4)", similar(4)), (" llama_pro( 8 ) ", llama_pro(8)),
    ("mid(start=10, width=6, copies=2)", mid(10, 6, 2)), ("prune(k=4, by=influence)", prune(4, "influence")),
])
def test_one_spelling(text, op):
    parsed = parse_plan(text)
    assert parsed == op and isinstance(parsed, Operator)
    assert parse_plan(str(parsed)) == parsed  # str() is the canonical spelling
    assert parse_plan(parsed) is parsed


def test_every_family_has_a_spelling_and_a_plan():
    examples = {"solar": "solar(1)", "stack": "stack(2)", "llama_pro": "llama_pro(2)", "mid": "mid(1, 2, 2)",
                "similar": "similar(1)", "prune": "prune(1, by=last)"}
    assert set(examples) == set(FAMILIES)
    for family, text in examples.items():
        plan = resolve_plan(text, 4, {("angular", 1): [0.1, 0.2, 0.3, 0.4]})
        assert plan.name == text and plan.n == 4 and len(plan) >= 1, family


@pytest.mark.parametrize("text,message", [
    ("lama_pro(8)", "unknown plan family 'lama_pro' in 'lama_pro(8)'; did you mean llama_pro?"),
    ("llama_pro 8", "is not a family with its parameters in parentheses (did you mean llama_pro(...)?)"),
    ("llama_pro(8, 2)", "llama_pro takes 1 parameter, got 2 in 'llama_pro(8, 2)'; write llama_pro(p)"),
    ("llama_pro(8.5)", "llama_pro: p must be an integer, got '8.5'"),
    ("llama_pro(0)", "llama_pro: p=0 must be at least 1"),
    ("prune(4)", "'prune(4)' lacks by; write prune(k, by=angular|influence|last)"),
    ("prune(4, by=cosine)", "by must be one of angular, influence, last, e.g. prune(4, by=angular)"),
    ("mid(start=1, 2, 2)", "a positional parameter follows a named one; write mid(start, width, copies)"),
    ("mid(1, 2, 2, depth=3)", "mid has no parameter 'depth'"),
    ("solar(m=1, m=2)", "solar got m twice"),
    ("", "is not a family with its parameters in parentheses"),
    (8, "a plan is written as text like 'llama_pro(8)'"),
])
def test_bad_spellings_are_one_line_errors_naming_the_fix(text, message):
    with pytest.raises(PlanError) as info:
        parse_plan(text)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)  # PlanError is a UserError and a ValueError


def test_resolve_plan_checks_a_given_plan_against_the_model():
    plan = llama_pro(2).plan(4)
    assert resolve_plan(plan, 4) is plan
    with pytest.raises(PlanError, match="is for a base of 4 layers, but the model has 6"):
        resolve_plan(plan, 6)
