"""Repeat consumption: how far to lower items the user already has, chosen on the validation split.

A text model ranks a user's own history at the top (it is the text most like the user), yet most data sets
rarely repeat: nobody rates a film twice, few buy the same oscilloscope twice. One scalar added to the score
of history items, in served score units (cosine + temperature * bias), lets the data say how much. The server
applies the same scalar (manifest.history_item_score), so served rankings match the evaluated ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from training.data import Example, Interactions
from training.evaluation import ranking_metrics, target_ranks

# 0 keeps the text model's ranking; -4 puts every history item below every other item (scores span ~[-1.5, 1.5]).
HISTORY_SCORE_GRID = (0.0, -0.01, -0.02, -0.05, -0.1, -0.2, -0.5, -1.0, -4.0)


def history_items(data: Interactions, example: Example) -> np.ndarray:
    """The distinct items the user had before the example's target."""
    return np.unique(data.sequences[example.user][: example.target_position])


def add_history_score(scores: np.ndarray, data: Interactions, examples: Sequence[Example], value: float) -> np.ndarray:
    """scores (len(examples), num_items) with `value` added to each example's history items (in place)."""
    if value:
        for row, example in enumerate(examples):
            scores[row, history_items(data, example)] += value
    return scores


def choose_history_item_score(
    scores: np.ndarray, data: Interactions, examples: Sequence[Example]
) -> tuple[float, dict[str, float]]:
    """The grid value with the best NDCG@10 on `examples` (validation users), and NDCG@10 for every value."""
    targets = np.array([data.sequences[e.user][e.target_position] for e in examples])
    table = {}
    for value in HISTORY_SCORE_GRID:
        ranks = target_ranks(add_history_score(scores.copy(), data, examples, value), targets)
        table[str(value)] = ranking_metrics(ranks, (10,))["ndcg@10"]
    best = max(HISTORY_SCORE_GRID, key=lambda value: (table[str(value)], value))  # ties: the milder value
    return best, table
