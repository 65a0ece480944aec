"""The recommender core: resolve a history, render it with the shared template, encode it, search the index.

Two paths (docs/serving.md): the full path encodes the user text; the fast path, for a user whose history is all
catalogue ids with no query (fast_path_allows: the rest of the context is ignored), runs no encoder: the scoring
rule with the user vector the bundle's user map predicts from the history's item vectors (llmrec.fast_user; zero
in bundles without one) and the bundle's fast-path adjustments (llmrec.manifest.FastPathSpec), over the
catalogue's vectors alone. A bundle without them, or encoder_path "always", serves every request on the full path.

No gRPC here: inputs and outputs are server.domain types, failures are server.errors exceptions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Iterable, Sequence

import numpy as np

from llmrec.manifest import RankingStageSpec
from llmrec.ranking_stage import rerank
from llmrec.scoring import ScoringRule
from llmrec.template import ItemFields, RequestContext, UserText, render_item, render_user

from llmrec.server import explain as explaining
from llmrec.server import metrics, tracing, validation
from llmrec.server.bundle import LoadedBundle
from llmrec.server.catalogue import Catalogue, ResolvedItem
from llmrec.server.domain import (
    AttributeFilter, CatalogueItem, HistoryRef, RecommendQuery, ScoredItem, UserInput, WriteResult,
)
from llmrec.server.encoding import AsyncEncoder
from llmrec.server.errors import REASON_NO_RANKING_STAGE, FailedPrecondition, InvalidArgument, ServiceError

logger = logging.getLogger(__name__)

_TEXT_CACHE_LIMIT = 256
# UpsertItems encodes its texts this many at a time: each chunk is one encoder request, so other requests are
# served between chunks, and a call whose client gave up (or whose deadline passed) stops at the next one.
UPSERT_ENCODE_CHUNK = 16

# How a ranking was made: the names of SERVING_PATH_FULL / SERVING_PATH_FAST and of the metric label.
FULL_PATH, FAST_PATH = "full", "fast"


def best_with_reserved(new: np.ndarray, k: int, slots: int) -> list[int]:
    """Positions of the k first of a list in score order, best first, at least min(slots, new items in the list) of
    them new: the best new items beyond the k replace the lowest others."""
    chosen = list(range(min(k, len(new))))
    missing = min(slots, int(new.sum())) - int(new[chosen].sum())
    if missing <= 0:
        return chosen
    extra = [n for n in range(len(chosen), len(new)) if new[n]][:missing]
    others = [n for n in chosen if not new[n]]
    dropped = set(others[len(others) - len(extra):])
    return sorted([n for n in chosen if n not in dropped] + extra)


def fast_path_allows(context: RequestContext) -> bool:
    """Whether a context leaves the fast path open: only a query needs the encoder. The time of day, device and
    locale are ignored there: on validation the encoder's context (time) changes NDCG@10 by far less than the fast
    path's own loss (reports/fast-path, docs/serving.md), and the model was never trained on device or locale."""
    return not context.query.strip()


@dataclasses.dataclass(frozen=True)
class PreparedQuery:
    """A checked RecommendQuery with its history resolved and its user text rendered where the encoder or the
    ranking stage reads it ("" otherwise: the fast path without a ranking stage reads no text): all but the
    encoding."""

    query: RecommendQuery
    resolved: list[ResolvedItem]
    text: str
    path: str = FULL_PATH  # FULL_PATH or FAST_PATH
    ranking_stage: RankingStageSpec | None = None  # the stage that re-scores its list (ranking_stage_for)


