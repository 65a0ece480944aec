"""Protobuf messages <-> server.domain types. Pure translation: checks live in server.validation."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.timestamp_pb2 import Timestamp

from llmrec.template import ItemFields, RequestContext
from llmrec.v1 import recommender_pb2 as pb

from llmrec.server.domain import (
    AttributeFilter, CatalogueItem, Explanation, HistoryRef, RecommendQuery, ScoredItem, UserInput,
)
from llmrec.server.session import ContextEvent, InteractionEvent, QueryEvent, SessionConfigEvent, SessionEvent


def timestamp_seconds(timestamp: Timestamp) -> float:
    """A proto Timestamp as Unix seconds."""
    return timestamp.seconds + timestamp.nanos / 1e9


def item_fields(text: pb.ItemText) -> ItemFields:
    return ItemFields(
        title=text.title, categories=tuple(text.categories), brand=text.brand, description=text.description
    )


def history_ref(item: pb.HistoryItem) -> HistoryRef:
    """A HistoryItem with neither id nor text becomes HistoryRef() (validation reports it).

    HistoryItem.timestamp is accepted but not rendered: template v1 reads order, not per-item times.
    """
    which = item.WhichOneof("item")
    if which == "item_id":
        return HistoryRef(item_id=item.item_id)
    if which == "text":
        return HistoryRef(text=item_fields(item.text))
    return HistoryRef()


def history(items: Iterable[pb.HistoryItem]) -> tuple[HistoryRef, ...]:
    return tuple(history_ref(item) for item in items)


def context(message: pb.Context) -> RequestContext:
    return RequestContext(
        timestamp=timestamp_seconds(message.timestamp) if message.HasField("timestamp") else None,
        utc_offset_minutes=message.utc_offset_minutes,
        device=message.device,
        locale=message.locale,
        query=message.query,
    )


def user(history_items: Iterable[pb.HistoryItem], context_message: pb.Context) -> UserInput:
    return UserInput(history=history(history_items), context=context(context_message))


def recommend_query(request: pb.RecommendRequest) -> RecommendQuery:
    return RecommendQuery(
        user=user(request.history, request.context),
        k=request.k,
        exclude_item_ids=frozenset(request.exclude_item_ids),
        exclude_history=request.exclude_history,
        explain=request.explain,
        filters=filters(request.filters),
        new_item_share=request.new_item_share if request.HasField("new_item_share") else None,
    )


def filters(messages: Iterable[pb.AttributeFilter]) -> tuple[AttributeFilter, ...]:
    return tuple(AttributeFilter(key=f.key, values=tuple(f.values)) for f in messages)


def session_event(request: pb.SessionRequest) -> SessionEvent | None:
    """The domain event of a SessionRequest; None when the request sets no event."""
    which = request.WhichOneof("event")
    if which == "config":
        config = request.config
        return SessionConfigEvent(
            k=config.k, exclude_item_ids=frozenset(config.exclude_item_ids),
            exclude_history=config.exclude_history, history=history(config.history),
            explain=config.explain, filters=filters(config.filters),
        )
    if which == "interaction":
        return InteractionEvent(history_ref(request.interaction))
    if which == "context":
        return ContextEvent(context(request.context))
    if which == "query":
        return QueryEvent(request.query)
    return None


def recommended_items(items: Iterable[ScoredItem]) -> list[pb.RecommendedItem]:
    return [pb.RecommendedItem(item_id=i.item_id, score=i.score, title=i.title, rank=i.rank,
                               explanation=explanation(i.explanation))
            for i in items]


_REASON_KINDS = {"history": pb.Reason.HISTORY_ITEM, "query_term": pb.Reason.QUERY_TERM}


def explanation(value: Explanation | None) -> pb.Explanation | None:
    if value is None:
        return None
    return pb.Explanation(
        reasons=[pb.Reason(kind=_REASON_KINDS[r.kind], item_id=r.item_id, text=r.text, weight=r.weight,
                           similarity=r.similarity) for r in value.reasons],
        summary=value.summary,
    )


def catalogue_item(message: pb.CatalogueItem) -> CatalogueItem:
    return CatalogueItem(item_id=message.item_id, fields=item_fields(message.text),
                         attributes=tuple(sorted(message.attributes.items())))


def catalogue_item_message(item: CatalogueItem) -> pb.CatalogueItem:
    fields = item.fields
    return pb.CatalogueItem(
        item_id=item.item_id,
        text=pb.ItemText(title=fields.title, categories=list(fields.categories), brand=fields.brand,
                         description=fields.description),
        attributes=dict(item.attributes),
    )
