"""Score adjustments chosen after training on validation users by CALIBRATION_METRIC: the history item score,
the co-occurrence weight, the history vector weight and the sequence model weight. How they enter a score is
llmrec.scoring's rule, which evaluation and the server apply from the manifest too.

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
from collections.abc import Callable, Sequence

import numpy as np

from llmrec.cooccurrence import CooccurrenceTable
from llmrec.scoring import Adjustments, ScoreTerms, ScoringRule
from llmrec.training.data import Example, Interactions, item_popularity, sequences_before
from llmrec.training.evaluation import ScoreFn, ranking_metrics, target_ranks

# 0 keeps the text model's ranking; -4 puts every history item below every other item (scores span ~[-1.5, 1.5]).
HISTORY_SCORE_GRID = (0.0, -0.01, -0.02, -0.05, -0.1, -0.2, -0.5, -1.0, -4.0)
# log(1 + count) terms are ~0.7-5 per neighbour: 0.4 lets co-occurrence outweigh most text differences, and the
# grid reaches twice that so that the largest useful weight is inside it, not at its edge.
COOCCURRENCE_WEIGHT_GRID = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8)
# Unit item vectors summed with decay 0.8 over 20 items have norm ~1-5 against the unit user vector; weights up to
# 1.6 let the history vector outweigh the user vector when the data says so.
HISTORY_VECTOR_WEIGHT_GRID = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.2, 1.6)
# The sequence model is trained as a recommender of its own (weight 1 alone ranks as it was trained to); beside
# the text model each needs less.
SEQUENCE_WEIGHT_GRID = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5)
# NDCG@50 weighs the top 10 most (1 to 0.29 a hit) yet credits ranks 11-50 too (0.28 to 0.18), the candidates a
# retrieval tier hands a re-ranker; NDCG@10 alone would buy the top 10 with the rest of the list.
CALIBRATION_METRIC = "ndcg@50"
CALIBRATION_KS = (10, 50)
# Users scored at once: memory is a few (users x items) float64 matrices per chunk, whatever the data set's size.
CHUNK_USERS = 512

TermsFn = Callable[[slice], ScoreTerms]  # a chunk of the examples -> its score terms


def cooccurrence_before(data: Interactions, split: str) -> CooccurrenceTable:
    """Co-occurrence counted over every event before the split's targets, as a bundle built for serving counts
    every event known when it is built: 'valid' counts the training part of each sequence (what the adjustments
    are chosen with), 'test' adds the valid events, which the test histories already hold. A split's own targets
    are never counted. Models are trained on the training part only."""
    return CooccurrenceTable.from_sequences(sequences_before(data, split), data.num_items)


def histories(data: Interactions, examples: Sequence[Example]) -> list[np.ndarray]:
    """Each example's history: the items before its target, oldest first."""
    return [np.asarray(data.sequences[e.user][: e.target_position], dtype=np.int64) for e in examples]


def calibration_search() -> dict:
    """What choose_adjustments searches, as JSON: a run calibrated by another search is calibrated again."""
    return {"metric": CALIBRATION_METRIC, "history_item_score": list(HISTORY_SCORE_GRID),
            "cooccurrence_weight": list(COOCCURRENCE_WEIGHT_GRID),
            "history_vector_weight": list(HISTORY_VECTOR_WEIGHT_GRID), "sequence_weight": list(SEQUENCE_WEIGHT_GRID),
            "cooccurrence_counts": "every event before the evaluated split's targets",
            "stages": ["history_item_score x cooccurrence_weight x history_vector_weight",
                       "history_vector_weight x sequence_weight", "history_item_score x cooccurrence_weight"]}


def choose_adjustments(terms_of: TermsFn, data: Interactions, examples: Sequence[Example], with_sequence: bool,
                       chunk_users: int = CHUNK_USERS) -> tuple[Adjustments, dict[str, dict[str, float]]]:
    """The choice with the best CALIBRATION_METRIC on `examples` (validation users), and Recall/NDCG at
    CALIBRATION_KS for every choice tried (keyed by Adjustments.key). Ties go to the milder choice.

    The four-way grid is too large to try whole (~6,500 full rankings), so it is searched in stages, each starting
    from the best so far: the first three adjustments together with no sequence model, then the history vector
    and sequence weights together, then the history item score and co-occurrence weight again. Each stage scores
    the users chunk by chunk (terms_of), so memory does not grow with the number of users.

    Args:
        terms_of: the score terms (llmrec.scoring.ScoreTerms) of examples[chunk].
        with_sequence: whether the terms carry a sequence model term (else its weight stays 0).
    """
    targets = np.array([data.sequences[e.user][e.target_position] for e in examples], dtype=np.int64)
    metrics: dict[str, dict[str, float]] = {}

    def best_of(choices: list[Adjustments]) -> Adjustments:
        todo = [choice for choice in dict.fromkeys(choices) if choice.key not in metrics]
        ranks = {choice.key: np.empty(len(examples), np.int64) for choice in todo}
        for start in range(0, len(examples) if todo else 0, chunk_users):
            chunk = slice(start, start + chunk_users)
            terms = terms_of(chunk)
            for choice in todo:
                ranks[choice.key][chunk] = target_ranks(terms.combine(choice), targets[chunk])
        metrics.update({key: ranking_metrics(values, CALIBRATION_KS) for key, values in ranks.items()})
        return max(choices, key=lambda c: (metrics[c.key][CALIBRATION_METRIC], c.mildness))

    best = best_of([Adjustments(h, c, v) for h in HISTORY_SCORE_GRID for c in COOCCURRENCE_WEIGHT_GRID
                    for v in HISTORY_VECTOR_WEIGHT_GRID])
    if with_sequence:
        best = best_of([dataclasses.replace(best, history_vector_weight=v, sequence_weight=w)
                        for v in HISTORY_VECTOR_WEIGHT_GRID for w in SEQUENCE_WEIGHT_GRID])
        best = best_of([dataclasses.replace(best, history_item_score=h, cooccurrence_weight=c)
                        for h in HISTORY_SCORE_GRID for c in COOCCURRENCE_WEIGHT_GRID])
    return best, metrics


def cooccurrence_only_scores(data: Interactions, table: CooccurrenceTable) -> ScoreFn:
    """The co-occurrence score with no model at all, a baseline for how much the language model adds: ties
    broken by popularity, history items ranked last (every data set here chose to lower them)."""
    model = 1e-3 * np.log1p(item_popularity(data))
    rule = ScoringRule(Adjustments(history_item_score=-1e3, cooccurrence_weight=1.0))

    def score(examples: Sequence[Example]) -> np.ndarray:
        scores = np.tile(model, (len(examples), 1))
        for row, history in enumerate(histories(data, examples)):
            items, values = rule.adjustments_of(history, table)
            scores[row, items] += values
        return scores

    return score
