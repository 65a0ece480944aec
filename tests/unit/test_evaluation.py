import math

import numpy as np
import pytest

from llmrec.training.evaluation import ranking_metrics, target_ranks


def slow_metrics(scores, targets, k):
    recall, ndcg = [], []
    for row, target in zip(scores, targets):
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))  # ties broken by item number
        rank = order.index(target)
        recall.append(rank < k)
        ndcg.append(1 / math.log2(rank + 2) if rank < k else 0.0)
    return np.mean(recall), np.mean(ndcg)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_a_slow_reference_including_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, size=(40, 30)).astype(float)  # many ties
    targets = rng.integers(0, 30, size=40)
    metrics = ranking_metrics(target_ranks(scores, targets), ks=(1, 10))
    for k in (1, 10):
        recall, ndcg = slow_metrics(scores, targets, k)
        assert metrics[f"recall@{k}"] == pytest.approx(recall)
        assert metrics[f"ndcg@{k}"] == pytest.approx(ndcg)


def test_constant_scores_earn_no_credit_beyond_item_order():
    ranks = target_ranks(np.zeros((2, 100)), np.array([0, 99]))
    assert ranks.tolist() == [0, 99]


def test_perfect_ranking_scores_one():
    scores = np.eye(5)
    metrics = ranking_metrics(target_ranks(scores, np.arange(5)), ks=(1,))
    assert metrics == {"recall@1": 1.0, "ndcg@1": 1.0}
