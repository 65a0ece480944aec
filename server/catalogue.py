"""The live catalogue: the bundle's items plus catalogue changes, and the HNSW index over all of them.

Rows and labels: hnswlib labels are rows of `_vectors` (each row [unit item vector, bias], as in the bundle).
A deleted item's label is tombstoned with mark_deleted (searches skip it) and handed to the next new item,
which re-adds the label with its own vector (hnswlib unmarks and updates it in place), so churn does not grow
the index. A new item with no free label gets the next row; the index is resized (doubled) when full.

Concurrency: hnswlib must never add and query at once. Index reads hold the read side of a readers-writer lock;
every change runs on the one writer thread, which commits it to the change store (durable before anything else
happens, see server.store), then it is applied under the write side in chunks of WRITE_CHUNK items, so a reader
waits for at most one chunk. Writers are preferred: a waiting writer holds back new readers. A change is
acknowledged only after it is applied, so the next search sees it. Changes are applied by one thread at a time,
in sequence order: the writer thread with the local store, the follower thread with a shared one.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import dataclasses
import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from llmrec.cooccurrence import Borrowers, CooccurrenceTable, nearest_donors
from llmrec.scoring import ScoringRule, item_rows
from llmrec.template import ItemFields

from llmrec.server import metrics, tracing
from llmrec.server.bundle import LoadedBundle
from llmrec.server.domain import AttributeFilter, CatalogueItem, HistoryRef, ScoredItem, WriteResult
from llmrec.server.errors import (
    REASON_VERSION_SUPERSEDED, FailedPrecondition, InvalidArgument, Unavailable, unknown_items,
)
from llmrec.server.state import Delete, Upsert
from llmrec.server.store import ChangeStore, VersionSuperseded

logger = logging.getLogger(__name__)

CATEGORY_KEY = "category"
# A filter that leaves at most this many candidates is answered by an exact scan of just those rows: exact,
# and faster than an HNSW walk that rejects almost every node it visits.
EXACT_SEARCH_MAX_CANDIDATES = 2048
WRITE_CHUNK = 64
SUPERSEDED_RETRY_S = 0.5  # RetryInfo on a change to a version a rollout made read-only (another replica serves on)
_PAGE_TOKEN_PREFIX = "after:"
_BARE_MODEL = ScoringRule()


def normalize_attribute(text: str) -> str:
    """How attribute keys and values are compared: whitespace collapsed, casefolded."""
    return " ".join(text.split()).casefold()


class ReadWriteLock:
    """Many readers or one writer; a waiting writer holds back new readers. Not reentrant."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._condition:
            while self._writing or self._writers_waiting:
                self._condition.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                if not self._readers:
                    self._condition.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._condition:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers:
                    self._condition.wait()
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._condition:
                self._writing = False
                self._condition.notify_all()


@dataclasses.dataclass(frozen=True, eq=False)
class ResolvedItem:
    """A history entry resolved against the catalogue.

    Attributes:
        item_id: the catalogue id; None for an item given as text.
        fields: the text the model reads.
        vector: the catalogue item's unit vector (its index row without the bias); None for text items.
    """

    item_id: str | None
    fields: ItemFields
    vector: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class CatalogueChanges:
    """A catalogue's difference from its bundle at one revision.

    Attributes:
        items: item id -> the upserted item, or None where a bundle item was deleted.
        live: the ids of every live item (bundle and upserted).
        revision: the catalogue revision this is as of.
    """

    items: dict[str, CatalogueItem | None]
    live: frozenset[str]
    revision: int


