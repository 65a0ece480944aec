"""Request and result types of the recommender core, free of gRPC and protobuf."""

from __future__ import annotations

import dataclasses

from llmrec.template import ItemFields, RequestContext


@dataclasses.dataclass(frozen=True)
class HistoryRef:
    """One history entry as the caller sent it: a catalogue id or the text of an item (exactly one is set)."""

    item_id: str | None = None
    text: ItemFields | None = None


@dataclasses.dataclass(frozen=True)
class UserInput:
    """Who to recommend for: history (oldest first) and the current context."""

    history: tuple[HistoryRef, ...] = ()
    context: RequestContext = RequestContext()


@dataclasses.dataclass(frozen=True)
class AttributeFilter:
    """Keep items whose attribute `key` has one of `values`; compared casefolded and stripped.

    Key "category" also matches the item's ItemText categories.
    """

    key: str
    values: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class RecommendQuery:
    """A ranking request.

    Attributes:
        user: history and context.
        k: how many items to return (1..max_k).
        exclude_item_ids: catalogue ids never to return (unknown ids are ignored).
        exclude_history: also never return catalogued items from the history.
        explain: attach an Explanation to every returned item.
        filters: only items that pass every filter.
        rejected_item_ids: catalogue ids the user rejected, in request order: never returned, and the query
            moves away from them (llmrec.scoring); unknown ids are ignored.
        min_score: drop items scoring below it (None: no threshold).
        new_item_share: share of the k reserved for new (upserted) items, 0..1; None: the server's default.
        force_full_path: run the encoder even where the fast path would serve (server.recommender).
        ranking_stage: re-score the best candidates with the model's cross-encoder (llmrec.ranking_stage); None:
            the server's default.
    """

    user: UserInput
    k: int
    exclude_item_ids: frozenset[str] = frozenset()
    exclude_history: bool = False
    explain: bool = False
    filters: tuple[AttributeFilter, ...] = ()
    rejected_item_ids: tuple[str, ...] = ()
    min_score: float | None = None
    new_item_share: float | None = None
    force_full_path: bool = False
    ranking_stage: bool | None = None


@dataclasses.dataclass(frozen=True)
class ScoredItem:
    """One recommended item; rank is 1-based and follows descending score."""

    item_id: str
    score: float
    title: str
    rank: int
    explanation: Explanation | None = None


@dataclasses.dataclass(frozen=True)
class Reason:
    """One source of the user text and its share of a recommended item's explanation.

    Attributes:
        kind: "history" (an item the model read) or "query_term" (a word of the query).
        item_id: the catalogue id of a history item ("" for one given as text, and for terms).
        text: the history item's title, or the term.
        weight: share among all sources (they sum to 1 over every source, shown or not).
        similarity: cosine of the recommended item's vector with the source's vector.
    """

    kind: str
    item_id: str
    text: str
    weight: float
    similarity: float


@dataclasses.dataclass(frozen=True)
class Explanation:
    reasons: tuple[Reason, ...]
    summary: str


@dataclasses.dataclass(frozen=True)
class CatalogueItem:
    """A live catalogue item: text the model reads, attributes filters match, and where it came from."""

    item_id: str
    fields: ItemFields
    attributes: tuple[tuple[str, str], ...] = ()  # sorted (key, value) pairs
    upserted: bool = False


@dataclasses.dataclass(frozen=True)
class WriteResult:
    """The outcome of one catalogue change, as of the moment it was applied."""

    created: int = 0
    replaced: int = 0
    deleted: int = 0
    item_count: int = 0
    index_version: str = ""
