"""Score adjustments chosen after training on validation users by CALIBRATION_METRIC: the history item score,
the co-occurrence weight, the history vector weight and the sequence model weight. The server applies all four
from the manifest, so served rankings match the evaluated ones.

History item score: a text model ranks a user's own history at the top (it is the text most like the user),
yet most data sets rarely repeat: nobody rates a film twice, few buy the same oscilloscope twice. One scalar
added to the score of history items, in served score units (cosine + temperature * bias), lets the data say
how much.

Co-occurrence weight: how much of llmrec.cooccurrence's item-to-item score to add (0 = none).

History vector weight: how much of llmrec.history_vector's decayed sum of recent item vectors to add to the
user's query (0 = none): memory of the items beyond the text window.

Sequence model weight: how much of training.sequence_model's vector (a small transformer over the item vectors of
the recent history) to add to the user's query (0 = none).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from llmrec import cooccurrence as cooccurrence_defaults
from llmrec import history_vector as history_vector_defaults
from llmrec.cooccurrence import CooccurrenceTable
from llmrec.history_vector import history_vector
from llmrec.training.data import Example, Interactions, item_popularity, sequences_before
from llmrec.training.evaluation import ScoreFn, ranking_metrics, target_ranks

# 0 keeps the text model's ranking; -4 puts every history item below every other item (scores span ~[-1.5, 1.5]).
HISTORY_SCORE_GRID = (0.0, -0.01, -0.02, -0.05, -0.1, -0.2, -0.5, -1.0, -4.0)
# log(1 + count) terms are ~0.7-5 per neighbour: 0.4 lets co-occurrence outweigh most text differences.
# Up to 0.8 because MovieLens chose 0.4, the largest of an earlier grid.
COOCCURRENCE_WEIGHT_GRID = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8)
# Unit item vectors summed with decay 0.8 over 20 items have norm ~1-5 against the unit user vector; up to
# 1.6 because Scientific's validation still rose at 0.4 (with co-occurrence weight 0.2).
HISTORY_VECTOR_WEIGHT_GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.2, 1.6)
# The sequence model is trained as a recommender of its own (weight 1 alone ranks as it was trained to); beside
# the text model each needs less.
SEQUENCE_WEIGHT_GRID = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5)
# NDCG@50 weighs the top 10 most (1 to 0.29 a hit) yet credits ranks 11-50 too (0.28 to 0.18), the candidates a
# retrieval tier hands a re-ranker; NDCG@10 alone would buy the top 10 with the rest of the list.
CALIBRATION_METRIC = "ndcg@50"
CALIBRATION_KS = (10, 50)


@dataclasses.dataclass(frozen=True)
class Adjustments:
    history_item_score: float = 0.0
    cooccurrence_weight: float = 0.0
    history_vector_weight: float = 0.0
    sequence_weight: float = 0.0

    @property
    def key(self) -> str:
        """How the calibration table names this choice: its four values, comma-separated, in field order."""
        return ",".join(str(value) for value in dataclasses.astuple(self))

    @property
    def mildness(self) -> tuple[float, ...]:
        """Larger is milder (closer to the bare model): ties in the search go to the milder choice."""
        return (self.history_item_score, -self.cooccurrence_weight, -self.history_vector_weight, -self.sequence_weight)


@dataclasses.dataclass(frozen=True)
class Recency:
    """Which history items a score reads: the recent_items most recent, weighted decay**j (j = 0 for the latest).
    Training uses the module defaults; a bundle's evaluation uses its manifest's, as its server does."""

    recent_items: int
    decay: float


COOCCURRENCE_RECENCY = Recency(cooccurrence_defaults.RECENT_ITEMS, cooccurrence_defaults.RECENCY_DECAY)
HISTORY_VECTOR_RECENCY = Recency(history_vector_defaults.RECENT_ITEMS, history_vector_defaults.RECENCY_DECAY)


def cooccurrence_before(data: Interactions, split: str) -> CooccurrenceTable:
    """Co-occurrence counted over every event before the split's targets, as a bundle built for serving counts
    every event known when it is built: 'valid' counts the training part of each sequence (what the adjustments
    are chosen with), 'test' adds the valid events, which the test histories already hold. A split's own targets
    are never counted. Models are trained on the training part only."""
    return CooccurrenceTable.from_sequences(sequences_before(data, split), data.num_items)


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
           history_vector_recency: Recency = HISTORY_VECTOR_RECENCY,
           sequence_vectors: np.ndarray | None = None) -> np.ndarray:
    """Model scores -> served scores (in place): the adjustments, as the server applies them. item_vectors are
    the unit item vectors (num_items, dim) the history vector is built from and the sequence vectors
    (len(examples), dim) are scored against."""
    add_history_score(scores, data, examples, adjustments.history_item_score)
    if adjustments.cooccurrence_weight and table is not None:
        scores += adjustments.cooccurrence_weight * cooccurrence_scores(data, examples, table, cooccurrence_recency)
    if adjustments.history_vector_weight:
        if item_vectors is None:
            raise ValueError("a history vector weight needs the item vectors")
        scores += adjustments.history_vector_weight * history_vector_scores(
            data, examples, item_vectors, history_vector_recency)
    if adjustments.sequence_weight:
        if item_vectors is None or sequence_vectors is None:
            raise ValueError("a sequence model weight needs the item vectors and the sequence vectors")
        scores += adjustments.sequence_weight * sequence_scores(sequence_vectors, item_vectors)
    return scores


def sequence_scores(sequence_vectors: np.ndarray, item_vectors: np.ndarray) -> np.ndarray:
    """(len(examples), num_items) inner products of the sequence vectors with the unit item vectors."""
    return sequence_vectors.astype(np.float64) @ item_vectors.T.astype(np.float64)


def calibration_search() -> dict:
    """What choose_adjustments searches, as JSON: a run calibrated by another search is calibrated again."""
    return {"metric": CALIBRATION_METRIC, "history_item_score": list(HISTORY_SCORE_GRID),
            "cooccurrence_weight": list(COOCCURRENCE_WEIGHT_GRID),
            "history_vector_weight": list(HISTORY_VECTOR_WEIGHT_GRID), "sequence_weight": list(SEQUENCE_WEIGHT_GRID),
            "cooccurrence_counts": "every event before the evaluated split's targets",
            "stages": ["history_item_score x cooccurrence_weight x history_vector_weight",
                       "history_vector_weight x sequence_weight", "history_item_score x cooccurrence_weight"]}


def choose_adjustments(
    scores: np.ndarray, data: Interactions, examples: Sequence[Example], table: CooccurrenceTable,
    item_vectors: np.ndarray, sequence_vectors: np.ndarray | None = None,
) -> tuple[Adjustments, dict[str, dict[str, float]]]:
    """The choice with the best CALIBRATION_METRIC on `examples` (validation users), and Recall/NDCG at
    CALIBRATION_KS for every choice tried (keyed by Adjustments.key). Ties go to the milder choice.

    The four-way grid is too large to try whole (~6,500 full rankings), so it is searched in stages, each starting
    from the best so far: the first three adjustments together with no sequence model, then the history vector
    and sequence weights together, then the history item score and co-occurrence weight again.
    sequence_vectors: (len(examples), dim), or None when there is no sequence model (its weight stays 0).
    """
    targets = np.array([data.sequences[e.user][e.target_position] for e in examples])
    history_mask = add_history_score(np.zeros_like(scores), data, examples, 1.0) > 0
    cooccurrence = cooccurrence_scores(data, examples, table)
    history_vectors = history_vector_scores(data, examples, item_vectors)
    sequence = sequence_scores(sequence_vectors, item_vectors) if sequence_vectors is not None else None
    metrics: dict[str, dict[str, float]] = {}

    def best_of(choices: list[Adjustments]) -> Adjustments:
        for choice in choices:
            if choice.key not in metrics:
                adjusted = (scores + choice.history_item_score * history_mask
                            + choice.cooccurrence_weight * cooccurrence
                            + choice.history_vector_weight * history_vectors)
                if choice.sequence_weight:
                    adjusted += choice.sequence_weight * sequence
                metrics[choice.key] = ranking_metrics(target_ranks(adjusted, targets), CALIBRATION_KS)
        return max(choices, key=lambda c: (metrics[c.key][CALIBRATION_METRIC], c.mildness))

    best = best_of([Adjustments(h, c, v) for h in HISTORY_SCORE_GRID for c in COOCCURRENCE_WEIGHT_GRID
                    for v in HISTORY_VECTOR_WEIGHT_GRID])
    if sequence is not None:
        best = best_of([dataclasses.replace(best, history_vector_weight=v, sequence_weight=w)
                        for v in HISTORY_VECTOR_WEIGHT_GRID for w in SEQUENCE_WEIGHT_GRID])
        best = best_of([dataclasses.replace(best, history_item_score=h, cooccurrence_weight=c)
                        for h in HISTORY_SCORE_GRID for c in COOCCURRENCE_WEIGHT_GRID])
    return best, metrics


def cooccurrence_only_scores(data: Interactions, table: CooccurrenceTable) -> ScoreFn:
    """The co-occurrence score with no model at all, a baseline for how much the language model adds: ties
    broken by popularity, history items ranked last (every data set here chose to lower them)."""
    popularity = np.log1p(item_popularity(data))

    def score(examples: Sequence[Example]) -> np.ndarray:
        scores = cooccurrence_scores(data, examples, table) + 1e-3 * popularity
        return add_history_score(scores, data, examples, -1e3)

    return score