class Catalogue:
    """Items, vectors and the HNSW index of one served bundle, with durable changes on top.

    Args:
        bundle: the loaded bundle; its index is taken over (and changed) by this catalogue.
        use_cold_start_map: build new items' rows with the bundle's cold-start map, if it has one.
        new_item_cooccurrence: how much co-occurrence new items borrow (llmrec.scoring.ScoringRule's
            borrowed_cooccurrence, which the recommender takes from here); 0: none, and no donors are searched.
    """

    def __init__(self, bundle: LoadedBundle, use_cold_start_map: bool = True,
                 new_item_cooccurrence: float = 1.0) -> None:
        manifest = bundle.manifest
        self.bundle_version = manifest.bundle_version
        self.dimension = manifest.dimension
        self.new_item_bias = float(manifest.new_item_bias)
        self.cold_start = bundle.cold_start if use_cold_start_map else None
        self.new_item_cooccurrence = new_item_cooccurrence
        self._index = bundle.index
        count = len(bundle.item_ids)
        # In memory (not the bundle's memory map): rows change in place when labels are reused.
        self._vectors = np.array(bundle.vectors, dtype=np.float32)
        self._items: list[CatalogueItem | None] = [
            CatalogueItem(item_id, fields) for item_id, fields in zip(bundle.item_ids, bundle.items)
        ]
        self._live = np.ones(count, dtype=bool)
        self._label_of: dict[str, int] = dict(bundle.row_of)
        self._bundle_row_of = bundle.row_of
        # Bundle row -> the label its item holds now (-1 once deleted): bundle-row data (co-occurrence) finds
        # live items without a dictionary lookup per item.
        self._label_of_bundle_row = np.arange(count, dtype=np.int64)
        self._free: list[int] = []
        self._size = count  # labels in use or tombstoned: 0.._size-1
        self._new_labels: set[int] = set()  # labels of upserted items: the new items a list may reserve slots for
        # Upserted items the co-occurrence table has no row for borrow their nearest trained items' rows
        # (llmrec.cooccurrence.Borrowers): label -> (donor bundle rows, weights), found when the item is applied,
        # unless they borrow nothing (new_item_cooccurrence 0).
        self._bundle_vectors = bundle.vectors  # the bundle's own rows (a memory map): donors never change
        self._is_donor = bundle.cooccurrence.has_row()
        self._donors: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._borrowers: Borrowers | None = Borrowers.none()  # None: to be rebuilt from _donors
        self._borrowers_rebuild = threading.Lock()  # concurrent readers after a change rebuild it once
        self._postings: dict[tuple[str, str], set[int]] = {}
        for label, item in enumerate(self._items):
            self._post(label, item, add=True)
        self._sorted_ids = sorted(self._label_of)
        # What differs from the bundle, for snapshots: id -> (item, row) for upserts, (None, None) for deletes.
        self._changes: dict[str, tuple[CatalogueItem | None, np.ndarray | None]] = {}
        self.revision = 0  # sequence number of the last applied change (0: none since the state began)
        self._lock = ReadWriteLock()
        self._store: ChangeStore | None = None
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmrec-catalogue")

    # --- durable state -------------------------------------------------------------------------------

    def open_store(self, store: ChangeStore) -> int:
        """Replay the store into the catalogue (which it keeps up to date) and commit later changes there.

        Blocking; call before serving. Returns the number of changes replayed.
        """
        replayed = store.open(self)
        self._store = store
        return replayed

    def close(self) -> None:
        """Finish pending writes, then close the store (the local one writes a last snapshot)."""
        self._writer.shutdown(wait=True)
        if self._store is not None:
            self._store.close()
            self._store = None

    # --- reads ----------------------------------------------------------------------------------------

    @property
    def count(self) -> int:
        return len(self._label_of)

    @property
    def index_version(self) -> str:
        """`<bundle_version>:<item_count>`, plus `:r<revision>` once the catalogue has changed."""
        version = f"{self.bundle_version}:{self.count}"
        return f"{version}:r{self.revision}" if self.revision else version

    def get(self, item_id: str, include_vector: bool = False) -> tuple[CatalogueItem, np.ndarray | None]:
        """The item and, if asked, its index row. Raises NotFound."""
        with self._lock.read():
            label = self._label_of.get(item_id)
            if label is None:
                raise unknown_items([item_id], "not in the catalogue")
            item = self._items[label]
            assert item is not None
            return item, (self._vectors[label].copy() if include_vector else None)

    def item_of(self, item_id: str) -> CatalogueItem | None:
        """The live item with this id, or None."""
        with self._lock.read():
            label = self._label_of.get(item_id)
            return None if label is None else self._items[label]

    def find(self, item_ids: Iterable[str]) -> dict[str, ResolvedItem]:
        """The live items among item_ids, with their unit vectors; ids not in the catalogue are left out."""
        found: dict[str, ResolvedItem] = {}
        with self._lock.read():
            for item_id in item_ids:
                label = self._label_of.get(item_id)
                if label is not None:
                    item = self._items[label]
                    assert item is not None
                    found[item_id] = ResolvedItem(item_id, item.fields, self._vectors[label, : self.dimension].copy())
        return found

    def texts_of(self, item_ids: Sequence[str]) -> list[tuple[ItemFields, bool] | None]:
        """Each item's text and whether it is new (upserted): what the ranking stage reads; None for an item
        gone since (deleted after it was found)."""
        out: list[tuple[ItemFields, bool] | None] = []
        with self._lock.read():
            for item_id in item_ids:
                label = self._label_of.get(item_id)
                item = None if label is None else self._items[label]
                out.append(None if item is None else (item.fields, label in self._new_labels))
        return out

    def resolve(self, history: Iterable[HistoryRef], vectors_from: int | None = None) -> list[ResolvedItem]:
        """History refs -> ResolvedItem, in order; catalogue vectors for entries at positions >= vectors_from.

        Raises:
            NotFound: some ids are not in the catalogue (the message names up to five of them).
        """
        refs = list(history)
        start = len(refs) if vectors_from is None else max(vectors_from, 0)
        resolved: list[ResolvedItem] = []
        unknown: list[str] = []
        with self._lock.read():
            for position, ref in enumerate(refs):
                if ref.text is not None:
                    resolved.append(ResolvedItem(None, ref.text))
                    continue
                label = self._label_of.get(ref.item_id or "")
                if label is None:
                    unknown.append(ref.item_id or "")
                    continue
                item = self._items[label]
                assert item is not None
                vector = self._vectors[label, : self.dimension].copy() if position >= start else None
                resolved.append(ResolvedItem(item.item_id, item.fields, vector))
        if unknown:  # ids are echoed cut to errors.SHOWN_ID_CHARS: a long one must not outgrow the status
            raise unknown_items(unknown, f"not in the catalogue of model {self.bundle_version}")
        return resolved

    def unit_vectors(self, item_ids: Sequence[str]) -> np.ndarray:
        """(len(item_ids), dimension) item vectors without the bias; zeros for ids no longer in the catalogue."""
        out = np.zeros((len(item_ids), self.dimension), dtype=np.float32)
        with self._lock.read():
            for row, item_id in enumerate(item_ids):
                label = self._label_of.get(item_id)
                if label is not None:
                    out[row] = self._vectors[label, : self.dimension]
        return out

    def list_page(self, page_size: int, page_token: str) -> tuple[list[CatalogueItem], str, int]:
        """One page in ascending id order: (items, next_page_token or "", live count)."""
        after = _decode_page_token(page_token)
        with self._lock.read():
            start = bisect.bisect_right(self._sorted_ids, after) if after is not None else 0
            ids = self._sorted_ids[start : start + page_size]
            items = [self._items[self._label_of[i]] for i in ids]
            more = start + page_size < len(self._sorted_ids)
            total = len(self._sorted_ids)
        next_token = _encode_page_token(ids[-1]) if more and ids else ""
        return [i for i in items if i is not None], next_token, total

    def search(
        self, user_vector: np.ndarray, k: int, exclude_ids: Iterable[str] = (),
        filters: Sequence[AttributeFilter] = (),
    ) -> list[ScoredItem]:
        """Top-k live items by [user_vector, 1] . row alone (no adjustments); see top_k."""
        return self.top_k(_BARE_MODEL, np.asarray(user_vector, dtype=np.float32), k, (), None, exclude_ids, filters)

    def top_k(
        self, rule: ScoringRule, query: np.ndarray, k: int, history_ids: Sequence[str],
        cooccurrence: CooccurrenceTable | None, exclude_ids: Iterable[str] = (),
        filters: Sequence[AttributeFilter] = (), new_item_slots: int = 0,
    ) -> list[ScoredItem]:
        """The k best live items for a query under the scoring rule's top-k view (llmrec.scoring), exclusions
        and filters applied inside the search.

        Args:
            rule: the scoring rule (its adjustments read the history and the co-occurrence table).
            query: (dim,) the user's query, ScoringRule.query.
            history_ids: the user's catalogued history, oldest first.
            cooccurrence: the bundle's table, over bundle rows.
            new_item_slots: at least this many of the k go to new (upserted) items, the best-scoring ones, when
                that many pass the exclusions and filters: they replace the lowest-scoring other items. The list
                stays in score order. New items' scores include the rule's new_item_boost.

        Fewer than k come back only when exclusions and filters leave fewer than k items.
        """
        with self._lock.read():
            excluded = {self._label_of[i] for i in exclude_ids if i in self._label_of}
            candidates = self._candidates(filters) - excluded if filters else None
            history = [self._label_of[i] for i in history_ids if i in self._label_of]
            table_history = [self._bundle_row_of[i] for i in history_ids if i in self._bundle_row_of]
            adjustments = rule.adjustments_of(history, cooccurrence, table_history, self._label_of_bundle_row,
                                              self._borrowers_now())
            query = np.asarray(query, dtype=np.float32)
            labels, scores = rule.top_k(
                query, k, adjustments,
                search=lambda row, n: self._search(row, n, excluded, candidates),
                score_items=lambda items, row: self._score(items, row, excluded, candidates))
            new: set[int] = set()  # the new items this list may hold, when the rule or the slots favour them
            if self._new_labels and (rule.new_item_boost or new_item_slots):
                new = self._new_labels - excluded if candidates is None else (self._new_labels & candidates) - excluded
            if rule.new_item_boost and new:
                labels, scores = self._with_boosted_new_items(rule, query, k, adjustments, labels, scores, new,
                                                              excluded)
            missing = min(new_item_slots, k) - sum(int(label) in self._new_labels for label in labels)
            if missing > 0 and new:
                labels, scores = self._with_new_items(rule, query, k, missing, adjustments, labels, scores, new,
                                                      excluded)
            items = [self._items[label] for label in labels]
        return [
            ScoredItem(item_id=item.item_id, score=float(score), title=item.fields.title, rank=rank)
            for rank, (item, score) in enumerate(zip(items, scores), 1)
            if item is not None
        ]

    def _best_new(self, rule: ScoringRule, query: np.ndarray, n: int, adjustments: tuple[np.ndarray, np.ndarray],
                  new: set[int], excluded: set[int]) -> tuple[np.ndarray, np.ndarray]:
        """The n best of these new labels under the rule, their scores with its new_item_boost (hold the read
        lock)."""
        found, found_scores = rule.top_k(
            query, n, adjustments,
            search=lambda row, m: self._search(row, m, excluded, new),  # exact up to EXACT_SEARCH_MAX_CANDIDATES
            score_items=lambda items, row: self._score(items, row, excluded, new))
        return np.asarray(found, np.int64), np.asarray(found_scores, np.float64) + rule.new_item_boost

    def _with_boosted_new_items(self, rule: ScoringRule, query: np.ndarray, k: int,
                                adjustments: tuple[np.ndarray, np.ndarray], labels: np.ndarray, scores: np.ndarray,
                                new: set[int], excluded: set[int]) -> tuple[np.ndarray, np.ndarray]:
        """The top k once every eligible new item's score has the rule's new_item_boost: the list's own new
        items raised, the best new items beyond it merged in (hold the read lock)."""
        labels, scores = np.asarray(labels, np.int64), np.asarray(scores, np.float64)
        listed = labels.tolist()
        scores = scores + rule.new_item_boost * np.array([label in new for label in listed], dtype=bool)
        outside = new.difference(listed)
        if not outside:
            order = np.argsort(-scores, kind="stable")
            return labels[order], scores[order]
        found, found_scores = self._best_new(rule, query, k, adjustments, outside, excluded)
        merged = np.concatenate([labels, found])
        merged_scores = np.concatenate([scores, found_scores])
        order = np.argsort(-merged_scores, kind="stable")[:k]
        return merged[order], merged_scores[order]

    def _with_new_items(self, rule: ScoringRule, query: np.ndarray, k: int, missing: int,
                        adjustments: tuple[np.ndarray, np.ndarray], labels: np.ndarray, scores: np.ndarray,
                        new: set[int], excluded: set[int]) -> tuple[np.ndarray, np.ndarray]:
        """The ranking with up to `missing` of the best eligible new items not in it added, the lowest-scoring
        other items giving way when the list is full, re-sorted by score (hold the read lock)."""
        labels, scores = np.asarray(labels, np.int64), np.asarray(scores, np.float64)
        new = new - set(labels.tolist())
        if not new:
            return labels, scores
        found, found_scores = self._best_new(rule, query, missing, adjustments, new, excluded)
        others = np.flatnonzero([label not in self._new_labels for label in labels.tolist()])
        give_way = min(max(len(found) - (k - len(labels)), 0), len(others))
        kept = np.delete(np.arange(len(labels)), others[len(others) - give_way:])
        merged = np.concatenate([labels[kept], found])
        merged_scores = np.concatenate([scores[kept], found_scores])
        order = np.argsort(-merged_scores, kind="stable")[:k]
        return merged[order], merged_scores[order]

    def _search(self, query: np.ndarray, k: int, excluded: set[int],
                candidates: set[int] | None) -> tuple[list[int], list[float]]:
        """The approximate top k live labels for a query row (hold the read lock)."""
        with tracing.span(tracing.INDEX, {"llmrec.k": k}), metrics.INDEX_SECONDS.time():
            if candidates is not None:
                k = min(k, len(candidates))
                if k <= 0:
                    return [], []
                if len(candidates) <= EXACT_SEARCH_MAX_CANDIDATES:
                    return self._exact(query, k, candidates=candidates)
                return self._approximate(query, k, candidates.__contains__, candidates=candidates)
            k = min(k, self.count - len(excluded))
            if k <= 0:
                return [], []
            allowed = (lambda label: label not in excluded) if excluded else None
            return self._approximate(query, k, allowed, excluded=excluded)

    def _score(self, labels: np.ndarray, query: np.ndarray, excluded: set[int],
               candidates: set[int] | None) -> tuple[np.ndarray, np.ndarray]:
        """(the live, allowed labels among `labels`, their exact scores) for a query row (hold the read lock).
        Vectorised: a history's co-occurring items can number in the thousands."""
        labels = np.asarray(labels, dtype=np.int64)
        keep = (labels >= 0) & (labels < self._size)
        keep[keep] = self._live[labels[keep]]
        if excluded:
            keep &= ~np.isin(labels, np.fromiter(excluded, np.int64, len(excluded)))
        if candidates is not None:
            keep &= np.isin(labels, np.fromiter(candidates, np.int64, len(candidates)))
        labels = labels[keep]
        return labels, self._vectors[labels] @ query

    def _candidates(self, filters: Sequence[AttributeFilter]) -> set[int]:
        """Live labels that pass every filter (each: any of its values)."""
        result: set[int] | None = None
        for attribute_filter in filters:
            key = normalize_attribute(attribute_filter.key)
            matching: set[int] = set()
            for value in attribute_filter.values:
                matching |= self._postings.get((key, normalize_attribute(value)), set())
            result = matching if result is None else result & matching
            if not result:
                return set()
        return result or set()

    def _approximate(self, query: np.ndarray, k: int, allowed, *, candidates: set[int] | None = None,
                     excluded: set[int] | None = None) -> tuple[list[int], list[float]]:
        try:
            labels, distances = self._index.knn_query(query[None, :], k=k, num_threads=1, filter=allowed)
            return labels[0].tolist(), (1.0 - distances[0]).tolist()  # hnswlib "ip" distance is 1 - inner product
        except RuntimeError:
            # hnswlib raises when the walk finds fewer than k allowed items (heavy filtering, many
            # tombstones): an exact scan is slower but always complete.
            logger.warning("HNSW search returned fewer than %d items; falling back to exact search", k)
            return self._exact(query, k, candidates=candidates, excluded=excluded)

    def _exact(self, query: np.ndarray, k: int, *, candidates: set[int] | None = None,
               excluded: set[int] | None = None) -> tuple[list[int], list[float]]:
        if candidates is not None:
            labels = np.fromiter(candidates, dtype=np.int64, count=len(candidates))
            scores = self._vectors[labels] @ query
        else:
            labels = np.arange(self._size)
            scores = self._vectors[: self._size] @ query
            scores[~self._live[: self._size]] = -np.inf
            if excluded:
                scores[list(excluded)] = -np.inf
        k = min(k, len(labels))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return labels[top].tolist(), scores[top].tolist()

    # --- carrying changes over to another bundle (server.models) ----------------------------------------

    async def changes(self) -> CatalogueChanges:
        """Every change made on top of the bundle, as of now: read on the writer thread, so after every write
        queued before this call and consistent with the revision."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer, self._changes_now)

    def _changes_now(self) -> CatalogueChanges:
        with self._lock.read():  # a shared store's follower thread may be applying a change
            return CatalogueChanges({item_id: item for item_id, (item, _) in self._changes.items()},
                                    frozenset(self._label_of), self.revision)

    def upserted_ids(self) -> list[str]:
        """Ids of the live items that UpsertItems added or replaced (as opposed to the bundle's own)."""
        with self._lock.read():
            return [item_id for item_id, (item, _) in self._changes.items() if item is not None]

    # --- writes ---------------------------------------------------------------------------------------

    def row_for(self, text_vector: np.ndarray) -> np.ndarray:
        """The index row of a new or changed item from its text vector: with the bundle's cold-start map,
        [normalize(text + predicted id vector), predicted bias column], as training serves items it never
        trained on; without one, [normalized text vector, new_item_bias]."""
        text = np.asarray(text_vector, dtype=np.float32)
        text = text / max(float(np.linalg.norm(text)), 1e-12)
        if self.cold_start is None:
            return item_rows(text, np.float32(self.new_item_bias), 1.0)  # the bias column as it is
        id_vectors, biases = self.cold_start.predict(text[None, :])
        return item_rows(text + id_vectors[0], biases[0], 1.0)

    def check_writable(self) -> None:
        """Raise the error a change would get now: FailedPrecondition without state, Unavailable once broken."""
        if self._store is None:
            raise FailedPrecondition(
                "catalogue changes need durable state: start the server with --state-dir DIR (LLMREC_STATE_DIR) or "
                "--catalogue-store postgres"
            )
        refusal = self._store.refusal()
        if refusal is not None:
            raise Unavailable(refusal)

    async def upsert(self, items: Sequence[CatalogueItem], rows: np.ndarray) -> WriteResult:
        """Journal, then apply, new and changed items."""
        return await self._run_write(self._upsert_sync, list(items), np.asarray(rows, dtype=np.float32))

    async def delete(self, item_ids: Sequence[str], allow_missing: bool) -> WriteResult:
        """Journal, then apply, deletions.

        Raises:
            NotFound: an id is not in the catalogue and allow_missing is false (nothing is deleted).
        """
        return await self._run_write(self._delete_sync, list(item_ids), allow_missing)

    async def _run_write(self, function, *args) -> WriteResult:
        self.check_writable()
        loop = asyncio.get_running_loop()
        # Shielded: a caller that goes away must not leave a journaled change unapplied.
        return await asyncio.shield(loop.run_in_executor(self._writer, function, *args))

    def _upsert_sync(self, items: list[CatalogueItem], rows: np.ndarray) -> WriteResult:
        # as this replica sees it: with a shared store another replica's change may land in between
        replaced = sum(item.item_id in self._label_of for item in items)
        self._commit(Upsert([dataclasses.replace(i, upserted=True) for i in items], rows))
        return WriteResult(created=len(items) - replaced, replaced=replaced, item_count=self.count,
                           index_version=self.index_version)

    def _delete_sync(self, item_ids: list[str], allow_missing: bool) -> WriteResult:
        present = list(dict.fromkeys(i for i in item_ids if i in self._label_of))
        missing = [i for i in item_ids if i not in self._label_of]
        if missing and not allow_missing:
            raise unknown_items(missing, "not in the catalogue (nothing was deleted; set allow_missing to skip "
                                         "unknown ids)")
        # A shared store's other replicas (or a newer bundle version's) may hold ids this replica has not seen
        # yet: the delete is committed for them too, never acknowledged as a no-op here.
        deleting = list(dict.fromkeys(item_ids)) if self._store is not None and self._store.shared else present
        if deleting:
            self._commit(Delete(deleting))
        return WriteResult(deleted=len(present), item_count=self.count, index_version=self.index_version)

    def _commit(self, operation: Upsert | Delete) -> None:
        """Writer thread only: make the change durable, then wait until it is visible (the store applies it)."""
        self.check_writable()
        assert self._store is not None
        try:
            self._store.commit(operation)
        except VersionSuperseded as error:  # another replica already serves the newer version: retry there
            raise Unavailable(str(error), reason=REASON_VERSION_SUPERSEDED, retry_after_s=SUPERSEDED_RETRY_S,
                              metadata={"successor_model_version": error.successor}) from None
        except OSError as error:
            logger.error("catalogue change not acknowledged: %s", error)
            raise Unavailable(f"the catalogue change was not acknowledged: {error}") from None

    def apply_change(self, sequence: int, operation: Upsert | Delete) -> None:
        """Apply one stored change (server.store.Replica): one thread at a time, in sequence order."""
        self._apply(operation)
        self.revision = sequence

    def _apply(self, operation: Upsert | Delete) -> None:
        if isinstance(operation, Upsert):
            for start in range(0, len(operation.items), WRITE_CHUNK):
                items = operation.items[start : start + WRITE_CHUNK]
                rows = operation.rows[start : start + len(items)]
                donors = self._find_donors(items, rows)  # outside the lock: reads only the bundle's rows
                with self._lock.write():
                    for offset, item in enumerate(items):
                        self._upsert_one(item, rows[offset], donors.get(offset))
        else:
            for start in range(0, len(operation.item_ids), WRITE_CHUNK):
                with self._lock.write():
                    for item_id in operation.item_ids[start : start + WRITE_CHUNK]:
                        self._delete_one(item_id)

    def _find_donors(self, items: Sequence[CatalogueItem], rows: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """{position: (donor bundle rows, weights)} for the items the co-occurrence table has no row for."""
        if not self.new_item_cooccurrence:  # borrowing is off: the search would be wasted on every replica
            return {}
        borrowing = [n for n, item in enumerate(items) if item.item_id not in self._bundle_row_of]
        if not borrowing or not self._is_donor.any():
            return {}
        donors, weights = nearest_donors(rows[borrowing, :-1], self._bundle_vectors[:, :-1], self._is_donor)
        return {n: (donors[i], weights[i]) for i, n in enumerate(borrowing)}

    def _borrowers_now(self) -> Borrowers:
        """The Borrowers of the live new items (hold the read lock): rebuilt by the first request after a change
        (replaying many changes at start-up rebuilds nothing), with its inverse index, once."""
        borrowers = self._borrowers
        if borrowers is not None:
            return borrowers
        with self._borrowers_rebuild:
            if self._borrowers is None:
                labels = np.fromiter(self._donors, np.int64, len(self._donors))
                if not len(labels):
                    self._borrowers = Borrowers.none()
                else:
                    built = Borrowers(labels, np.stack([self._donors[int(n)][0] for n in labels]),
                                      np.stack([self._donors[int(n)][1] for n in labels]))
                    built.by_donor  # noqa: B018 - its inverse index, built here once, not per request
                    self._borrowers = built
            return self._borrowers

    def _upsert_one(self, item: CatalogueItem, row: np.ndarray,
                    donors: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        label = self._label_of.get(item.item_id)
        if label is not None:
            self._post(label, self._items[label], add=False)
        elif self._free:
            label = self._free.pop()
            # Unmarked first: an index built with allow_replace_deleted refuses to update a tombstone.
            self._index.unmark_deleted(label)
        else:
            label = self._next_label()
        # A new label is added; an existing (or just unmarked) one is updated in place.
        self._index.add_items(row[None, :], np.asarray([label]), num_threads=1)
        self._vectors[label] = row
        self._items[label] = item
        self._live[label] = True
        self._new_labels.add(label)
        if item.item_id not in self._label_of:
            bisect.insort(self._sorted_ids, item.item_id)
        self._label_of[item.item_id] = label
        if item.item_id in self._bundle_row_of:
            self._label_of_bundle_row[self._bundle_row_of[item.item_id]] = label
        self._post(label, item, add=True)
        self._changes[item.item_id] = (item, row.copy())
        if donors is not None:
            self._donors[label] = donors
        else:
            self._donors.pop(label, None)
        self._borrowers = None

    def _delete_one(self, item_id: str) -> None:
        label = self._label_of.pop(item_id, None)
        if label is None:
            return
        self._index.mark_deleted(label)
        if item_id in self._bundle_row_of:
            self._label_of_bundle_row[self._bundle_row_of[item_id]] = -1
        self._post(label, self._items[label], add=False)
        self._items[label] = None
        self._live[label] = False
        self._new_labels.discard(label)
        if self._donors.pop(label, None) is not None:
            self._borrowers = None
        self._free.append(label)
        position = bisect.bisect_left(self._sorted_ids, item_id)
        if position < len(self._sorted_ids) and self._sorted_ids[position] == item_id:
            del self._sorted_ids[position]
        if item_id in self._bundle_row_of:
            self._changes[item_id] = (None, None)
        else:
            self._changes.pop(item_id, None)

    def _next_label(self) -> int:
        label = self._size
        capacity = self._index.get_max_elements()
        if label >= capacity:
            new_capacity = max(2 * capacity, label + 1, 16)
            self._index.resize_index(new_capacity)
            logger.info("catalogue index resized to %d items", new_capacity)
        if label >= len(self._vectors):
            grown = np.zeros((max(2 * len(self._vectors), label + 1, 16), self._vectors.shape[1]), np.float32)
            grown[: len(self._vectors)] = self._vectors
            self._vectors = grown
            live = np.zeros(len(grown), dtype=bool)
            live[: len(self._live)] = self._live
            self._live = live
            self._items.extend([None] * (len(grown) - len(self._items)))
        self._size = label + 1
        return label

    def _post(self, label: int, item: CatalogueItem | None, add: bool) -> None:
        if item is None:
            return
        keys = {(CATEGORY_KEY, normalize_attribute(c)) for c in item.fields.categories}
        keys |= {(normalize_attribute(k), normalize_attribute(v)) for k, v in item.attributes}
        for key in keys:
            if add:
                self._postings.setdefault(key, set()).add(label)
            else:
                labels = self._postings.get(key)
                if labels is not None:
                    labels.discard(label)
                    if not labels:
                        del self._postings[key]

    def change_records(self) -> list[Upsert | Delete]:
        """The catalogue's difference from the bundle, as operations a snapshot stores."""
        upserts = [(item, row) for item, row in self._changes.values() if item is not None]
        deletes = [item_id for item_id, (item, _) in self._changes.items() if item is None]
        records: list[Upsert | Delete] = []
        if upserts:
            records.append(Upsert([item for item, _ in upserts], np.stack([row for _, row in upserts])))
        if deletes:
            records.append(Delete(deletes))
        return records


def page_token_after(item_id: str) -> str:
    """The ListItems page token that continues after `item_id` (a page cut short by size ends there)."""
    return _encode_page_token(item_id)


def _encode_page_token(last_id: str) -> str:
    return base64.urlsafe_b64encode((_PAGE_TOKEN_PREFIX + last_id).encode()).decode().rstrip("=")


def _decode_page_token(token: str) -> str | None:
    if not token:
        return None
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        text = ""
    if not text.startswith(_PAGE_TOKEN_PREFIX):
        raise InvalidArgument("page_token is not one this server issued; pass next_page_token unchanged",
                              field="page_token")
    return text[len(_PAGE_TOKEN_PREFIX):]


def open_catalogue(bundle: LoadedBundle, store: ChangeStore | None = None, use_cold_start_map: bool = True,
                   new_item_cooccurrence: float = 1.0) -> Catalogue:
    """The live catalogue of a bundle, with its durable changes replayed when a store is given (server.store).
    use_cold_start_map: upserted items get the bundle's cold-start map's prediction (Catalogue.row_for).
    new_item_cooccurrence: how much co-occurrence new items borrow (Catalogue).

    Blocking (replay applies every stored change to the index). Raises StateError for unusable state.
    """
    catalogue = Catalogue(bundle, use_cold_start_map, new_item_cooccurrence)
    if store is not None:
        replayed = catalogue.open_store(store)
        logger.info("catalogue: %d items after replaying %d stored changes (revision %d)", catalogue.count,
                    replayed, catalogue.revision)
    return catalogue
