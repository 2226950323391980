"""bench.dpt_eval's validation rule for the dpt_fused weight."""
from __future__ import annotations

from bench.dpt_eval import weight_rule

W = [0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5]


def test_single_best_weight_wins():
    assert weight_rule(W, [1, 2, 3, 4, 9, 4, 3, 2, 1, 1, 1, 1, 1]) == 0.2


def test_ties_take_the_geometric_centre_of_the_longest_run():
    # the session's validation counts: 411 from 0.15 to 2 -> centre sqrt(0.3) = 0.55 -> 0.5
    assert weight_rule(W, [403, 408, 410, 411, 411, 411, 411, 411, 411, 411, 411, 410, 408]) == 0.5
    # a shorter tied run elsewhere does not count
    assert weight_rule(W, [5, 9, 5, 5, 5, 9, 9, 9, 9, 5, 5, 5, 5]) == 0.5


def test_a_run_from_zero_keeps_the_adapter_alone():
    assert weight_rule(W, [9, 9, 9, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5]) == 0.0
