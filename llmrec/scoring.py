"""The scoring rule: how a user, their history and the catalogue become item scores (numpy only).

    query = user_vector + history_vector_weight * history_vector(recent history) + sequence_weight * sequence_vector
            - rejected_weight * mean(unit vectors of the items the user rejected)
    score(item) = [query, 1] . [unit item vector, temperature * bias]
                  + history_item_score * [item in history]
                  + cooccurrence_weight * cooccurrence_score(recent history, item)

An item with no row in the co-occurrence table (new since the table was counted) borrows its donors' scores,
scaled by borrowed_cooccurrence (llmrec.cooccurrence.Borrowers), and every new item gets new_item_boost on top:

    score(new item) += new_item_boost

Trained items carry what a new one cannot have yet (its own co-occurrence counts, a bias learned from how many
took it), so the model's scores of new items sit below those of equally relevant trained ones. The boost is one
constant on the score's scale that puts them back on it, chosen on validation by `make eval-cold`; within the new
items the model's own order stands, so a new item enters a list only where the user's vector ranks it high.

One definition for everyone: evaluation and calibration score every item at once (`dense_scores`,
`ScoreTerms`); the server searches the index and re-scores exactly (`top_k`). Both views are built from the
same `query` and `adjustments`, and a unit test holds them to the same ranking.

Negative feedback (items the user rejected) is a term of the query, not an adjustment: it is linear in the item
vector, so the index searches the adjusted query directly and both views stay exact. An item as close to the
rejected ones as they are to each other loses about rejected_weight (a cosine's scale); the server also never
returns the rejected items themselves. The weight is not chosen on validation (the training data holds no
rejections): DEFAULT_REJECTED_WEIGHT unless a bundle's manifest says otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from llmrec import cooccurrence as cooccurrence_defaults
from llmrec import history_vector as history_vector_defaults
from llmrec.cooccurrence import Borrowers, CooccurrenceTable
from llmrec.history_vector import history_vector

# Logits are cosine / TEMPERATURE + bias: the recipe that works for text retrieval (softmax over the catalogue).
# Rows carry temperature * bias so that one inner product ranks exactly like the training logits.
DEFAULT_TEMPERATURE = 0.05
# How far the mean of the rejected items' unit vectors pulls the query away (a cosine's scale: the user vector is a
# unit vector). Measured by experiments/rejection_weight.py (simulated users reject their top item) on the test
# catalogue with the pretrained encoder: at 0.5, 17% of the other top-10 items close to the rejected one (cosine
# > 0.65) stay in the top 10 and 99% of those unlike it (cosine <= 0.5) do; 0.3 keeps half of the close ones,
# 1.0 drops 12% of the unlike ones. Rerun it on a trained bundle to choose its manifest's weight.
DEFAULT_REJECTED_WEIGHT = 0.5


@dataclasses.dataclass(frozen=True)
class Adjustments:
    """The weights chosen on validation after training (training/calibration.py); all zero = the bare model."""

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
    """Which history items a term reads: the recent_items most recent, weighted decay**j (j = 0 for the latest)."""

    recent_items: int
    decay: float


COOCCURRENCE_RECENCY = Recency(cooccurrence_defaults.RECENT_ITEMS, cooccurrence_defaults.RECENCY_DECAY)
HISTORY_VECTOR_RECENCY = Recency(history_vector_defaults.RECENT_ITEMS, history_vector_defaults.RECENCY_DECAY)


def item_rows(unit_vectors: np.ndarray, biases: np.ndarray, temperature: float) -> np.ndarray:
    """(n, dim + 1) float32 index rows [unit vector, temperature * bias]; unit_vectors are normalised here."""
    unit = np.asarray(unit_vectors, dtype=np.float32)
    unit = unit / np.maximum(np.linalg.norm(unit, axis=-1, keepdims=True), 1e-12)
    bias = np.broadcast_to(np.float32(temperature) * np.asarray(biases, dtype=np.float32), unit.shape[:-1])
    return np.concatenate([unit, bias[..., None]], axis=-1).astype(np.float32)


def query_rows(queries: np.ndarray) -> np.ndarray:
    """(n, dim) queries -> (n, dim + 1) float32 [query, 1]: inner products with item_rows are the model scores."""
    queries = np.asarray(queries, dtype=np.float32)
    return np.concatenate([queries, np.ones((*queries.shape[:-1], 1), np.float32)], axis=-1)


@dataclasses.dataclass(frozen=True)
class ScoringRule:
    """The adjustments and how far back each history term reads. Histories are item numbers, oldest first."""

    adjustments: Adjustments = Adjustments()
    cooccurrence_recency: Recency = COOCCURRENCE_RECENCY
    history_vector_recency: Recency = HISTORY_VECTOR_RECENCY
    rejected_weight: float = DEFAULT_REJECTED_WEIGHT  # negative feedback (the module docstring); 0 turns it off
    # How much of their donors' co-occurrence new items borrow (llmrec.cooccurrence.Borrowers); 0 turns it off.
    borrowed_cooccurrence: float = 1.0
    # Added to every new item's score (the module docstring); 0 turns it off.
    new_item_boost: float = 0.0

    @property
    def history_items_read(self) -> int:
        """How many of the most recent catalogued history items the query reads (history vector only: the
        sequence model's window is its own)."""
        return max(self.history_vector_recency.recent_items, 0) if self.adjustments.history_vector_weight else 0

    # --- the query: vectors ------------------------------------------------------------------------------

    def query(self, user_vectors: np.ndarray, history_item_vectors: Sequence[np.ndarray],
              sequence_vectors: np.ndarray | None = None,
              rejected_item_vectors: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """(n, dim) user vectors -> (n, dim) float32 queries. history_item_vectors[r]: user r's catalogued history
        item vectors, oldest first (zero rows for items deleted since); sequence_vectors: (n, dim), needed when
        the sequence weight is set; rejected_item_vectors[r]: the unit vectors of the catalogued items user r
        rejected (any order; None or empty: no rejections)."""
        weights = self.adjustments
        queries = np.array(user_vectors, dtype=np.float32, copy=True)
        if self.rejected_weight and rejected_item_vectors is not None:
            queries -= np.float32(self.rejected_weight) * self.rejected_vectors(rejected_item_vectors,
                                                                                queries.shape[1])
        if weights.history_vector_weight:
            queries += np.float32(weights.history_vector_weight) * self.history_vectors(history_item_vectors,
                                                                                        queries.shape[1])
        if weights.sequence_weight:
            if sequence_vectors is None:
                raise ValueError("a sequence weight needs the sequence model's vectors; this is a bug")
            queries += np.float32(weights.sequence_weight) * np.asarray(sequence_vectors, dtype=np.float32)
        return queries

    def history_vectors(self, history_item_vectors: Sequence[np.ndarray], dimension: int) -> np.ndarray:
        """(n, dim) decayed sums of each history's recent item vectors (llmrec.history_vector), unweighted."""
        recency = self.history_vector_recency
        out = np.zeros((len(history_item_vectors), dimension), np.float32)
        for row, vectors in enumerate(history_item_vectors):
            if len(vectors):
                out[row] = history_vector(vectors, recency.recent_items, recency.decay)
        return out

    @staticmethod
    def rejected_vectors(rejected_item_vectors: Sequence[np.ndarray], dimension: int) -> np.ndarray:
        """(n, dim) the mean of each user's rejected item vectors, unweighted; zero rows for users with none."""
        out = np.zeros((len(rejected_item_vectors), dimension), np.float32)
        for row, vectors in enumerate(rejected_item_vectors):
            if len(vectors):
                out[row] = np.asarray(vectors, dtype=np.float32).mean(axis=0)
        return out

    # --- the adjustments: items ----------------------------------------------------------------------------

    def adjustments_of(self, history: Sequence[int], table: CooccurrenceTable | None,
                       table_history: Sequence[int] | None = None,
                       item_of_table_row: np.ndarray | None = None,
                       borrowers: Borrowers | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(items ascending, values) to add to the model scores of one user.

        Args:
            history: the user's catalogued items, oldest first, in the numbering of the scores.
            table: the co-occurrence table (None: no co-occurrence term).
            table_history: the same history in the table's numbering (default: `history`); items the table
                does not know are left out.
            item_of_table_row: table row -> item number in the scores' numbering, -1 for items gone since
                (default: the same numbering).
            borrowers: items with no row in the table, scored from their donors' rows (scaled by
                borrowed_cooccurrence).
        """
        weights = self.adjustments
        items = np.zeros(0, np.int64)
        values = np.zeros(0, np.float64)
        if weights.history_item_score:
            items = np.unique(np.asarray(history, dtype=np.int64))
            values = np.full(len(items), weights.history_item_score, np.float64)
        if weights.cooccurrence_weight and table is not None:
            recency = self.cooccurrence_recency
            rows, scores = table.scores(history if table_history is None else table_history, recency.recent_items,
                                        recency.decay)
            if borrowers is not None and self.borrowed_cooccurrence:
                lent, borrowed = borrowers.scores(rows, scores)
                items = np.concatenate([items, lent])
                values = np.concatenate([values, weights.cooccurrence_weight * self.borrowed_cooccurrence * borrowed])
            if item_of_table_row is not None:
                rows = item_of_table_row[rows]
                rows, scores = rows[rows >= 0], scores[rows >= 0]
            items = np.concatenate([items, rows.astype(np.int64)])
            values = np.concatenate([values, weights.cooccurrence_weight * scores])
        if not len(items):
            return items, values
        unique, inverse = np.unique(items, return_inverse=True)
        return unique, np.bincount(inverse, weights=values, minlength=len(unique))

    # --- the dense view: every item (evaluation, calibration) -----------------------------------------------

    def dense_scores(self, user_vectors: np.ndarray, rows: np.ndarray, histories: Sequence[Sequence[int]],
                     table: CooccurrenceTable | None, sequence_vectors: np.ndarray | None = None,
                     rejected: Sequence[Sequence[int]] | None = None,
                     borrowers: Borrowers | None = None, new_items: np.ndarray | None = None) -> np.ndarray:
        """(n, num_items) float64 scores of every item in `rows` (item_rows) for n users with these histories
        (item numbers = row numbers) and, when given, these rejected items (the scores of the rejected items
        themselves are left in: callers that serve never return them) and, when given, items borrowing
        co-occurrence (borrowers: rows of `rows` past the table's items) and the new items that get
        new_item_boost (item numbers). Memory is n x num_items: callers score users in chunks."""
        unit = rows[:, :-1]
        queries = self.query(user_vectors, [unit[np.asarray(h, dtype=np.int64)] for h in histories],
                             sequence_vectors,
                             None if rejected is None else [unit[np.asarray(r, dtype=np.int64)] for r in rejected])
        scores = query_rows(queries).astype(np.float64) @ rows.T.astype(np.float64)
        for row, history in enumerate(histories):
            items, values = self.adjustments_of(history, table, borrowers=borrowers)
            scores[row, items] += values
        if self.new_item_boost and new_items is not None:
            scores[:, np.asarray(new_items, dtype=np.int64)] += self.new_item_boost
        return scores

    # --- the top-k view: an index search plus exact re-scoring (the server) ----------------------------------

    def top_k(self, query: np.ndarray, k: int, adjustments: tuple[np.ndarray, np.ndarray],
              search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
              score_items: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
              ) -> tuple[np.ndarray, np.ndarray]:
        """The k best items by model score + adjustment, as (items, scores) best first.

        Lowered items can only leave the index's top k + (lowered items); raised ones are scored exactly and
        join the candidates, so the result is the top k of the whole adjusted catalogue, up to the index's own
        approximation.

        Args:
            query: (dim,) the user's query (ScoringRule.query).
            adjustments: (items ascending, values) from adjustments_of.
            search: (query row, n) -> (items, model scores), the approximate top n best first; exclusions and
                filters apply inside.
            score_items: (items, query row) -> (the items still eligible, their exact model scores).
        """
        query_row = query_rows(query[None, :])[0]
        adjusted_items, values = adjustments
        lowered = int((values < 0).sum())
        found, scores = search(query_row, k + lowered)
        found = np.asarray(found, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float64) + _lookup(adjusted_items, values, found)
        raised = adjusted_items[values > 0]
        if len(raised):
            extra, extra_scores = score_items(raised, query_row)
            extra = np.asarray(extra, dtype=np.int64)
            extra_scores = np.asarray(extra_scores, dtype=np.float64) + _lookup(adjusted_items, values, extra)
            new = ~np.isin(extra, found)
            order = np.argsort(-extra_scores[new], kind="stable")
            found = np.concatenate([found, extra[new][order]])
            scores = np.concatenate([scores, extra_scores[new][order]])
        best = np.argsort(-scores, kind="stable")[:k]  # stable: equal scores keep the index's order
        return found[best], scores[best]


def _lookup(items: np.ndarray, values: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """values of `wanted` items in the sorted (items, values) pairs; 0 for items not there."""
    if not len(items) or not len(wanted):
        return np.zeros(len(wanted), np.float64)
    at = np.minimum(np.searchsorted(items, wanted), len(items) - 1)
    return np.where(items[at] == wanted, values[at], 0.0)


@dataclasses.dataclass
class ScoreTerms:
    """The dense score of a chunk of users split into its terms, so that calibration can try many weights
    without scoring again: scores = model + sum of weight * term (`combine`, checked against dense_scores)."""

    model: np.ndarray  # [user, 1] . rows
    history: np.ndarray  # 1 for history items
    cooccurrence: np.ndarray  # unweighted co-occurrence scores
    history_vector: np.ndarray  # history vector . unit item vector
    sequence: np.ndarray | None  # sequence vector . unit item vector

    @classmethod
    def of(cls, rule: ScoringRule, model: np.ndarray, unit_vectors: np.ndarray, histories: Sequence[Sequence[int]],
           table: CooccurrenceTable | None, sequence_vectors: np.ndarray | None = None) -> ScoreTerms:
        """The terms for n users with these histories (item numbers = rows of unit_vectors).

        Args:
            rule: gives the recencies; its weights are ignored.
            model: (n, num_items) model scores, query_rows(user vectors) @ item_rows (dense_scores' first term).
            unit_vectors: (num_items, dim) unit item vectors (item_rows without the bias column).
        """
        unit = np.asarray(unit_vectors, dtype=np.float64)
        model = np.asarray(model, dtype=np.float64)
        history = np.zeros_like(model)
        cooccurrence = np.zeros_like(model)
        history_only = dataclasses.replace(rule, adjustments=Adjustments(history_item_score=1.0))
        cooccurrence_only = dataclasses.replace(rule, adjustments=Adjustments(cooccurrence_weight=1.0))
        for row, items in enumerate(histories):
            marked, ones = history_only.adjustments_of(items, None)
            history[row, marked] = ones
            if table is not None:
                neighbours, values = cooccurrence_only.adjustments_of(items, table)
                cooccurrence[row, neighbours] = values
        vectors = rule.history_vectors([np.asarray(unit_vectors)[np.asarray(h, dtype=np.int64)] for h in histories],
                                       unit.shape[1])
        sequence = None if sequence_vectors is None else np.asarray(sequence_vectors, np.float64) @ unit.T
        return cls(model, history, cooccurrence, vectors.astype(np.float64) @ unit.T, sequence)

    def combine(self, adjustments: Adjustments) -> np.ndarray:
        """(n, num_items) float64 scores under these weights."""
        scores = self.model + adjustments.history_item_score * self.history
        scores += adjustments.cooccurrence_weight * self.cooccurrence
        scores += adjustments.history_vector_weight * self.history_vector
        if adjustments.sequence_weight:
            if self.sequence is None:
                raise ValueError("a sequence weight needs the sequence model's vectors; this is a bug")
            scores += adjustments.sequence_weight * self.sequence
        return scores
