"""interp/stats.py: Wilson intervals, rates for JSON, exact McNemar, paired bootstrap, against known values."""
from __future__ import annotations

import math

import numpy as np
import pytest

from interp.stats import mcnemar, paired_bootstrap, rate, wilson_interval


def _wilson_by_hand(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


class TestWilson:
    def test_known_value(self):
        """k = 74, n = 100 gives (0.6463, 0.8160) (the score-interval formula)."""
        lo, hi = wilson_interval(74, 100)
        assert (lo, hi) == pytest.approx((0.6463, 0.8160), abs=5e-4)

    @pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (50, 300)])
    def test_matches_the_formula(self, k, n):
        """scipy's interval equals the textbook formula, edges included."""
        assert wilson_interval(k, n) == pytest.approx(_wilson_by_hand(k, n), abs=1e-9)

    def test_wider_at_higher_confidence(self):
        lo95, hi95 = wilson_interval(30, 60)
        lo99, hi99 = wilson_interval(30, 60, confidence=0.99)
        assert lo99 < lo95 < 0.5 < hi95 < hi99

    @pytest.mark.parametrize("k,n", [(0, 0), (5, 4), (-1, 3)])
    def test_rejects_impossible_counts(self, k, n):
        with pytest.raises(ValueError):
            wilson_interval(k, n)


class TestRate:
    def test_from_count(self):
        r = rate(74, 100)
        assert (r["rate"], r["k"], r["n"]) == (0.74, 74, 100)
        assert r["ci95"] == pytest.approx(list(wilson_interval(74, 100)))

    def test_from_outcomes(self):
        """A sequence of outcomes counts its true items; numpy bools and 0/1 work too."""
        assert rate([True, False, True, True]) == rate(3, 4)
        assert rate(np.array([1, 0, 1, 1])) == rate(3, 4)

    def test_empty_has_no_rate(self):
        assert rate([]) == {"rate": None, "k": 0, "n": 0, "ci95": None}

    def test_rejects_non_binary_outcomes(self):
        with pytest.raises(ValueError):
            rate([0.5, 1.0])


class TestMcNemar:
    def test_known_value(self):
        """10 discordant pairs one way and 2 the other: exact two-sided p = 158 / 4096 = 0.0386."""
        a = [True] * 10 + [False] * 2 + [True] * 5 + [False] * 3
        b = [False] * 10 + [True] * 2 + [True] * 5 + [False] * 3
        res = mcnemar(a, b)
        assert (res["n"], res["a_only"], res["b_only"]) == (20, 10, 2)
        assert res["p"] == pytest.approx(158 / 4096) and round(res["p"], 4) == 0.0386

    def test_symmetric(self):
        a, b = [1, 1, 0, 1, 0], [0, 1, 1, 0, 0]
        assert mcnemar(a, b)["p"] == mcnemar(b, a)["p"]

    def test_no_discordant_pairs_gives_p_one(self):
        res = mcnemar([True, False, True], [True, False, True])
        assert (res["a_only"], res["b_only"], res["p"]) == (0, 0, 1.0)

    def test_rejects_unpaired_lengths(self):
        with pytest.raises(ValueError):
            mcnemar([True, False], [True])


class TestPairedBootstrap:
    def test_identical_arrays(self):
        """No difference: diff 0, interval [0, 0], p 1."""
        x = np.random.default_rng(1).normal(size=50)
        res = paired_bootstrap(x, x, n_boot=2000)
        assert res["diff"] == 0 and res["ci95"] == [0.0, 0.0] and res["p"] == 1.0

    def test_clear_shift_is_significant(self):
        """A constant shift of 0.5 plus small noise: diff ~0.5, the interval excludes 0, p at its floor."""
        rng = np.random.default_rng(2)
        b = rng.normal(size=200)
        a = b + 0.5 + rng.normal(scale=0.1, size=200)
        res = paired_bootstrap(a, b, n_boot=2000)
        assert res["diff"] == pytest.approx(np.mean(a - b))
        assert 0 < res["ci95"][0] < res["diff"] < res["ci95"][1]
        assert res["p"] == pytest.approx(2 / 2001)

    def test_deterministic_given_seed(self):
        rng = np.random.default_rng(3)
        a, b = rng.normal(size=30), rng.normal(size=30)
        assert paired_bootstrap(a, b, n_boot=500, seed=4) == paired_bootstrap(a, b, n_boot=500, seed=4)

    def test_interval_matches_the_normal_approximation(self):
        """For a mean over many items the percentile interval is close to mean +- 1.96 standard errors."""
        rng = np.random.default_rng(5)
        a, b = rng.normal(size=400), rng.normal(size=400)
        d = a - b
        res = paired_bootstrap(a, b, n_boot=10_000)
        se = d.std() / np.sqrt(d.size)
        assert res["ci95"] == pytest.approx([d.mean() - 1.96 * se, d.mean() + 1.96 * se], abs=0.25 * se)
