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

The fast path (a request served without the encoder: docs/serving.md) is the same rule with the user vector that
its user map (llmrec.fast_user) predicts from the history's item vectors; the map is fitted on the validation users'
encoder vectors and the fast path's own adjustments are chosen by the same search over the map's held-out
predictions, its model term weighed like another row's own score (choose_fast_path; experiments/fast_path.py
measures what it loses).

Every other row `make eval` compares (popularity, SASRec, co-occurrence alone, the no-LM hybrid, ...) is calibrated
by the same search over the same grids (calibrate_row: its own scores as ScoreTerms' model term), so that each row is
judged under each history policy (POLICIES) on equal terms.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence

import numpy as np

from llmrec import fast_user
from llmrec.cooccurrence import CooccurrenceTable
from llmrec.scoring import Adjustments, ScoreTerms, ScoringRule, query_rows
from llmrec.training.data import Example, Interactions, item_popularity, sequences_before
from llmrec.training.evaluation import ScoreFn, evaluate, ranking_metrics, target_ranks

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
            "fast_path": "the same search again with the fast path's user map's held-out vectors, model weights "
                         + str(list(MODEL_WEIGHT_GRID)),
            "stages": ["history_item_score x cooccurrence_weight x history_vector_weight",
                       "history_vector_weight x sequence_weight", "history_item_score x cooccurrence_weight"]}


def validation_terms(rows: np.ndarray, unit_vectors: np.ndarray, data: Interactions, examples: Sequence[Example],
                     table: CooccurrenceTable | None, user_vectors: np.ndarray,
                     sequence_vectors: np.ndarray | None = None) -> TermsFn:
    """choose_adjustments' terms_of for our model: examples[chunk]'s ScoreTerms given their user vectors (rows:
    item_rows; the fast path's: its user map's predictions, llmrec.fast_user)."""
    return lambda chunk: ScoreTerms.of(
        ScoringRule(), query_rows(user_vectors[chunk]) @ rows.T, unit_vectors, histories(data, examples[chunk]),
        table, None if sequence_vectors is None else sequence_vectors[chunk])


Stage = Callable[[Adjustments], list[Adjustments]]  # the best choice so far -> the choices to try next
_GRIDS = {"history_item_score": HISTORY_SCORE_GRID, "cooccurrence_weight": COOCCURRENCE_WEIGHT_GRID,
          "history_vector_weight": HISTORY_VECTOR_WEIGHT_GRID, "sequence_weight": SEQUENCE_WEIGHT_GRID}


def grid_stage(*fields: str) -> Stage:
    """Every combination of these Adjustments fields' grids, the other fields kept from the best so far."""
    return lambda best: [dataclasses.replace(best, **dict(zip(fields, values)))
                         for values in itertools.product(*(_GRIDS[field] for field in fields))]


def search_adjustments(terms_of: TermsFn, data: Interactions, examples: Sequence[Example], stages: Sequence[Stage],
                       chunk_users: int = CHUNK_USERS) -> tuple[Adjustments, dict[str, dict[str, float]]]:
    """The choice with the best CALIBRATION_METRIC on `examples` (validation users) after each stage in turn, each
    starting from the best so far (Adjustments() at first), and Recall/NDCG at CALIBRATION_KS for every choice
    tried (keyed by Adjustments.key). Ties go to the milder choice. Each stage scores the users chunk by chunk
    (terms_of), so memory does not grow with the number of users."""
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

    best = Adjustments()
    for stage in stages:
        best = best_of(stage(best))
    return best, metrics


def choose_adjustments(terms_of: TermsFn, data: Interactions, examples: Sequence[Example], with_sequence: bool,
                       chunk_users: int = CHUNK_USERS) -> tuple[Adjustments, dict[str, dict[str, float]]]:
    """The text model's four adjustments, chosen by search_adjustments.

    The four-way grid is too large to try whole (~6,500 full rankings), so it is searched in stages: the first
    three adjustments together with no sequence model, then the history vector and sequence weights together,
    then the history item score and co-occurrence weight again.

    Args:
        terms_of: the score terms (llmrec.scoring.ScoreTerms) of examples[chunk].
        with_sequence: whether the terms carry a sequence model term (else its weight stays 0).
    """
    stages = [grid_stage("history_item_score", "cooccurrence_weight", "history_vector_weight")]
    if with_sequence:
        stages += [grid_stage("history_vector_weight", "sequence_weight"),
                   grid_stage("history_item_score", "cooccurrence_weight")]
    return search_adjustments(terms_of, data, examples, stages, chunk_users)


# The grids are in served-score units (cosine + temperature * bias), where a user's scores span at most ~3 and the
# history score -4 puts history items below every other item. calibrate_row scales every row first so that its
# largest span over validation users is this, so that each grid value means the same for every row whatever its
# units (popularity counts, SASRec logits; text model rows are about there already).
SERVED_SCORE_SPAN = 3.0


