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
class RecommendQuery:
    """A ranking request.

    Attributes:
        user: history and context.
        k: how many items to return (1..max_k).
        exclude_item_ids: catalogue ids never to return (unknown ids are ignored).
        exclude_history: also never return catalogued items from the history.
    """

    user: UserInput
    k: int
    exclude_item_ids: frozenset[str] = frozenset()
    exclude_history: bool = False


@dataclasses.dataclass(frozen=True)
class ScoredItem:
    """One recommended item; rank is 1-based and follows descending score."""

    item_id: str
    score: float
    title: str
    rank: int
