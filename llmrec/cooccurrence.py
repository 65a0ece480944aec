"""Item co-occurrence: which items people take near each other, as a score added to the text model's.

The text model reads only the few most recent items that fit its token window, and it learns "what goes with
what" only through per-item vectors. Counting which items occur within a few events of each other in the
training sequences is the classic complement (an item-to-item neighbourhood): it remembers co-purchases
exactly and looks further back. A served score is

    model score + history item score (if seen) + cooccurrence_weight * cooccurrence_score(history, item)

with cooccurrence_score = sum over the user's RECENT_ITEMS most recent items h (j = 0 for the latest) of
RECENCY_DECAY**j * log(1 + count(h, item)). The weight is chosen on validation users after training (0 turns
it off). Training evaluation, export evaluation and the server all score through this module (numpy only).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

WINDOW = 3  # events at most this far apart in a sequence co-occur, in both directions
RECENT_ITEMS = 10
RECENCY_DECAY = 0.8
# A new item (no row of its own: nobody took it when the table was counted) borrows the rows of this many trained
# items nearest to it in the index's vector space.
DONORS = 10


@dataclasses.dataclass(frozen=True)
class CooccurrenceTable:
    """A sparse (num_items, num_items) table of log(1 + count) in CSR form: row r's neighbours are
    neighbours[indptr[r]:indptr[r + 1]] with weights in the same slice."""

    indptr: np.ndarray  # int64, num_items + 1
    neighbours: np.ndarray  # int32
    weights: np.ndarray  # float32

    @property
    def num_items(self) -> int:
        return len(self.indptr) - 1

    @classmethod
    def empty(cls, num_items: int) -> CooccurrenceTable:
        return cls(np.zeros(num_items + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))

    @classmethod
    def from_sequences(cls, sequences: Iterable[Sequence[int]], num_items: int, window: int = WINDOW) -> CooccurrenceTable:
        """Count pairs of items at most `window` events apart in each sequence (both orders; no self pairs)."""
        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        for sequence in sequences:
            items = np.asarray(sequence, dtype=np.int64)
            for distance in range(1, window + 1):
                if len(items) > distance:
                    rows += [items[:-distance], items[distance:]]
                    cols += [items[distance:], items[:-distance]]
        if not rows:
            return cls.empty(num_items)
        return cls.from_pairs(np.concatenate(rows), np.concatenate(cols), num_items)

    @classmethod
    def from_pairs(cls, rows: np.ndarray, cols: np.ndarray, num_items: int, counts: np.ndarray | None = None) -> CooccurrenceTable:
        """The table of (row, col) pairs, each counted once (or `counts` times); self pairs are dropped."""
        counts = np.ones(len(rows), np.float64) if counts is None else np.asarray(counts, np.float64)
        keep = rows != cols
        keys = rows[keep].astype(np.int64) * num_items + cols[keep]
        unique, inverse = np.unique(keys, return_inverse=True)
        totals = np.bincount(inverse, weights=counts[keep], minlength=len(unique))
        unique_rows = unique // num_items
        indptr = np.zeros(num_items + 1, np.int64)
        np.cumsum(np.bincount(unique_rows, minlength=num_items), out=indptr[1:])
        return cls(indptr, (unique % num_items).astype(np.int32), np.log1p(totals).astype(np.float32))

    def counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, cols, counts): the table as pairs, to rebuild it over another item numbering."""
        rows = np.repeat(np.arange(self.num_items), np.diff(self.indptr))
        return rows, self.neighbours.astype(np.int64), np.rint(np.expm1(self.weights.astype(np.float64)))

    def renumber(self, new_row: np.ndarray, num_new_items: int) -> CooccurrenceTable:
        """The table over another numbering: new_row[old item] = its new number, or -1 to drop the item."""
        rows, cols, counts = self.counts()
        rows, cols = new_row[rows], new_row[cols]
        keep = (rows >= 0) & (cols >= 0)
        return CooccurrenceTable.from_pairs(rows[keep], cols[keep], num_new_items, counts[keep])

    def scores(self, history: Sequence[int], recent_items: int = RECENT_ITEMS,
               recency_decay: float = RECENCY_DECAY) -> tuple[np.ndarray, np.ndarray]:
        """(items, scores) with score > 0 for a history of item numbers, oldest first (see the module doc)."""
        recent = list(history)[-recent_items:][::-1] if recent_items > 0 else []
        if not recent:
            return np.zeros(0, np.int64), np.zeros(0, np.float64)
        items = [self.neighbours[self.indptr[h] : self.indptr[h + 1]] for h in recent]
        values = [recency_decay**j * self.weights[self.indptr[h] : self.indptr[h + 1]] for j, h in enumerate(recent)]
        items_flat = np.concatenate(items).astype(np.int64)
        unique, inverse = np.unique(items_flat, return_inverse=True)
        return unique, np.bincount(inverse, weights=np.concatenate(values).astype(np.float64), minlength=len(unique))

    def has_row(self) -> np.ndarray:
        """(num_items,) bool: the items with at least one co-occurring item (those a new item can borrow from)."""
        return np.diff(self.indptr) > 0

    def save(self, path: Path) -> None:
        with Path(path).open("wb") as handle:
            np.savez(handle, indptr=self.indptr, neighbours=self.neighbours, weights=self.weights)

    @classmethod
    def load(cls, path: Path) -> CooccurrenceTable:
        with np.load(path) as data:
            table = cls(data["indptr"].astype(np.int64), data["neighbours"].astype(np.int32),
                        data["weights"].astype(np.float32))
        if len(table.neighbours) != len(table.weights) or table.indptr[-1] != len(table.neighbours):
            raise ValueError(f"{path}: inconsistent co-occurrence table")
        return table


