"""Intervals and paired tests for evaluation readings (pure: numpy and scipy only).

A rate is reported with its count and a Wilson 95 % interval; two models (or two settings) read on the
same items are compared with a paired test: exact McNemar on per-item correct / wrong outcomes, a paired
bootstrap on per-item numbers. See docs/protocol.md.

Example:
    >>> rate([True, False, True, True])          # {"rate": 0.75, "k": 3, "n": 4, "ci95": [0.30, 0.95]}
    >>> mcnemar(model_a_correct, model_b_correct)["p"]
    >>> paired_bootstrap(energy_a, energy_b)["ci95"]
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import stats as _st

_BOOT_CHUNK = 1000  # bootstrap resamples drawn at once (bounds memory at chunk x items indices)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n (scipy's `proportion_ci(method="wilson")`).

    Args:
        k: successes, 0 <= k <= n.
        n: trials, n >= 1.
        confidence: coverage of the interval, in (0, 1).

    Returns:
        (lo, hi), both in [0, 1].

    Raises:
        ValueError: n < 1 or k outside 0..n.

    Example:
        >>> wilson_interval(74, 100)   # (0.646, 0.816)
    """
    k, n = int(k), int(n)
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    ci = _st.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def rate(k_or_bools: int | Sequence[bool] | np.ndarray, n: int | None = None) -> dict:
    """A rate for JSON output: value, count, trials and Wilson 95 % interval.

    Args:
        k_or_bools: the number of successes (with `n`), or per-item outcomes `[items]` (bools or 0/1).
        n: trials when `k_or_bools` is a count; None when it is a sequence of outcomes.

    Returns:
        {"rate": k / n, "k", "n", "ci95": [lo, hi]}; "rate" and "ci95" are None when n == 0.

    Example:
        >>> rate(74, 100)["ci95"]      # [0.646, 0.816]
        >>> rate([True, False])["n"]   # 2
    """
    if n is None:
        outcomes = np.asarray(list(k_or_bools) if not isinstance(k_or_bools, np.ndarray) else k_or_bools)
        if outcomes.size and not np.isin(outcomes, (0, 1)).all():
            raise ValueError("per-item outcomes must be booleans or 0/1")
        k, n = int(outcomes.sum()), int(outcomes.size)
    else:
        k, n = int(k_or_bools), int(n)
    if n == 0:
        return {"rate": None, "k": 0, "n": 0, "ci95": None}
    return {"rate": k / n, "k": k, "n": n, "ci95": list(wilson_interval(k, n))}


def _paired(a: Sequence, b: Sequence, dtype) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=dtype), np.asarray(b, dtype=dtype)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"paired outcomes need two 1-d arrays of one length, got {x.shape} and {y.shape}")
    return x, y


def mcnemar(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict:
    """Exact McNemar test on paired correct / wrong outcomes of two systems on the same items.

    Only the discordant items count: `a_only` (A right, B wrong) and `b_only` (B right, A wrong); under
    the null each discordant item goes either way with probability 1/2, so p is the two-sided exact
    binomial p-value of `a_only` out of `a_only + b_only` (scipy's `binomtest`); 1 when none is discordant.

    Args:
        a_correct: per-item outcomes of system A `[items]`.
        b_correct: per-item outcomes of system B on the same items `[items]`.

    Returns:
        {"n": items, "a_only", "b_only", "p"}.

    Example:
        >>> mcnemar([1] * 10 + [0] * 2, [0] * 10 + [1] * 2)["p"]   # 0.0386
    """
    x, y = _paired(a_correct, b_correct, bool)
    a_only, b_only = int((x & ~y).sum()), int((~x & y).sum())
    p = _st.binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    return {"n": int(x.size), "a_only": a_only, "b_only": b_only, "p": float(p)}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 10_000, seed: int = 0) -> dict:
    """Paired bootstrap of the mean difference mean(a - b) over items.

    Items are resampled with replacement (the same items for both systems); "ci95" is the percentile
    interval of the resampled mean differences and "p" the two-sided bootstrap p-value
    2 * min(P*(diff <= 0), P*(diff >= 0)), each share counted with the +1 correction, capped at 1.

    Args:
        a: per-item numbers of system A `[items]`.
        b: per-item numbers of system B on the same items `[items]`.
        n_boot: resamples.
        seed: seed of the numpy generator that draws them.

    Returns:
        {"diff": mean(a - b), "ci95": [lo, hi], "p", "n": items, "n_boot"}.

    Example:
        >>> paired_bootstrap([0.9, 0.8, 0.7], [0.5, 0.6, 0.4])["diff"]   # 0.3
    """
    x, y = _paired(a, b, float)
    if x.size == 0 or n_boot < 1:
        raise ValueError("paired_bootstrap needs at least one item and one resample")
    d = x - y
    rng = np.random.default_rng(seed)
    boots = np.concatenate([d[rng.integers(0, d.size, size=(min(_BOOT_CHUNK, n_boot - i), d.size))].mean(1)
                            for i in range(0, n_boot, _BOOT_CHUNK)])
    lo, hi = np.percentile(boots, [2.5, 97.5])
    below = (np.count_nonzero(boots <= 0) + 1) / (n_boot + 1)
    above = (np.count_nonzero(boots >= 0) + 1) / (n_boot + 1)
    return {"diff": float(d.mean()), "ci95": [float(lo), float(hi)], "p": float(min(1.0, 2 * min(below, above))),
            "n": int(d.size), "n_boot": int(n_boot)}