# A row that takes a co-occurrence weight weighs its own score too: the co-occurrence grid was made against our
# scores, and a row whose best blend leans further towards co-occurrence than the grid's largest weight reaches it
# by weighing its own score down. Ties go to the larger weight (the row's own score as it is).
MODEL_WEIGHT_GRID = (1.0, 0.5, 0.25, 0.1)


def choose_fast_adjustments(rows: np.ndarray, unit_vectors: np.ndarray, data: Interactions,
                            examples: Sequence[Example], table: CooccurrenceTable | None,
                            sequence_vectors: np.ndarray | None = None, chunk_users: int = CHUNK_USERS,
                            user_vectors: np.ndarray | None = None) -> tuple[Adjustments, dict]:
    """The fast path's adjustments: choose_adjustments over its user vectors (validation_terms; None: zero vectors,
    else those the fast path's user map predicts, llmrec.fast_user), with the model term weighed by each of
    MODEL_WEIGHT_GRID first, as calibrate_row weighs a row's own score: the grids were made beside the encoder's
    unit user vector, and without it the vector terms may need to outweigh the model term by more than the grids
    reach. Scores scaled by 1/w rank alike, so the choice at model weight w is returned as its adjustments divided
    by w (the served rule has no model weight). Ties go to the larger weight. Returns the adjustments and {"model_weight", "chosen" (at that weight),
    "validation" (its search's metrics)}."""
    if user_vectors is None:
        user_vectors = np.zeros((len(examples), unit_vectors.shape[1]), np.float32)
    terms_of = validation_terms(rows, unit_vectors, data, examples, table, user_vectors, sequence_vectors)
    best = None
    def weighed(weight: float) -> TermsFn:
        def terms(chunk: slice) -> ScoreTerms:
            unweighed = terms_of(chunk)
            return dataclasses.replace(unweighed, model=weight * unweighed.model)
        return terms

    for weight in MODEL_WEIGHT_GRID:
        chosen, validation = choose_adjustments(weighed(weight), data, examples,
                                                with_sequence=sequence_vectors is not None, chunk_users=chunk_users)
        metric = validation[chosen.key][CALIBRATION_METRIC]
        if best is None or metric > best[0]:
            best = (metric, weight, chosen, validation)
    _, weight, chosen, validation = best
    served = Adjustments(*(value / weight for value in dataclasses.astuple(chosen)))
    return served, {"model_weight": weight, "chosen": dataclasses.asdict(chosen), CALIBRATION_METRIC: best[0],
                    "validation": validation}


def choose_fast_path(rows: np.ndarray, unit_vectors: np.ndarray, data: Interactions, examples: Sequence[Example],
                     table: CooccurrenceTable | None, sequence_vectors: np.ndarray | None, user_vectors: np.ndarray,
                     seed: int = 0, chunk_users: int = CHUNK_USERS,
                     ) -> tuple[Adjustments, fast_user.FastUserFit, dict]:
    """The fast path's user map (llmrec.fast_user, fitted on these users' encoder vectors: no targets read) and its
    adjustments (choose_fast_adjustments over the map's held-out predictions, each fold's by the map fitted on the
    other folds). Returns the adjustments, the fit (its map and held-out predictions) and {"user_map": the fit's
    description, **choose_fast_adjustments' record}."""
    inputs = fast_user.catalogue_features(unit_vectors, histories(data, examples))
    fitted = fast_user.fit(inputs, user_vectors, seed)
    del inputs
    adjustments, chosen = choose_fast_adjustments(rows, unit_vectors, data, examples, table, sequence_vectors,
                                                  chunk_users, fitted.held_out)
    return adjustments, fitted, {"user_map": fitted.as_json(), **chosen}


@dataclasses.dataclass(frozen=True)
class RowCalibration:
    """How a row is scored under the deployed policy: scale * its own score + adjustments (llmrec.scoring's rule),
    chosen on validation users. scale = the span scale (SERVED_SCORE_SPAN) * model_weight (MODEL_WEIGHT_GRID);
    `validation`: Recall/NDCG of every choice tried at that model weight, keyed by Adjustments.key."""

    scale: float
    adjustments: Adjustments
    validation: dict[str, dict[str, float]]
    model_weight: float = 1.0

    def scores(self, own_scores: ScoreFn, data: Interactions, table: CooccurrenceTable | None = None,
               history_item_score: float | None = None) -> ScoreFn:
        """The row's scores with these weights (history_item_score: another value, 0 for the published policy)."""
        adjustments = self.adjustments if history_item_score is None else dataclasses.replace(
            self.adjustments, history_item_score=history_item_score)
        return adjusted_scores(own_scores, data, self.scale, adjustments, table)

    @property
    def chosen_metric(self) -> float:
        return self.validation[self.adjustments.key][CALIBRATION_METRIC]

    def as_json(self) -> dict:
        return {"scale": self.scale, "model_weight": self.model_weight, **dataclasses.asdict(self.adjustments),
                "metric": CALIBRATION_METRIC, "validation_chosen": self.chosen_metric,
                "validation_none": self.validation[Adjustments().key][CALIBRATION_METRIC]}