@dataclasses.dataclass(frozen=True)
class Borrowers:
    """Items with no row in the table, each scored as if it were its donors: the items nearest to it in the
    index's vector space that have rows. A new item's co-occurrence score is

        sum over its donors d of weight(d) * cooccurrence_score(history, d),   weight(d) = max(cosine, 0) / DONORS

    so an item just like items the user's history goes with scores about as they do, and an unlike one near 0.
    Without it a new item has no co-occurrence score at all and loses to every item that has one, whatever its
    text says (docs/model.md, "Cold items")."""

    items: np.ndarray  # (n,) int64 item numbers in the scores' numbering
    donors: np.ndarray  # (n, DONORS) int64 table rows
    weights: np.ndarray  # (n, DONORS) float32

    @classmethod
    def none(cls) -> Borrowers:
        return cls(np.zeros(0, np.int64), np.zeros((0, DONORS), np.int64), np.zeros((0, DONORS), np.float32))

    @functools.cached_property
    def by_donor(self) -> tuple[np.ndarray, np.ndarray]:
        """(flat (borrower, donor) positions ordered by donor row, those donor rows): who borrows from a row."""
        flat = self.donors.ravel()
        order = np.argsort(flat, kind="stable")
        return order, flat[order]

    def scores(self, rows: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(items, borrowed scores > 0) given the table's scores (rows ascending, values) of one history. Work
        grows with the borrowers of the rows that scored, not with all borrowers: a request stays cheap however
        many new items the catalogue holds."""
        if not len(self.items) or not len(rows):
            return np.zeros(0, np.int64), np.zeros(0, np.float64)
        order, donor_rows = self.by_donor
        starts = np.searchsorted(donor_rows, rows, side="left")
        counts = np.searchsorted(donor_rows, rows, side="right") - starts
        total = int(counts.sum())
        if not total:
            return np.zeros(0, np.int64), np.zeros(0, np.float64)
        offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        entries = order[np.repeat(starts, counts) + offsets]
        contributions = self.weights.ravel()[entries].astype(np.float64) * np.repeat(values, counts)
        borrowed = np.bincount(entries // self.donors.shape[1], weights=contributions, minlength=len(self.items))
        lent = np.flatnonzero(borrowed > 0)
        return self.items[lent], borrowed[lent]


def nearest_donors(unit_vectors: np.ndarray, donor_vectors: np.ndarray, is_donor: np.ndarray,
                   donors: int = DONORS, chunk_rows: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """For each of n unit vectors, the `donors` rows of donor_vectors (unit vectors; rows where is_donor is false
    are skipped) with the highest cosine: ((n, donors) int64 rows, (n, donors) float32 weights, max(cos, 0) /
    donors). donor_vectors may be a memory map: it is read chunk_rows rows at a time. Ties go to the lower row, so
    every replica that applies the same change finds the same donors."""
    queries = np.asarray(unit_vectors, dtype=np.float32)
    best_rows = np.zeros((len(queries), 0), np.int64)
    best_scores = np.zeros((len(queries), 0), np.float32)
    for start in range(0, len(donor_vectors), chunk_rows):
        block = np.asarray(donor_vectors[start : start + chunk_rows], dtype=np.float32)
        scores = queries @ block.T
        scores[:, ~is_donor[start : start + len(block)]] = -np.inf
        rows = np.broadcast_to(np.arange(start, start + len(block), dtype=np.int64), scores.shape)
        best_rows = np.concatenate([best_rows, rows], axis=1)
        best_scores = np.concatenate([best_scores, scores], axis=1)
        order = np.argsort(-best_scores, axis=1, kind="stable")[:, :donors]
        best_rows = np.take_along_axis(best_rows, order, axis=1)
        best_scores = np.take_along_axis(best_scores, order, axis=1)
    if best_rows.shape[1] < donors:  # fewer donor rows than donors: pad with weight 0
        missing = donors - best_rows.shape[1]
        best_rows = np.pad(best_rows, ((0, 0), (0, missing)))
        best_scores = np.pad(best_scores, ((0, 0), (0, missing)), constant_values=-np.inf)
    weights = np.where(np.isfinite(best_scores), np.maximum(best_scores, 0.0), 0.0) / donors
    return best_rows, weights.astype(np.float32)