class Recommender:
    """Ranks catalogue items for a user with one bundle's encoder and the live catalogue.

    Args:
        bundle: the loaded bundle.
        encoder: the async encoder running the bundle's model.
        limits: request limits to enforce.
        catalogue: the live catalogue over the bundle's index (one is made from the bundle when None); how much
            co-occurrence new items borrow is its new_item_cooccurrence (it finds their donors).
        new_item_share: the share of every list reserved for new items when a request does not say (0..1).
        new_item_boost: added to every new item's score (llmrec.scoring.ScoringRule.new_item_boost), >= 0.
        encoder_path: "auto" (the fast path where it applies, if the bundle has one) or "always" (never).
        ranking_stage: re-score with the bundle's ranking stage when a request does not say (bundles without one
            serve without it).
    """

    def __init__(self, bundle: LoadedBundle, encoder: AsyncEncoder, limits: validation.Limits,
                 catalogue: Catalogue | None = None, new_item_share: float = 0.0, encoder_path: str = "auto",
                 ranking_stage: bool = False, new_item_boost: float = 0.0) -> None:
        self.bundle = bundle
        self.encoder = encoder
        self.limits = limits
        self.catalogue = catalogue if catalogue is not None else Catalogue(bundle)
        validation.check_new_item_share(new_item_share)
        self.new_item_share = new_item_share
        self.max_history_items = bundle.manifest.max_history_items
        if not new_item_boost >= 0:
            raise ValueError(f"new_item_boost must be >= 0, got {new_item_boost}")
        new_items = {"borrowed_cooccurrence": self.catalogue.new_item_cooccurrence, "new_item_boost": new_item_boost}
        self.rule = dataclasses.replace(bundle.manifest.scoring_rule(), **new_items)
        # The fast path's rule (no encoder run); None: every request takes the full path.
        fast_rule = bundle.manifest.fast_scoring_rule() if encoder_path == "auto" else None
        self.fast_rule = None if fast_rule is None else dataclasses.replace(fast_rule, **new_items)
        self.ranking_stage_default = ranking_stage and bundle.ranker is not None
        if ranking_stage and bundle.ranker is None:
            logger.warning("ranking stage on by default, but model %s has none: its requests are ranked by the first "
                           "stage alone (GetModelInfo.ranking_stage_default is false)", bundle.model_version)

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

    def path_for(self, catalogued_history: bool, context: RequestContext, force_full_path: bool = False) -> str:
        """FAST_PATH or FULL_PATH for a user whose history is non-empty and all catalogued (or not), in this
        context: the one rule for Recommend, RecommendBatch, RecommendStream and sessions."""
        fast = self.fast_rule is not None and catalogued_history and not force_full_path and fast_path_allows(context)
        return FAST_PATH if fast else FULL_PATH

    def path(self, query: RecommendQuery) -> str:
        """The path that serves this query (path_for); unknown ids fail the query on either path (NotFound)."""
        history = query.user.history
        return self.path_for(bool(history) and all(ref.item_id is not None for ref in history), query.user.context,
                             query.force_full_path)

    async def recommend(self, query: RecommendQuery) -> list[ScoredItem]:
        """The top query.k items for a user, exclusions and filters applied inside the search.

        Raises:
            InvalidArgument: the query breaks a limit or has neither history nor query text.
            NotFound: the history names an unknown item id.
        """
        prepared = self.prepare(query)
        if prepared.path == FAST_PATH:
            return await self.rank(prepared, None)
        return await self.rank(prepared, await self.encode_user(prepared.text))

    async def recommend_batch(self, queries: Sequence[RecommendQuery]) -> list[list[ScoredItem] | Exception]:
        """recommend() for many users: per query its items, or the exception it alone would have raised (field
        paths prefixed with "requests[i]."). The user texts go to the encoder together (encode_users_each), and
        a failure there (a full queue) fails only the queries whose texts it held.
        """
        outcomes: list[PreparedQuery | list[ScoredItem] | Exception] = []
        for position, query in enumerate(queries):
            try:
                outcomes.append(self.prepare(query))
            except ServiceError as error:
                if error.field:
                    error.field = f"requests[{position}].{error.field}"
                outcomes.append(error)
        ready = [(n, p) for n, p in enumerate(outcomes) if isinstance(p, PreparedQuery)]
        encoded = iter(await self.encoder.encode_users_each([p.text for _, p in ready if p.path == FULL_PATH]))
        vectors = [None if p.path == FAST_PATH else next(encoded) for _, p in ready]

        async def finish(prepared: PreparedQuery, vector: np.ndarray | Exception | None,
                         ) -> list[ScoredItem] | Exception:
            if isinstance(vector, Exception):
                return vector
            try:
                return await self.rank(prepared, vector)
            except Exception as error:  # noqa: BLE001 - this entry's status (INTERNAL, logged, if not ours)
                return error

        finished = await asyncio.gather(*(finish(p, v) for (_, p), v in zip(ready, vectors)))
        for (position, _), outcome in zip(ready, finished):
            outcomes[position] = outcome
        return outcomes  # type: ignore[return-value] - every PreparedQuery was replaced

    def prepare(self, query: RecommendQuery) -> PreparedQuery:
        """Check a query, resolve its history and render its user text (raises like recommend)."""
        validation.check_query(query, self.limits)
        resolved = self.resolve(query.user.history, with_window_vectors=query.explain)
        path = self.path(query)
        stage = self.ranking_stage_for(query)
        text = "" if path == FAST_PATH and stage is None else \
            render_user(UserText([r.fields for r in resolved], query.user.context), self.max_history_items)
        return PreparedQuery(query, resolved, text, path, stage)

    def ranking_stage_for(self, query: RecommendQuery) -> RankingStageSpec | None:
        """The ranking stage this query is re-scored with, or None.

        Raises:
            FailedPrecondition: the query asks for it and the model has none.
        """
        if query.ranking_stage is None:
            return self.bundle.manifest.ranking_stage if self.ranking_stage_default else None
        if query.ranking_stage and self.bundle.ranker is None:
            raise FailedPrecondition(f"model {self.model_version} has no ranking stage (GetModelInfo."
                                     "ranking_stage_candidates is 0); leave ranking_stage unset or false",
                                     field="ranking_stage", reason=REASON_NO_RANKING_STAGE)
        return self.bundle.manifest.ranking_stage if query.ranking_stage else None

    async def rank(self, prepared: PreparedQuery, user_vector: np.ndarray | None) -> list[ScoredItem]:
        """The ranking (and explanations) of a prepared query, given its user vector (None on the fast path)."""
        query = prepared.query
        stage = prepared.ranking_stage
        history_ids = [ref.item_id for ref in query.user.history]
        items = self.search(user_vector, query.k, self.excluded_ids(query), query.filters, history_ids,
                            query.rejected_item_ids, query.min_score if stage is None else None, query.new_item_share,
                            0 if stage is None else stage.candidates)
        if stage is not None:
            items = await self.rescore(prepared, items, stage)
        if query.explain:
            items = await self.explain(items, self.window(prepared.resolved), query.user.context.query)
        return items

    async def rescore(self, prepared: PreparedQuery, items: list[ScoredItem], stage: RankingStageSpec,
                      ) -> list[ScoredItem]:
        """The ranking stage (llmrec.ranking_stage) over the first stage's list: every item re-scored by the
        cross-encoder, the k best kept, at least as many new items as the list's reserved share holds, min_score
        applied to the new scores."""
        query = prepared.query
        found = self.catalogue.texts_of([item.item_id for item in items])
        items, found = [i for i, f in zip(items, found) if f is not None], [f for f in found if f is not None]
        if not items:
            return []
        ranker = self.bundle.ranker
        assert ranker is not None  # ranking_stage_for gives a stage only with one
        with tracing.span(tracing.RANKING_STAGE, {"llmrec.candidates": len(items)}), \
                metrics.RANKING_STAGE_SECONDS.time():
            logits = await asyncio.to_thread(ranker.logits, prepared.text,
                                             [render_item(fields) for fields, _ in found])
        order, scores = rerank(np.array([item.score for item in items]), logits, stage.weight)
        new = np.array([is_new for _, is_new in found])[order]
        kept = best_with_reserved(new, query.k, self.reserved_slots(query.new_item_share, query.k))
        ranked = [dataclasses.replace(items[order[n]], score=float(scores[n]), rank=rank)
                  for rank, n in enumerate(kept, 1)]
        if query.min_score is None:
            return ranked
        return [item for item in ranked if np.float32(item.score) >= np.float32(query.min_score)]

    def window(self, resolved: Sequence[ResolvedItem]) -> list[ResolvedItem]:
        """The history entries the model reads: the most recent max_history_items."""
        return list(resolved[-self.max_history_items:]) if self.max_history_items > 0 else []

    @staticmethod
    def excluded_ids(query: RecommendQuery) -> frozenset[str]:
        """Ids that must not come back: explicit exclusions, and catalogued history if asked."""
        if not query.exclude_history:
            return query.exclude_item_ids
        return query.exclude_item_ids | {ref.item_id for ref in query.user.history if ref.item_id is not None}

    def search(self, user_vector: np.ndarray | None, k: int, exclude_ids: Iterable[str] = frozenset(),
               filters: Sequence[AttributeFilter] = (), history_ids: Sequence[str | None] = (),
               rejected_ids: Sequence[str] = (), min_score: float | None = None,
               new_item_share: float | None = None, candidates: int = 0) -> list[ScoredItem]:
        """Top-k items for a user with history_ids (oldest first; None for items given as text) and rejected_ids
        under the bundle's scoring rule (llmrec.scoring), the same rule evaluation applies; rejected items are
        excluded too. floor(new_item_share * k) of them (the server's default share when None) go to the best
        new items when the model ranks fewer there. user_vector None: the fast path (the user map's vector, or zero,
        under the fast rule: query_vector).

        Fewer than k come back only when exclusions and filters leave fewer than k items in the catalogue, or
        when min_score drops some: those whose score, as sent (float32), is below it. candidates > k: that many
        come back instead (the ranking stage's list), the reserved new-item slots still counted on k.
        """
        catalogued = [i for i in history_ids if i is not None]
        slots = self.reserved_slots(new_item_share, k)
        fast = user_vector is None
        rule = self.fast_rule if fast else self.rule
        if rule is None:
            raise ValueError("the fast path was taken without fast-path adjustments; this is a bug")
        metrics.RANKINGS.labels(FAST_PATH if fast else FULL_PATH).inc()
        with tracing.span(tracing.RANKING, {"llmrec.k": k}), metrics.RANKING_SECONDS.time():
            items = self.catalogue.top_k(rule, self.query_vector(user_vector, catalogued, rejected_ids, rule),
                                         max(k, candidates), catalogued, self.bundle.cooccurrence,
                                         frozenset(exclude_ids).union(rejected_ids), filters, slots)
        if min_score is None:
            return items
        return [item for item in items if np.float32(item.score) >= np.float32(min_score)]

    def reserved_slots(self, new_item_share: float | None, k: int) -> int:
        """How many of k slots go to new items at this share (None: the server's default)."""
        share = self.new_item_share if new_item_share is None else new_item_share
        return math.floor(share * k + 1e-9)  # the epsilon: 0.3 * 10 is 2.9999999999999996 in floating point

    def query_vector(self, user_vector: np.ndarray | None, history_ids: Sequence[str | None],
                     rejected_ids: Sequence[str] = (), rule: ScoringRule | None = None) -> np.ndarray:
        """The scoring rule's query (rule: default the full path's) for a user vector, catalogued history (oldest
        first) and rejected items; items given as text, or not in the catalogue (deleted since, never there), add
        nothing. user_vector None: the fast path's, predicted from the history by the bundle's user map
        (llmrec.fast_user), or zero when it has none."""
        rule = self.rule if rule is None else rule
        user_map = self.bundle.fast_user_map if user_vector is None else None
        if user_vector is None:
            user_vector = np.zeros(self.catalogue.dimension, np.float32)
        sequence_spec = self.bundle.manifest.sequence_model
        sequence_items = sequence_spec.max_items if sequence_spec is not None and rule.adjustments.sequence_weight \
            else 0
        ids = [i for i in history_ids if i is not None]
        needed = max(rule.history_items_read, sequence_items, user_map.items_read if user_map is not None else 0)
        rejected = self.rejected_vectors(rejected_ids) if rule.rejected_weight else None
        if (not needed or not ids) and rejected is None:
            return user_vector
        recent = self.catalogue.unit_vectors(ids[-needed:]) if needed and ids else \
            np.zeros((0, self.catalogue.dimension), np.float32)  # one read of the catalogue for both
        sequence = None
        if sequence_items:
            window = recent[-sequence_items:]
            sequence = self.bundle.sequence_model.vectors([window[window.any(axis=1)]]) if len(window) else \
                np.zeros((1, self.catalogue.dimension), np.float32)  # no catalogued history: no sequence term
        if user_map is not None and len(recent):
            user_vector = user_map.user_vectors([recent])[0]
        return rule.query(user_vector[None, :], [recent], sequence, None if rejected is None else [rejected])[0]

    def rejected_vectors(self, rejected_ids: Sequence[str]) -> np.ndarray | None:
        """The unit vectors of the distinct rejected items the catalogue holds (None when there are none); the
        others are ignored and counted (llmrec_rejected_unknown_ids_total)."""
        if not rejected_ids:
            return None
        vectors = self.catalogue.unit_vectors(list(dict.fromkeys(rejected_ids)))
        known = vectors.any(axis=1)  # unit vectors: only a missing item gives a zero row
        if not known.all():
            metrics.REJECTED_UNKNOWN.inc(int((~known).sum()))
        return vectors[known] if known.any() else None

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
        return await self.catalogue.upsert(items, await self.item_rows(items))

    async def item_rows(self, items: Sequence[CatalogueItem]) -> np.ndarray:
        """The index rows of catalogue items as this model encodes them (text only; Catalogue.row_for), encoded
        UPSERT_ENCODE_CHUNK texts at a time. Also how a hot swap re-encodes carried items (server.models)."""
        texts = [render_item(item.fields) for item in items]
        vectors = [await self.encoder.encode_items(texts[start : start + UPSERT_ENCODE_CHUNK])
                   for start in range(0, len(texts), UPSERT_ENCODE_CHUNK)]
        return np.stack([self.catalogue.row_for(vector) for vector in np.concatenate(vectors)])

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
