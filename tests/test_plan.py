"""The DUS layer plan (pure Python): SOLAR's recipe, its edge cases and its errors."""

import pytest

from ablate.plan import layer_plan, mergekit_slices, upscaled_depth


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
