"""The recommender core: resolve a history, render it with the shared template, encode it, search the index.

No gRPC here: inputs and outputs are server.domain types, failures are server.errors exceptions.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Sequence

import numpy as np

from llmrec.template import ItemFields, UserText, render_item, render_user

from llmrec.server import explain as explaining
from llmrec.server import validation
from llmrec.server.bundle import LoadedBundle
from llmrec.server.catalogue import Catalogue, ResolvedItem
from llmrec.server.domain import (
    AttributeFilter, CatalogueItem, HistoryRef, RecommendQuery, ScoredItem, UserInput, WriteResult,
)
from llmrec.server.encoding import AsyncEncoder
from llmrec.server.errors import InvalidArgument

logger = logging.getLogger(__name__)

_TEXT_CACHE_LIMIT = 256
# UpsertItems encodes its texts this many at a time: each chunk is one encoder request, so other requests are
# served between chunks, and a call whose client gave up (or whose deadline passed) stops at the next one.
UPSERT_ENCODE_CHUNK = 16


class Recommender:
    """Ranks catalogue items for a user with one bundle's encoder and the live catalogue.

    Args:
        bundle: the loaded bundle.
        encoder: the async encoder running the bundle's model.
        limits: request limits to enforce.
        catalogue: the live catalogue over the bundle's index (one is made from the bundle when None).
        new_item_share: the share of every list reserved for new items when a request does not say (0..1).
    """

    def __init__(self, bundle: LoadedBundle, encoder: AsyncEncoder, limits: validation.Limits,
                 catalogue: Catalogue | None = None, new_item_share: float = 0.0) -> None:
        self.bundle = bundle
        self.encoder = encoder
        self.limits = limits
        self.catalogue = catalogue if catalogue is not None else Catalogue(bundle)
        validation.check_new_item_share(new_item_share)
        self.new_item_share = new_item_share
        self.max_history_items = bundle.manifest.max_history_items
        self.rule = bundle.manifest.scoring_rule()

    @property
    def model_version(self) -> str:
        return self.bundle.model_version

    @property
    def index_version(self) -> str:
        return self.catalogue.index_version

    # --- users -------------------------------------------------------------------------------------------

    def resolve(self, history: Sequence[HistoryRef], with_window_vectors: bool = False) -> list[ResolvedItem]:
        """Catalogue ids and raw texts -> ResolvedItem, in order; with_window_vectors also copies the catalogue
        vectors of the entries the model reads (the most recent max_history_items), for explanations.

        Raises:
            NotFound: some ids are not in the catalogue (the message names them).
        """
        start = len(history) - max(self.max_history_items, 0) if with_window_vectors else None
        return self.catalogue.resolve(history, vectors_from=start)

    def resolve_history(self, history: Iterable[HistoryRef]) -> list[ItemFields]:
        """Catalogue ids and raw texts -> ItemFields, in order. Raises NotFound for unknown ids."""
        return [entry.fields for entry in self.catalogue.resolve(history)]

    def check_user(self, user: UserInput, field_prefix: str = "") -> None:
        """Everything that can be wrong with a user input, without encoding it (validation and unknown ids)."""
        validation.check_user(user, self.limits, field_prefix)
        self.resolve_history(user.history)

    def render(self, user: UserInput) -> str:
        """The model input text for a user, by the shared template (llmrec.template)."""
        history = self.resolve_history(user.history)
        return render_user(UserText(history=history, context=user.context), self.max_history_items)

    async def encode_user(self, text: str) -> np.ndarray:
        """One rendered user text -> its unit vector."""
        return (await self.encoder.encode_users([text]))[0]

    # --- ranking -----------------------------------------------------------------------------------------

    async def recommend(self, query: RecommendQuery) -> list[ScoredItem]:
        """The top query.k items for a user, exclusions and filters applied inside the search.

        Raises:
            InvalidArgument: the query breaks a limit or has neither history nor query text.
            NotFound: the history names an unknown item id.
        """
        validation.check_query(query, self.limits)
        resolved = self.resolve(query.user.history, with_window_vectors=query.explain)
        text = render_user(UserText([r.fields for r in resolved], query.user.context), self.max_history_items)
        user_vector = await self.encode_user(text)
        history_ids = [ref.item_id for ref in query.user.history]
        items = self.search(user_vector, query.k, self.excluded_ids(query), query.filters, history_ids,
                            query.new_item_share)
        if query.explain:
            items = await self.explain(items, self.window(resolved), query.user.context.query)
        return items

    def window(self, resolved: Sequence[ResolvedItem]) -> list[ResolvedItem]:
        """The history entries the model reads: the most recent max_history_items."""
        return list(resolved[-self.max_history_items:]) if self.max_history_items > 0 else []

    @staticmethod
    def excluded_ids(query: RecommendQuery) -> frozenset[str]:
        """Ids that must not come back: explicit exclusions, and catalogued history if asked."""
        if not query.exclude_history:
            return query.exclude_item_ids
        return query.exclude_item_ids | {ref.item_id for ref in query.user.history if ref.item_id is not None}

    def search(self, user_vector: np.ndarray, k: int, exclude_ids: Iterable[str] = frozenset(),
               filters: Sequence[AttributeFilter] = (), history_ids: Sequence[str | None] = (),
               new_item_share: float | None = None) -> list[ScoredItem]:
        """Top-k items for a user with history_ids (oldest first; None for items given as text) under the
        bundle's scoring rule (llmrec.scoring), the same rule evaluation applies. floor(new_item_share * k) of
        them (the server's default share when None) go to the best new items when the model ranks fewer there.

        Fewer than k come back only when exclusions and filters leave fewer than k items in the catalogue.
        """
        catalogued = [i for i in history_ids if i is not None]
        share = self.new_item_share if new_item_share is None else new_item_share
        slots = math.floor(share * k + 1e-9)  # the epsilon: 0.3 * 10 is 2.9999999999999996 in floating point
        return self.catalogue.top_k(self.rule, self.query_vector(user_vector, catalogued), k, catalogued,
                                    self.bundle.cooccurrence, frozenset(exclude_ids), filters, slots)

    def query_vector(self, user_vector: np.ndarray, history_ids: Sequence[str | None]) -> np.ndarray:
        """The scoring rule's query for a user vector and catalogued history, oldest first; items given as text,
        or deleted since, add nothing."""
        sequence_spec = self.bundle.manifest.sequence_model
        sequence_items = sequence_spec.max_items if sequence_spec is not None and sequence_spec.weight else 0
        ids = [i for i in history_ids if i is not None]
        needed = max(self.rule.history_items_read, sequence_items)
        if not needed or not ids:
            return user_vector
        recent = self.catalogue.unit_vectors(ids[-needed:])  # one read of the catalogue for both
        sequence = None
        if sequence_items:
            window = recent[-sequence_items:]
            sequence = self.bundle.sequence_model.vectors([window[window.any(axis=1)]])  # deleted: zero rows
        return self.rule.query(user_vector[None, :], [recent], sequence)[0]

    async def explain(self, items: list[ScoredItem], window: Sequence[ResolvedItem], query: str,
                      text_cache: dict[str, np.ndarray] | None = None) -> list[ScoredItem]:
        """The items with an Explanation each (server.explain): their similarity to each distinct history item
        the model read and to the query.

        Args:
            items: the ranking to explain.
            window: the history entries the model read, oldest first (catalogue vectors set where known).
            query: the context query ("" for none).
            text_cache: rendered text -> item-tower vector, kept by a session across events.
        """
        if not items:
            return items
        history: list[tuple[str, str]] = []
        history_vectors: list[np.ndarray | None] = []
        history_texts: list[str | None] = []
        seen: set[object] = set()
        for entry in reversed(list(window)):  # most recent first
            key = entry.item_id if entry.item_id is not None else ("text", entry.fields)
            if key in seen:
                continue
            seen.add(key)
            history.append((entry.item_id or "", entry.fields.title))
            history_vectors.append(entry.vector)
            history_texts.append(None if entry.vector is not None else render_item(entry.fields))
        terms = explaining.query_terms(query) if query.strip() else []
        query_texts = [render_item(ItemFields(title=query)), *(render_item(ItemFields(title=t)) for t in terms)] \
            if terms else []
        encoded = await self._encode_item_texts([t for t in history_texts if t is not None] + query_texts,
                                                text_cache)
        history_matrix = np.zeros((len(history), self.catalogue.dimension), dtype=np.float32)
        for row, (vector, text) in enumerate(zip(history_vectors, history_texts)):
            history_matrix[row] = vector if vector is not None else encoded[text]
        query_vector = encoded[query_texts[0]] if terms else None
        term_vectors = np.array([encoded[t] for t in query_texts[1:]], dtype=np.float32) if terms else None
        item_vectors = self.catalogue.unit_vectors([item.item_id for item in items])
        explanations = explaining.explain(item_vectors, history, history_matrix, query, query_vector, terms,
                                          term_vectors)
        return [dataclasses.replace(item, explanation=e) for item, e in zip(items, explanations)]

    async def _encode_item_texts(self, texts: Sequence[str],
                                 cache: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        cache = {} if cache is None else cache
        missing = list(dict.fromkeys(t for t in texts if t not in cache))
        if missing:
            if len(cache) + len(missing) > _TEXT_CACHE_LIMIT:
                cache.clear()
            for text, vector in zip(missing, await self.encoder.encode_items(missing)):
                cache[text] = vector
        return {t: cache[t] for t in texts}

    # --- catalogue changes -------------------------------------------------------------------------------

    async def upsert_items(self, items: Sequence[CatalogueItem]) -> WriteResult:
        """Validate, encode (text only) and durably add or replace items: all of them or none.

        Texts are encoded UPSERT_ENCODE_CHUNK at a time; only once every one is encoded is the whole batch
        journaled and applied, as one change. A call cancelled (or past its deadline) while encoding therefore
        stops encoding and changes nothing; one cancelled during the write is still applied in full (the write is
        shielded: a journaled change is never left half-applied), though its caller is not told.

        Raises:
            InvalidArgument: a bad item or batch; FailedPrecondition: no state directory; Unavailable: storage.
            DeadlineExceeded: the deadline passed while encoding (nothing was changed).
        """
        validation.check_catalogue_items(items, self.limits)
        self.catalogue.check_writable()
        texts = [render_item(item.fields) for item in items]
        vectors = [await self.encoder.encode_items(texts[start : start + UPSERT_ENCODE_CHUNK])
                   for start in range(0, len(texts), UPSERT_ENCODE_CHUNK)]
        rows = np.stack([self.catalogue.row_for(vector) for vector in np.concatenate(vectors)])
        return await self.catalogue.upsert(items, rows)

    async def delete_items(self, item_ids: Sequence[str], allow_missing: bool) -> WriteResult:
        """Durably delete items. Raises NotFound for unknown ids unless allow_missing."""
        validation.check_item_ids(item_ids, self.limits)
        self.catalogue.check_writable()
        return await self.catalogue.delete(item_ids, allow_missing)

    # --- embeddings --------------------------------------------------------------------------------------

    async def embed(
        self, items: Sequence[ItemFields], users: Sequence[UserInput], max_inputs: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Unit vectors for item texts (item window) and users (user window), in request order.

        Raises:
            InvalidArgument: too many inputs, or one breaks a limit.
            NotFound: a user history names an unknown item id.
        """
        if len(items) + len(users) > max_inputs:
            raise InvalidArgument(f"embed takes at most {max_inputs} items and users together, "
                                  f"got {len(items) + len(users)}")
        for position, item in enumerate(items):
            validation.check_item_text(item, f"items[{position}]", self.limits)
        user_texts = []
        for position, user in enumerate(users):
            validation.check_user(user, self.limits, f"users[{position}].")
            user_texts.append(self.render(user))
        item_vectors = await self.encoder.encode_items([render_item(item) for item in items])
        user_vectors = await self.encoder.encode_users(user_texts)
        return item_vectors, user_vectors
