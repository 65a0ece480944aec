"""Score adjustments chosen after training on validation users by CALIBRATION_METRIC: the history item score,
the co-occurrence weight and the history vector weight. The server applies all three from the manifest, so
served rankings match the evaluated ones.

History item score: a text model ranks a user's own history at the top (it is the text most like the user),
yet most data sets rarely repeat: nobody rates a film twice, few buy the same oscilloscope twice. One scalar
added to the score of history items, in served score units (cosine + temperature * bias), lets the data say
how much.

Co-occurrence weight: how much of llmrec.cooccurrence's item-to-item score to add (0 = none).

History vector weight: how much of llmrec.history_vector's decayed sum of recent item vectors to add to the
user's query (0 = none): memory of the items beyond the text window.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from llmrec import cooccurrence as cooccurrence_defaults
from llmrec import history_vector as history_vector_defaults
from llmrec.cooccurrence import CooccurrenceTable
from llmrec.history_vector import history_vector
from training.data import Example, Interactions, item_popularity, train_sequences
from training.evaluation import ScoreFn, ranking_metrics, target_ranks

# 0 keeps the text model's ranking; -4 puts every history item below every other item (scores span ~[-1.5, 1.5]).
HISTORY_SCORE_GRID = (0.0, -0.01, -0.02, -0.05, -0.1, -0.2, -0.5, -1.0, -4.0)
# log(1 + count) terms are ~0.7-5 per neighbour: 0.4 lets co-occurrence outweigh most text differences.
# Up to 0.8 because MovieLens chose 0.4, the largest of an earlier grid.
COOCCURRENCE_WEIGHT_GRID = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8)
# Unit item vectors summed with decay 0.8 over 20 items have norm ~1-5 against the unit user vector; up to
# 1.6 because Scientific's validation still rose at 0.4 (with co-occurrence weight 0.2).
HISTORY_VECTOR_WEIGHT_GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.2, 1.6)
# NDCG@50 weighs the top 10 most (1 to 0.29 a hit) yet credits ranks 11-50 too (0.28 to 0.18), the candidates a
# retrieval tier hands a re-ranker; NDCG@10 alone would buy the top 10 with the rest of the list.
CALIBRATION_METRIC = "ndcg@50"
CALIBRATION_KS = (10, 50)


@dataclasses.dataclass(frozen=True)
class Adjustments:
    history_item_score: float = 0.0
    cooccurrence_weight: float = 0.0
    history_vector_weight: float = 0.0

    @property
    def key(self) -> str:
        """How the calibration table names this choice: "history_item_score,cooccurrence_weight,history_vector_weight"."""
        return f"{self.history_item_score},{self.cooccurrence_weight},{self.history_vector_weight}"


@dataclasses.dataclass(frozen=True)
class Recency:
    """Which history items a score reads: the recent_items most recent, weighted decay**j (j = 0 for the latest).
    Training uses the module defaults; a bundle's evaluation uses its manifest's, as its server does."""

    recent_items: int
    decay: float


COOCCURRENCE_RECENCY = Recency(cooccurrence_defaults.RECENT_ITEMS, cooccurrence_defaults.RECENCY_DECAY)
HISTORY_VECTOR_RECENCY = Recency(history_vector_defaults.RECENT_ITEMS, history_vector_defaults.RECENCY_DECAY)


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


def cooccurrence_scores(data: Interactions, examples: Sequence[Example], table: CooccurrenceTable,
                        recency: Recency = COOCCURRENCE_RECENCY) -> np.ndarray:
    """(len(examples), num_items) co-occurrence scores of each example's history (unweighted)."""
    out = np.zeros((len(examples), data.num_items))
    for row, example in enumerate(examples):
        history = data.sequences[example.user][: example.target_position]
        items, values = table.scores(history, recency.recent_items, recency.decay)
        out[row, items] = values
    return out


