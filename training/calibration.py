"""Score adjustments chosen after training on validation users: the history item score and the co-occurrence
weight. The server applies both from the manifest, so served rankings match the evaluated ones.

History item score: a text model ranks a user's own history at the top (it is the text most like the user),
yet most data sets rarely repeat: nobody rates a film twice, few buy the same oscilloscope twice. One scalar
added to the score of history items, in served score units (cosine + temperature * bias), lets the data say
how much.

Co-occurrence weight: how much of llmrec.cooccurrence's item-to-item score to add (0 = none).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from llmrec.cooccurrence import CooccurrenceTable
from training.data import Example, Interactions, item_popularity, train_sequences
from training.evaluation import ScoreFn, ranking_metrics, target_ranks

# 0 keeps the text model's ranking; -4 puts every history item below every other item (scores span ~[-1.5, 1.5]).
HISTORY_SCORE_GRID = (0.0, -0.01, -0.02, -0.05, -0.1, -0.2, -0.5, -1.0, -4.0)
# log(1 + count) terms are ~0.7-5 per neighbour: 0.4 lets co-occurrence outweigh most text differences.
COOCCURRENCE_WEIGHT_GRID = (0.0, 0.02, 0.05, 0.1, 0.2, 0.4)


@dataclasses.dataclass(frozen=True)
class Adjustments:
    history_item_score: float = 0.0
    cooccurrence_weight: float = 0.0


def training_cooccurrence(data: Interactions) -> CooccurrenceTable:
    """Co-occurrence counted on the training part of every sequence only (never a valid or test target)."""
    return CooccurrenceTable.from_sequences(train_sequences(data), data.num_items)


def history_items(data: Interactions, example: Example) -> np.ndarray:
    """The distinct items the user had before the example's target."""
    return np.unique(data.sequences[example.user][: example.target_position])


def add_history_score(scores: np.ndarray, data: Interactions, examples: Sequence[Example], value: float) -> np.ndarray:
    """scores (len(examples), num_items) with `value` added to each example's history items (in place)."""
    if value:
        for row, example in enumerate(examples):
            scores[row, history_items(data, example)] += value
    return scores


def cooccurrence_scores(data: Interactions, examples: Sequence[Example], table: CooccurrenceTable) -> np.ndarray:
    """(len(examples), num_items) co-occurrence scores of each example's history (unweighted)."""
    out = np.zeros((len(examples), data.num_items))
    for row, example in enumerate(examples):
        items, values = table.scores(data.sequences[example.user][: example.target_position])
        out[row, items] = values
    return out


def adjust(scores: np.ndarray, data: Interactions, examples: Sequence[Example], adjustments: Adjustments,
           table: CooccurrenceTable | None) -> np.ndarray:
    """Model scores -> served scores (in place): both adjustments, as the server applies them."""
    add_history_score(scores, data, examples, adjustments.history_item_score)
    if adjustments.cooccurrence_weight and table is not None:
        scores += adjustments.cooccurrence_weight * cooccurrence_scores(data, examples, table)
    return scores


def choose_adjustments(
    scores: np.ndarray, data: Interactions, examples: Sequence[Example], table: CooccurrenceTable
) -> tuple[Adjustments, dict[str, float]]:
    """The grid pair with the best NDCG@10 on `examples` (validation users), and NDCG@10 for every pair
    (keyed "history_item_score,cooccurrence_weight"). Ties go to the milder pair."""
    targets = np.array([data.sequences[e.user][e.target_position] for e in examples])
    cooccurrence = cooccurrence_scores(data, examples, table)
    table_ndcg: dict[str, float] = {}
    candidates = []
    for history_value in HISTORY_SCORE_GRID:
        lowered = add_history_score(scores.copy(), data, examples, history_value)
        for weight in COOCCURRENCE_WEIGHT_GRID:
            ndcg = ranking_metrics(target_ranks(lowered + weight * cooccurrence, targets), (10,))["ndcg@10"]
            table_ndcg[f"{history_value},{weight}"] = ndcg
            candidates.append((ndcg, history_value, -weight))
    ndcg, history_value, negative_weight = max(candidates)
    return Adjustments(history_value, -negative_weight), table_ndcg


def cooccurrence_only_scores(data: Interactions, table: CooccurrenceTable) -> ScoreFn:
    """The co-occurrence score with no model at all, a baseline for how much the language model adds: ties
    broken by popularity, history items ranked last (every data set here chose to lower them)."""
    popularity = np.log1p(item_popularity(data))

    def score(examples: Sequence[Example]) -> np.ndarray:
        scores = cooccurrence_scores(data, examples, table) + 1e-3 * popularity
        return add_history_score(scores, data, examples, -1e3)

    return score
