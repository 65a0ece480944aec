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
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

WINDOW = 3  # events at most this far apart in a sequence co-occur, in both directions
RECENT_ITEMS = 10
RECENCY_DECAY = 0.8


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