def calibrate_row(own_scores: ScoreFn, data: Interactions, examples: Sequence[Example],
                  table: CooccurrenceTable | None = None, chunk_users: int = CHUNK_USERS) -> RowCalibration:
    """The history item score (and, given a co-occurrence table, the co-occurrence weight and the weight of the
    row's own score, MODEL_WEIGHT_GRID) of any row, chosen on `examples` (validation users) by search_adjustments
    over the row's own scores as ScoreTerms' model term."""
    span = span_scale(own_scores, examples, chunk_users)
    fields = ("history_item_score",) + (("cooccurrence_weight",) if table is not None else ())

    def calibrated(weight: float) -> RowCalibration:
        def terms_of(chunk: slice) -> ScoreTerms:
            scores = span * weight * np.asarray(own_scores(examples[chunk]), np.float64)
            no_vectors = np.zeros((data.num_items, 1))  # the row has no item vectors: its history vector term is 0
            return ScoreTerms.of(ScoringRule(), scores, no_vectors, histories(data, examples[chunk]), table)

        best, validation = search_adjustments(terms_of, data, examples, [grid_stage(*fields)], chunk_users)
        return RowCalibration(span * weight, best, validation, weight)

    choices = [calibrated(weight) for weight in (MODEL_WEIGHT_GRID if table is not None else (1.0,))]
    return max(choices, key=lambda choice: (choice.chosen_metric, choice.model_weight))


# How `make eval` treats a user's history items (items they already have), each row under both:
#   published: ranked like any other item by the row's own scores, as the papers we compare with rank them;
#   deployed: the row's own history item score, chosen on validation users (calibrate_row), as we serve.
POLICIES = ("published", "deployed")


def evaluate_policies(valid_scores: ScoreFn, test_scores: ScoreFn, data: Interactions, valid: Sequence[Example],
                      test: Sequence[Example], ks: Sequence[int], tables: dict[str, CooccurrenceTable] | None = None,
                      ) -> tuple[dict[str, dict], dict[str, np.ndarray], RowCalibration]:
    """A row under each policy: its metrics and per-user test ranks by policy, and its calibration.

    Args:
        valid_scores, test_scores: the row's own scores of validation and test users.
        tables: {"valid": ..., "test": ...} co-occurrence tables (cooccurrence_before) when the row takes a
            co-occurrence weight too; its published policy keeps that weight and drops the history item score.
    """
    calibration = calibrate_row(valid_scores, data, valid, tables["valid"] if tables else None)
    rows, ranks = {}, {}
    for policy, history_item_score in zip(POLICIES, (0.0, None)):
        scores = calibration.scores(test_scores, data, tables["test"] if tables else None, history_item_score)
        rows[policy], ranks[policy] = evaluate(scores, data, test, ks, desc=f"evaluate {policy}", return_ranks=True)
    return rows, ranks, calibration


def span_scale(own_scores: ScoreFn, examples: Sequence[Example], chunk_users: int = CHUNK_USERS) -> float:
    """The factor that makes the largest span (max - min over items) of one user's scores SERVED_SCORE_SPAN."""
    span = 0.0
    for start in range(0, len(examples), chunk_users):
        scores = np.asarray(own_scores(examples[start : start + chunk_users]), np.float64)
        span = max(span, float((scores.max(1) - scores.min(1)).max(initial=0.0)))
    return SERVED_SCORE_SPAN / span if span > 0 else 1.0


def adjusted_scores(own_scores: ScoreFn, data: Interactions, scale: float, adjustments: Adjustments,
                    table: CooccurrenceTable | None = None) -> ScoreFn:
    """scale * a row's own scores + the scoring rule's history item score and co-occurrence term (the history
    vector and sequence weights need item vectors: ScoringRule.dense_scores)."""
    if adjustments.history_vector_weight or adjustments.sequence_weight:
        raise ValueError("a row without item vectors cannot take a history vector or sequence weight; this is a bug")
    rule = ScoringRule(adjustments)

    def score(examples: Sequence[Example]) -> np.ndarray:
        scores = scale * np.array(own_scores(examples), dtype=np.float64)
        for row, history in enumerate(histories(data, examples)):
            items, values = rule.adjustments_of(history, table)
            scores[row, items] += values
        return scores

    return score


def cooccurrence_only_scores(data: Interactions, table: CooccurrenceTable) -> ScoreFn:
    """The co-occurrence score with no model at all, a baseline for how much the language model adds: ties broken
    by popularity. History items are ranked like any other item (by their own co-occurrence); a history item score
    is the deployed policy's choice (calibrate_row)."""
    popularity = 1e-3 * np.log1p(item_popularity(data))
    tie_break = lambda examples: np.broadcast_to(popularity, (len(examples), data.num_items))  # noqa: E731
    return adjusted_scores(tie_break, data, 1.0, Adjustments(cooccurrence_weight=1.0), table)
