"""The language model's contribution: a paired bootstrap interval and randomization p-value over per-user metrics."""

import numpy as np
import pytest

from experiments.significance import compare, paired_difference, per_user
from llmrec.training.evaluation import ranking_metrics

USERS = 400
RESAMPLES = 2_000  # bounded by count: a few thousand resamples of 400 users take well under a second


def zero_inflated_ndcg(rng: np.random.Generator) -> np.ndarray:
    """Per-user NDCG-like values: most users miss (0), hits score in (0, 1]."""
    return np.where(rng.random(USERS) < 0.3, rng.random(USERS), 0.0)


def test_a_known_positive_difference_gives_an_interval_above_zero():
    rng = np.random.default_rng(0)
    baseline = zero_inflated_ndcg(rng)
    system = baseline + 0.05 + rng.normal(0, 0.05, USERS)  # better by 0.05 per user on average
    result = paired_difference(system, baseline, resamples=RESAMPLES)
    assert 0 < result["low"] <= result["mean"] <= result["high"]
    assert result["low"] < 0.05 < result["high"]
    assert result["p_value"] < 0.01 and result["t_test_p_value"] < 0.01 and result["users"] == USERS


def test_identical_rows_give_an_interval_around_zero_and_p_one():
    values = zero_inflated_ndcg(np.random.default_rng(1))
    result = paired_difference(values, values.copy(), resamples=RESAMPLES)
    assert result["low"] <= 0.0 <= result["high"] and result["mean"] == 0.0
    assert result["p_value"] == pytest.approx(1.0) and result["t_test_p_value"] == 1.0


def test_differences_that_cancel_out_give_an_interval_containing_zero():
    rng = np.random.default_rng(2)
    baseline = zero_inflated_ndcg(rng)
    noise = rng.normal(0, 0.05, USERS // 2)
    system = baseline + np.concatenate([noise, -noise])  # some users better, as many as much worse: mean 0
    result = paired_difference(system, baseline, resamples=RESAMPLES)
    assert result["mean"] == pytest.approx(0.0, abs=1e-12)
    assert result["low"] < 0 < result["high"] and result["p_value"] > 0.5 and result["t_test_p_value"] > 0.5


def test_the_same_seed_gives_the_same_interval():
    rng = np.random.default_rng(3)
    a, b = zero_inflated_ndcg(rng), zero_inflated_ndcg(rng)
    assert paired_difference(a, b, resamples=RESAMPLES) == paired_difference(a, b, resamples=RESAMPLES)


def test_per_user_metrics_average_to_the_reported_ones():
    ranks = np.random.default_rng(4).integers(0, 80, USERS)
    reported = ranking_metrics(ranks, (10, 50))
    for metric, value in reported.items():
        assert per_user(ranks, metric).mean() == pytest.approx(value)


def test_compare_pairs_the_seed_averaged_per_user_metric():
    # Ours ranks every target first in seed 0 and tenth in seed 1; the baseline always misses the top 10.
    ours, baseline = [np.zeros(USERS, int), np.full(USERS, 9)], [np.full(USERS, 10)] * 2
    result = compare(ours, baseline)
    assert result["recall@10"]["mean"] == 1.0 and result["recall@10"]["baseline"] == 0.0
    expected = (1.0 + 1.0 / np.log2(11)) / 2  # each user's NDCG@10 averaged over the two seeds
    assert result["ndcg@10"]["mean"] == pytest.approx(expected)
    assert result["ndcg@10"]["system"] == pytest.approx(expected)
    assert result["ndcg@10"]["ratio"] is None  # the baseline's NDCG@10 is 0: no ratio
