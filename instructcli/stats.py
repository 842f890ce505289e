"""Statistics of the evaluations, pure and tested on literal values: bootstrap confidence intervals, win-rate
outcomes, distinct-n, quantiles."""

from __future__ import annotations

import math


def bootstrap_ci(values: list[float], n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: resample the values with replacement n_boot times."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.concatenate([v[rng.integers(0, v.size, (min(1000, n_boot - i), v.size))].mean(1)
                            for i in range(0, n_boot, 1000)])
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def ratio_ci(hits: list[float], counts: list[float], n_boot: int = 10000, seed: int = 0,
             level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(hits) / sum(counts), resampling the (hits, count) groups whole: a
    pairwise accuracy, whose pairs come in groups (one prompt's C(K,2)) that are not independent of each other,
    so the prompts are what is drawn again. With equal counts it is bootstrap_ci of hits / count, draw for draw."""
    import numpy as np

    h, c = np.asarray(hits, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    h, c = h[c > 0], c[c > 0]  # a group without pairs (all tied) has nothing to draw
    if h.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, h.size, (min(1000, n_boot - i), h.size)) for i in range(0, n_boot, 1000)]
    ratios = np.concatenate([h[d].sum(1) / c[d].sum(1) for d in draws])
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def summarize(values: list[float], n_boot: int, seed: int) -> dict:
    """Mean, std, 95 % bootstrap CI of the mean, count."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "ci95": list(bootstrap_ci(values, n_boot, seed)), "n": n}


def outcome(baseline: float, other: float) -> float:
    """The other model's result on one prompt: 1 win, 0.5 tie, 0 loss."""
    return 1.0 if other > baseline else 0.5 if other == baseline else 0.0


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of all texts (lower-cased words): 1 = no repetition at all."""
    grams = []
    for t in texts:
        w = t.lower().split()
        grams += [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def quantiles(values: list[float], qs=(0.1, 0.5, 0.9)) -> dict:
    s = sorted(values)
    return {f"p{round(q * 100)}": s[min(len(s) - 1, int(q * len(s)))] for q in qs}
