"""stats: bootstrap intervals, outcomes, distinct-n and quantiles on literal values, against hand-derived results."""

import math

import pytest

from instructcli import stats


def test_bootstrap_all_wins_and_all_ties_have_no_spread():
    assert stats.bootstrap_ci([1.0] * 40) == (1.0, 1.0)
    assert stats.bootstrap_ci([0.5] * 40) == (0.5, 0.5)
    assert stats.bootstrap_ci([0.0] * 3) == (0.0, 0.0)


def test_bootstrap_two_values_by_hand():
    # resampled means of [1, 0] are 0, 0.5, 1 with probability 1/4, 1/2, 1/4: the 2.5 % and 97.5 % points are 0 and 1
    assert stats.bootstrap_ci([1.0, 0.0], n_boot=4000) == (0.0, 1.0)


def test_bootstrap_known_mixture_matches_the_normal_interval():
    values = [1.0] * 60 + [0.0] * 40  # mean 0.6; normal 95 % half-width 1.96 * sqrt(0.6 * 0.4 / 100) = 0.096
    lo, hi = stats.bootstrap_ci(values, n_boot=20000, seed=1)
    assert lo == pytest.approx(0.6 - 0.096, abs=0.015) and hi == pytest.approx(0.6 + 0.096, abs=0.015)
    assert lo < 0.6 < hi


def test_bootstrap_is_stable_for_a_seed():
    values = [(i * 0.37) % 1 for i in range(30)]  # continuous: another seed lands elsewhere
    assert stats.bootstrap_ci(values, seed=3) == stats.bootstrap_ci(values, seed=3)
    a, b = stats.bootstrap_ci(values, seed=3), stats.bootstrap_ci(values, seed=4)
    assert a != b and abs(a[0] - b[0]) < 0.02 and abs(a[1] - b[1]) < 0.02


def test_ratio_ci_with_equal_groups_is_the_bootstrap_of_their_shares():
    hits, counts = [6, 5, 3, 6, 0, 4, 2, 6], [6] * 8
    assert stats.ratio_ci(hits, counts, seed=2) == pytest.approx(stats.bootstrap_ci([h / 6 for h in hits], seed=2))


def test_ratio_ci_weighs_each_group_by_its_pairs():
    # groups (6 of 6) and (0 of 1): a draw of both is 6/7 (a mean of the two shares would be 1/2), with
    # probability 1/2, between the draws of A twice (1) and B twice (0); the central 20 % of draws is that one value
    assert stats.ratio_ci([6, 0], [6, 1], n_boot=4000, level=0.2) == pytest.approx((6 / 7, 6 / 7))
    # a group with no pairs (all tied) is not drawn: it would add nothing but thin the others out
    assert stats.ratio_ci([6, 0, 0], [6, 1, 0], n_boot=4000, level=0.2) == pytest.approx((6 / 7, 6 / 7))
    assert stats.ratio_ci([5, 5], [5, 5]) == (1.0, 1.0)
    assert all(math.isnan(x) for x in stats.ratio_ci([0], [0])) and all(math.isnan(x) for x in stats.ratio_ci([], []))


def test_summarize_outcome_distinct_and_quantiles():
    s = stats.summarize([1.0, 2.0, 3.0, 4.0], 1000, 0)
    assert s["mean"] == 2.5 and s["std"] == pytest.approx(math.sqrt(5 / 3)) and s["n"] == 4
    assert [stats.outcome(1, 2), stats.outcome(2, 2), stats.outcome(3, 2)] == [1.0, 0.5, 0.0]
    assert stats.distinct_n(["a b a b"], 1) == 0.5
    assert stats.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # (a b) (b a) (a b)
    assert stats.distinct_n(["A b", "c"], 2) == 1.0 and stats.distinct_n(["x"], 2) == 0.0
    assert stats.quantiles(list(range(10))) == {"p10": 1, "p50": 5, "p90": 9}
