"""Paired comparison of two systems over the same test users: how much one beats the other, and how sure we are.

Each user has one target, so a system's per-user NDCG@K / Recall@K follows from the target's rank. Differences are
taken user by user before averaging: most of the variance is between users (easy and hard ones), and pairing
cancels it. The interval is a paired bootstrap over users (scipy.stats.bootstrap, BCa); the p-value is a paired
randomization test (scipy.stats.permutation_test: each user's two results swapped at random), with a paired
t-test as a second opinion.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

RESAMPLES = 10_000
CONFIDENCE = 0.95
SEED = 0
BATCH = 500  # resamples at once: memory is BATCH x users floats, whatever the number of resamples
COMPARED_METRICS = ("ndcg@10", "recall@10")


def per_user(ranks: Sequence[int], metric: str) -> np.ndarray:
    """Each user's 'recall@K' (hit) or 'ndcg@K' from the 0-based rank of their one target (evaluation.ranking_metrics
    is the mean of these)."""
    name, k = metric.split("@")
    ranks = np.asarray(ranks, dtype=np.float64)
    hit = ranks < int(k)
    if name == "recall":
        return hit.astype(np.float64)
    return np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)


def paired_difference(system: np.ndarray, baseline: np.ndarray, resamples: int = RESAMPLES,
                      seed: int = SEED) -> dict[str, float]:
    """Mean per-user difference system - baseline, its CONFIDENCE bootstrap interval (low, high), the two-sided
    randomization p-value and the paired t-test p-value."""
    system, baseline = np.asarray(system, np.float64), np.asarray(baseline, np.float64)
    if system.shape != baseline.shape or system.ndim != 1:
        raise ValueError(f"paired values must be two equal 1-d arrays, not {system.shape} and {baseline.shape}")
    differences = system - baseline
    mean = float(differences.mean())
    if np.ptp(differences) == 0:  # every user the same: nothing to resample (BCa and the t-test would divide by 0)
        low = high = mean
        t_test_p = 1.0 if mean == 0 else 0.0
    else:
        interval = stats.bootstrap((differences,), np.mean, n_resamples=resamples, confidence_level=CONFIDENCE,
                                   batch=BATCH, rng=np.random.default_rng(seed)).confidence_interval
        low, high = float(interval.low), float(interval.high)
        t_test_p = float(stats.ttest_rel(system, baseline).pvalue)
    randomization = stats.permutation_test(
        (system, baseline), lambda x, y, axis: np.mean(x - y, axis=axis), permutation_type="samples",
        vectorized=True, n_resamples=resamples, batch=BATCH, rng=np.random.default_rng(seed))
    return {"mean": mean, "low": low, "high": high, "p_value": float(randomization.pvalue), "t_test_p_value": t_test_p,
            "users": len(differences)}


def compare(system_ranks: Sequence[Sequence[int]], baseline_ranks: Sequence[Sequence[int]],
            metrics: Sequence[str] = COMPARED_METRICS) -> dict[str, dict[str, float]]:
    """paired_difference of each metric, and the ratio of the two systems' means (None when the baseline's is 0).
    Ranks are per seed (one list of per-user ranks per seed, users in the same order): several seeds compare the
    seed-averaged per-user metric."""
    result = {}
    for metric in metrics:
        system = np.mean([per_user(ranks, metric) for ranks in system_ranks], axis=0)
        baseline = np.mean([per_user(ranks, metric) for ranks in baseline_ranks], axis=0)
        result[metric] = paired_difference(system, baseline)
        result[metric]["system"], result[metric]["baseline"] = float(system.mean()), float(baseline.mean())
        result[metric]["ratio"] = float(system.mean() / baseline.mean()) if baseline.mean() else None
    return result