def history_vector_scores(data: Interactions, examples: Sequence[Example], item_vectors: np.ndarray,
                          recency: Recency = HISTORY_VECTOR_RECENCY) -> np.ndarray:
    """(len(examples), num_items) inner products of each example's history vector with the unit item vectors
    (num_items, dim): the history vector's share of the score, before its weight."""
    histories = np.stack([history_vector(item_vectors[data.sequences[e.user][: e.target_position]],
                                         recency.recent_items, recency.decay)
                          for e in examples]) if examples else np.zeros((0, item_vectors.shape[1]), np.float32)
    return histories.astype(np.float64) @ item_vectors.T.astype(np.float64)


def adjust(scores: np.ndarray, data: Interactions, examples: Sequence[Example], adjustments: Adjustments,
           table: CooccurrenceTable | None, item_vectors: np.ndarray | None = None,
           cooccurrence_recency: Recency = COOCCURRENCE_RECENCY,
           history_vector_recency: Recency = HISTORY_VECTOR_RECENCY) -> np.ndarray:
    """Model scores -> served scores (in place): the adjustments, as the server applies them. item_vectors are
    the unit item vectors (num_items, dim) the history vector is built from."""
    add_history_score(scores, data, examples, adjustments.history_item_score)
    if adjustments.cooccurrence_weight and table is not None:
        scores += adjustments.cooccurrence_weight * cooccurrence_scores(data, examples, table, cooccurrence_recency)
    if adjustments.history_vector_weight:
        if item_vectors is None:
            raise ValueError("a history vector weight needs the item vectors")
        scores += adjustments.history_vector_weight * history_vector_scores(
            data, examples, item_vectors, history_vector_recency)
    return scores


def calibration_keys() -> set[str]:
    """The Adjustments.key of every grid choice: a run calibrated on another grid is calibrated again."""
    return {Adjustments(h, w, v).key for h in HISTORY_SCORE_GRID for w in COOCCURRENCE_WEIGHT_GRID
            for v in HISTORY_VECTOR_WEIGHT_GRID}


def choose_adjustments(
    scores: np.ndarray, data: Interactions, examples: Sequence[Example], table: CooccurrenceTable,
    item_vectors: np.ndarray,
) -> tuple[Adjustments, dict[str, dict[str, float]]]:
    """The grid choice with the best CALIBRATION_METRIC on `examples` (validation users), and Recall/NDCG at
    CALIBRATION_KS for every choice (keyed by Adjustments.key). Ties go to the milder choice."""
    targets = np.array([data.sequences[e.user][e.target_position] for e in examples])
    cooccurrence = cooccurrence_scores(data, examples, table)
    history_vectors = history_vector_scores(data, examples, item_vectors)
    metrics: dict[str, dict[str, float]] = {}
    candidates = []
    for history_value in HISTORY_SCORE_GRID:
        lowered = add_history_score(scores.copy(), data, examples, history_value)
        for weight in COOCCURRENCE_WEIGHT_GRID:
            with_cooccurrence = lowered + weight * cooccurrence
            for vector_weight in HISTORY_VECTOR_WEIGHT_GRID:
                choice = Adjustments(history_value, weight, vector_weight)
                ranks = target_ranks(with_cooccurrence + vector_weight * history_vectors, targets)
                metrics[choice.key] = ranking_metrics(ranks, CALIBRATION_KS)
                candidates.append((metrics[choice.key][CALIBRATION_METRIC], history_value, -weight, -vector_weight))
    _, history_value, negative_weight, negative_vector_weight = max(candidates)
    return Adjustments(history_value, -negative_weight, -negative_vector_weight), metrics


def cooccurrence_only_scores(data: Interactions, table: CooccurrenceTable) -> ScoreFn:
    """The co-occurrence score with no model at all, a baseline for how much the language model adds: ties
    broken by popularity, history items ranked last (every data set here chose to lower them)."""
    popularity = np.log1p(item_popularity(data))

    def score(examples: Sequence[Example]) -> np.ndarray:
        scores = cooccurrence_scores(data, examples, table) + 1e-3 * popularity
        return add_history_score(scores, data, examples, -1e3)

    return score
