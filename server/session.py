"""A live recommendation session: state that events update, and a fresh ranking after each event.

Semantics (documented for callers in the proto comments and here):
- config: sets k (0 = the server default), exclusions and exclude_history; a non-empty config.history
  replaces the session history, an empty one keeps it.
- interaction: appends one item to the history. The session keeps the most recent max_request_history
  items; older ones fall off (the model only reads the most recent few anyway).
- context: replaces the whole context, its query included.
- query: replaces only the query ("" clears it).
An event that fails (unknown id, bad k, oversized text, or an internal error) leaves the state as it was.
"""

from __future__ import annotations

import dataclasses

from llmrec.template import RequestContext

from server import validation
from server.domain import HistoryRef, RecommendQuery, ScoredItem, UserInput
from server.errors import InvalidArgument
from server.recommender import Recommender

NOTHING_YET_MESSAGE = "nothing to recommend from yet: send an interaction or a query"


@dataclasses.dataclass(frozen=True)
class SessionConfigEvent:
    k: int = 0
    exclude_item_ids: frozenset[str] = frozenset()
    exclude_history: bool = False
    history: tuple[HistoryRef, ...] = ()


@dataclasses.dataclass(frozen=True)
class InteractionEvent:
    item: HistoryRef


@dataclasses.dataclass(frozen=True)
class ContextEvent:
    context: RequestContext


@dataclasses.dataclass(frozen=True)
class QueryEvent:
    query: str


SessionEvent = SessionConfigEvent | InteractionEvent | ContextEvent | QueryEvent


@dataclasses.dataclass(frozen=True)
class SessionState:
    """Everything a session remembers. Immutable: an event yields a new state, committed only if valid."""

    k: int
    history: tuple[HistoryRef, ...] = ()
    context: RequestContext = RequestContext()
    exclude_item_ids: frozenset[str] = frozenset()
    exclude_history: bool = False

    @property
    def has_content(self) -> bool:
        return bool(self.history) or bool(self.context.query.strip())

    def to_query(self) -> RecommendQuery:
        return RecommendQuery(
            user=UserInput(history=self.history, context=self.context),
            k=self.k,
            exclude_item_ids=self.exclude_item_ids,
            exclude_history=self.exclude_history,
        )


@dataclasses.dataclass(frozen=True)
class SessionUpdate:
    """The answer to one event: the new ranking (empty while there is nothing to rank from)."""

    items: list[ScoredItem]
    history_length: int
    message: str = ""


class Session:
    """One client's session against a recommender.

    Args:
        recommender: the core that ranks.
        default_k: k until a config event sets one.
    """

    def __init__(self, recommender: Recommender, default_k: int) -> None:
        self.recommender = recommender
        self.default_k = default_k
        self.state = SessionState(k=default_k)

    def apply(self, event: SessionEvent) -> SessionState:
        """The state after `event`, checked; self.state is not touched.

        Raises:
            InvalidArgument, NotFound: the event is bad; the session state stays as it was.
        """
        limits = self.recommender.limits
        state = self.state
        if isinstance(event, SessionConfigEvent):
            k = event.k or self.default_k
            validation.check_k(k, limits, "config.k")
            for item_id in event.exclude_item_ids:
                validation.check_text(item_id, "config.exclude_item_ids[]", limits)
            validation.check_history(event.history, limits, "config.history")
            self.recommender.resolve_history(event.history)
            state = dataclasses.replace(
                state, k=k, exclude_item_ids=event.exclude_item_ids, exclude_history=event.exclude_history,
                history=event.history or state.history,
            )
        elif isinstance(event, InteractionEvent):
            validation.check_history_ref(event.item, "interaction", limits)
            self.recommender.resolve_history([event.item])
            history = (*state.history, event.item)[-limits.max_request_history:]
            state = dataclasses.replace(state, history=history)
        elif isinstance(event, ContextEvent):
            validation.check_context(event.context, limits)
            state = dataclasses.replace(state, context=event.context)
        elif isinstance(event, QueryEvent):
            validation.check_text(event.query, "query", limits)
            state = dataclasses.replace(state, context=dataclasses.replace(state.context, query=event.query))
        else:
            raise InvalidArgument("the event sets none of config, interaction, context and query")
        return state

    async def handle(self, event: SessionEvent) -> SessionUpdate:
        """Apply one event and rank again.

        Raises:
            InvalidArgument, NotFound: the event is bad. On any error the session state stays as it was.
        """
        state = self.apply(event)
        if not state.has_content:
            self.state = state
            return SessionUpdate(items=[], history_length=0, message=NOTHING_YET_MESSAGE)
        items = await self.recommender.recommend(state.to_query())
        self.state = state  # committed only once the event has been fully answered
        return SessionUpdate(items=items, history_length=len(state.history))
