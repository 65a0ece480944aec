"""The ranking stage's rule (llmrec.ranking_stage.rerank) and the training side's list mining and weight choice."""

import numpy as np

from llmrec.ranking_stage import rerank
from llmrec.training.ranking_stage import WEIGHTS, choose_stage, reranked_ranks, training_lists


def test_rerank_adds_the_weighted_logit_and_keeps_the_first_stage_order_on_ties():
    first = np.array([3.0, 2.0, 1.0])
    order, scores = rerank(first, np.array([0.0, 0.0, 5.0]), 1.0)
    assert order.tolist() == [2, 0, 1] and scores.tolist() == [6.0, 3.0, 2.0]
    order, scores = rerank(np.array([1.0, 1.0, 1.0]), np.array([2.0, 2.0, 2.0]), 0.5)
    assert order.tolist() == [0, 1, 2]  # equal scores: the first stage's order
    assert rerank(first, np.array([9.0, -9.0, 0.0]), 0.0)[0].tolist() == [0, 1, 2]


def test_training_lists_put_the_target_first_and_draw_negatives_from_the_candidates_only():
    top = np.array([[5, 1, 2, 3, 4], [7, 8, 9, 5, 6]])
    lists = training_lists(top, np.array([1, 0]), 3, np.random.default_rng(0))
    assert lists[:, 0].tolist() == [1, 0]
    assert set(lists[0, 1:]) <= {5, 2, 3, 4} and len(set(lists[0, 1:])) == 3  # never the target, no repeats
    assert set(lists[1, 1:]) <= {7, 8, 9, 5, 6}  # a target outside the candidates: any candidate is a negative


def test_reranked_ranks_move_only_targets_among_the_rescored_candidates():
    top = np.array([[10, 11, 12, 13], [20, 21, 22, 23]])
    first = np.array([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    logits = np.array([[0.0, 0.0, 9.0, 0.0], [0.0, 0.0, 0.0, 9.0]])
    targets = np.array([12, 23])
    first_ranks = np.array([2, 3])
    assert reranked_ranks(top, first, logits, targets, 1.0, 4, first_ranks).tolist() == [0, 0]
    # only the first 3 re-scored: the second target (4th) keeps its rank; the first still rises
    assert reranked_ranks(top, first, logits, targets, 1.0, 3, first_ranks).tolist() == [0, 3]
    # a target the first stage put beyond the list keeps its rank whatever the logits
    assert reranked_ranks(top, first, logits, np.array([99, 23]), 1.0, 4, np.array([57, 3])).tolist() == [57, 0]


def test_the_weight_chosen_is_the_mildest_that_ranks_best():
    rng = np.random.default_rng(0)
    users, n = 50, 20
    top = np.tile(np.arange(n), (users, 1))
    first = np.sort(rng.normal(size=(users, n)), axis=1)[:, ::-1] * 0.01  # the first stage's scores, best first
    targets = rng.integers(3, n, users)
    logits = (top == targets[:, None]).astype(float)  # the cross-encoder knows every target
    weight, candidates, grid = choose_stage(top, first, logits, targets, targets.copy())
    assert candidates == 20 and grid[f"{weight},20"] == 1.0
    assert all(grid[f"{w},20"] < 1.0 for w in WEIGHTS if w < weight)  # the smallest weight that does it
    noise = rng.normal(size=(users, n))  # a cross-encoder that knows nothing: no weight beats the first stage
    weight, candidates, _ = choose_stage(top, first, np.where(top == targets[:, None], -5.0, noise), targets,
                                         targets.copy())
    assert weight == 0.0 and candidates == 10


def test_the_re_scored_list_keeps_the_reserved_new_items():
    from llmrec.server.recommender import best_with_reserved

    new = np.array([False, False, False, True, False, True])  # positions in the re-scored order, best first
    assert best_with_reserved(new, 3, 0) == [0, 1, 2]
    assert best_with_reserved(new, 3, 1) == [0, 1, 3]  # the best new item replaces the lowest other
    assert best_with_reserved(new, 3, 2) == [0, 3, 5]
    assert best_with_reserved(new, 3, 5) == [0, 3, 5]  # no more new items than the list holds
    assert best_with_reserved(np.array([True, False]), 1, 1) == [0]  # already there
    assert best_with_reserved(new, 10, 1) == [0, 1, 2, 3, 4, 5]  # a short list stays whole
