"""Protobuf messages <-> server.domain types. Pure translation: checks live in server.validation."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import status_pb2

from llmrec.template import ItemFields, RequestContext
from llmrec.v1 import recommender_pb2 as pb

from llmrec.server.domain import (
    AttributeFilter, CatalogueItem, Explanation, HistoryRef, RecommendQuery, ScoredItem, UserInput,
)
from llmrec.server.errors import rich_status
from llmrec.server.session import (
    ContextEvent, InteractionEvent, QueryEvent, RejectionEvent, SessionConfigEvent, SessionEvent,
)

if TYPE_CHECKING:
    from llmrec.server.models import LoadAttempt


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
        rejected_item_ids=tuple(request.rejected_item_ids),
        min_score=request.min_score if request.HasField("min_score") else None,
        new_item_share=request.new_item_share if request.HasField("new_item_share") else None,
        force_full_path=request.force_full_path,
        ranking_stage=request.ranking_stage if request.HasField("ranking_stage") else None,
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
            rejected_item_ids=tuple(config.rejected_item_ids),
            min_score=config.min_score if config.HasField("min_score") else None,
            force_full_path=config.force_full_path,
        )
    if which == "interaction":
        return InteractionEvent(history_ref(request.interaction))
    if which == "context":
        return ContextEvent(context(request.context))
    if which == "query":
        return QueryEvent(request.query)
    if which == "rejection":
        return RejectionEvent(request.rejection)
    return None


def recommended_items(items: Iterable[ScoredItem]) -> list[pb.RecommendedItem]:
    return [pb.RecommendedItem(item_id=i.item_id, score=i.score, title=i.title, rank=i.rank,
                               explanation=explanation(i.explanation))
            for i in items]


_SERVING_PATHS = {"full": pb.SERVING_PATH_FULL, "fast": pb.SERVING_PATH_FAST}


def serving_path(path: str) -> int:
    """server.recommender's FULL_PATH / FAST_PATH -> the ServingPath value."""
    return _SERVING_PATHS[path]


def batch_result(outcome: list[ScoredItem] | Exception, path: str) -> pb.RecommendBatchResult:
    """One RecommendBatch entry: OK with its items and the path that made them, or the rich status of its error
    (server.errors)."""
    if isinstance(outcome, Exception):
        return pb.RecommendBatchResult(status=rich_status(outcome, "RecommendBatch"))
    return pb.RecommendBatchResult(status=status_pb2.Status(code=0), items=recommended_items(outcome),
                                   serving_path=serving_path(path))


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


def load_attempt_message(attempt: LoadAttempt | None) -> pb.ModelLoadAttempt | None:
    if attempt is None:
        return None
    finished = Timestamp()
    finished.FromNanoseconds(int(attempt.finished_at * 1e9))
    return pb.ModelLoadAttempt(bundle_path=attempt.bundle_path, trigger=attempt.trigger, ok=attempt.ok,
                               error=attempt.error, model_version=attempt.model_version, finished_at=finished,
                               seconds=attempt.seconds)
