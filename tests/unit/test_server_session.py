"""Session state transitions, with a stand-in for the recommender core."""

from __future__ import annotations

import asyncio

import pytest

from llmrec.template import ItemFields, RequestContext
from server.domain import HistoryRef, ScoredItem
from server.errors import InvalidArgument, NotFound
from server.session import (
    NOTHING_YET_MESSAGE, ContextEvent, InteractionEvent, QueryEvent, Session, SessionConfigEvent,
)
from server.validation import Limits


class FakeRecommender:
    """Knows ids "a".."e"; recommends the history ids in reverse, k of them, and records the queries."""

    limits = Limits(max_k=10, max_request_history=3, max_text_chars=50)
    catalogue = set("abcde")

    def __init__(self) -> None:
        self.queries = []

    def resolve_history(self, history):
        unknown = [ref.item_id for ref in history if ref.item_id is not None and ref.item_id not in self.catalogue]
        if unknown:
            raise NotFound(f"unknown item id {unknown[0]!r}")
        return [ref.text or ItemFields(ref.item_id) for ref in history]

    async def recommend(self, query):
        self.queries.append(query)
        return [ScoredItem(item_id=i, score=1.0, title=i, rank=1) for i in "abcde"[: query.k]]


def handle(session: Session, event):
    return asyncio.run(session.handle(event))


@pytest.fixture
def session() -> Session:
    return Session(FakeRecommender(), default_k=4)


def ref(item_id: str) -> HistoryRef:
    return HistoryRef(item_id=item_id)


def test_nothing_to_rank_until_there_is_history_or_a_query(session):
    update = handle(session, SessionConfigEvent(k=2))
    assert update.items == [] and update.message == NOTHING_YET_MESSAGE
    assert session.recommender.queries == []
    assert len(handle(session, QueryEvent("space")).items) == 2


def test_events_update_the_state(session):
    handle(session, InteractionEvent(ref("a")))
    handle(session, InteractionEvent(HistoryRef(text=ItemFields("Raw"))))
    handle(session, QueryEvent("space"))
    update = handle(session, ContextEvent(RequestContext(device="tv")))  # replaces the query too
    query = session.recommender.queries[-1]
    assert update.history_length == 2 and query.k == 4
    assert query.user.context == RequestContext(device="tv")
    handle(session, QueryEvent("comedy"))
    assert session.recommender.queries[-1].user.context == RequestContext(device="tv", query="comedy")


def test_config_keeps_history_unless_it_brings_one(session):
    handle(session, InteractionEvent(ref("a")))
    handle(session, SessionConfigEvent(k=2, exclude_item_ids=frozenset({"b"}), exclude_history=True))
    assert session.state.history == (ref("a"),) and session.state.k == 2
    assert session.state.exclude_item_ids == {"b"} and session.state.exclude_history
    handle(session, SessionConfigEvent(history=(ref("c"), ref("d"))))
    assert session.state.history == (ref("c"), ref("d")) and session.state.k == 4  # k 0 = default


def test_history_keeps_the_most_recent_items(session):
    for item_id in "abcde":
        update = handle(session, InteractionEvent(ref(item_id)))
    assert update.history_length == 3 and session.state.history == (ref("c"), ref("d"), ref("e"))


@pytest.mark.parametrize("event, error", [
    (InteractionEvent(ref("zz")), NotFound),
    (InteractionEvent(HistoryRef()), InvalidArgument),
    (SessionConfigEvent(k=11), InvalidArgument),
    (SessionConfigEvent(k=-1), InvalidArgument),
    (SessionConfigEvent(history=(ref("a"), ref("zz"))), NotFound),
    (ContextEvent(RequestContext(device="d" * 51)), InvalidArgument),
    (QueryEvent("q" * 51), InvalidArgument),
    (None, InvalidArgument),
])
def test_a_bad_event_leaves_the_state_unchanged(session, event, error):
    handle(session, InteractionEvent(ref("a")))
    before = session.state
    with pytest.raises(error):
        handle(session, event)
    assert session.state == before


def test_a_failed_ranking_leaves_the_state_unchanged(session):
    handle(session, InteractionEvent(ref("a")))
    before = session.state

    async def broken(query):
        raise RuntimeError("index on fire")

    session.recommender.recommend = broken
    with pytest.raises(RuntimeError):
        handle(session, InteractionEvent(ref("b")))
    assert session.state == before
