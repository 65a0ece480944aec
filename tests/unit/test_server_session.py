"""Session state transitions, incremental cost and the registry, with a stand-in for the recommender core."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from llmrec.template import ItemFields, RequestContext, UserText, render_user
from llmrec.server.catalogue import ResolvedItem
from llmrec.server.domain import AttributeFilter, HistoryRef, ScoredItem
from llmrec.server.errors import Aborted, InvalidArgument, NotFound, ResourceExhausted
from llmrec.server.session import (
    NOTHING_YET_MESSAGE, ContextEvent, InteractionEvent, QueryEvent, RejectionEvent, Session, SessionConfigEvent,
    SessionRegistry,
)
from llmrec.server.validation import Limits


class FakeRecommender:
    """Knows ids "a".."e"; records what it is asked to resolve, encode and search."""

    limits = Limits(max_k=10, max_request_history=3, max_text_chars=50, max_rejected_items=3)
    max_history_items = 2
    catalogue = set("abcde")

    def __init__(self) -> None:
        self.resolved: list[int] = []  # how many refs each resolve call got
        self.encoded: list[str] = []
        self.searches: list[tuple] = []

    def resolve(self, history, with_window_vectors=False):
        self.resolved.append(len(history))
        unknown = [ref.item_id for ref in history if ref.item_id is not None and ref.item_id not in self.catalogue]
        if unknown:
            raise NotFound(f"unknown item id {unknown[0]!r}")
        return [ResolvedItem(ref.item_id, ref.text or ItemFields(f"Film {ref.item_id}", ("Drama",)))
                for ref in history]

    def path_for(self, catalogued_history, context, force_full_path=False):
        return "full"  # the fast path is tested through the real server (tests/integration/test_fast_path.py)

    async def encode_user(self, text):
        self.encoded.append(text)
        return np.ones(4, dtype=np.float32)

    def search(self, vector, k, exclude_ids, filters, history_ids, rejected_ids=(), min_score=None):
        self.searches.append((k, frozenset(exclude_ids), tuple(filters)))
        self.history_ids = tuple(history_ids)
        self.rejected_ids, self.min_score = tuple(rejected_ids), min_score
        return [ScoredItem(item_id=i, score=1.0, title=i, rank=n) for n, i in enumerate("abcde"[:k], 1)]


def handle(session: Session, event):
    return asyncio.run(session.handle(event))


@pytest.fixture
def session() -> Session:
    return Session(FakeRecommender(), default_k=4, session_id="s1")


def ref(item_id: str) -> HistoryRef:
    return HistoryRef(item_id=item_id)


def test_nothing_to_rank_until_there_is_history_or_a_query(session):
    update = handle(session, SessionConfigEvent(k=2))
    assert update.items == [] and update.message == NOTHING_YET_MESSAGE
    assert session.recommender.encoded == []
    assert len(handle(session, QueryEvent("space")).items) == 2


def test_the_user_text_is_exactly_what_render_user_gives(session):
    """Kept parts joined per event == rendering the whole history and context from scratch."""
    events = [InteractionEvent(ref("a")), InteractionEvent(HistoryRef(text=ItemFields("Raw", ("Sci-Fi",)))),
              QueryEvent("space"), ContextEvent(RequestContext(device="tv", timestamp=880000000.0)),
              QueryEvent("comedy"), InteractionEvent(ref("b")), InteractionEvent(ref("c"))]
    fields = []
    for event in events:
        handle(session, event)
        if isinstance(event, InteractionEvent):
            fields.append(event.item.text or ItemFields(f"Film {event.item.item_id}", ("Drama",)))
        expected = render_user(UserText(fields, session.state.context), max_history_items=2)
        assert session.recommender.encoded[-1] == expected
    assert session.state.context == RequestContext(device="tv", timestamp=880000000.0, query="comedy")
    assert session.state.history_length == 3  # max_request_history


def test_an_interaction_resolves_one_item_and_encodes_once(session):
    handle(session, SessionConfigEvent(history=(ref("a"), ref("b"), ref("c"))))
    assert session.recommender.resolved == [3]
    for item_id in "dede":
        handle(session, InteractionEvent(ref(item_id)))
    assert session.recommender.resolved == [3, 1, 1, 1, 1]  # never the whole history again
    assert session.encodes == 5 and len(session.state.window) == 2
    # the bounded history (max_request_history 3 here) reaches the search, for the history item score
    assert session.recommender.history_ids == session.state.history_ids == tuple("ede")


def test_events_that_keep_the_user_text_reuse_the_cached_vector(session):
    handle(session, InteractionEvent(ref("a")))
    handle(session, SessionConfigEvent(k=2, exclude_item_ids=frozenset({"b"}), exclude_history=True))
    handle(session, SessionConfigEvent(k=3, explain=False, filters=(AttributeFilter("category", ("x",)),)))
    handle(session, QueryEvent(""))  # clearing an empty query changes nothing
    assert session.encodes == 1 and len(session.recommender.encoded) == 1
    assert session.recommender.searches[1] == (2, frozenset({"a", "b"}), ())
    assert session.recommender.searches[2][2] == (AttributeFilter("category", ("x",)),)
    handle(session, QueryEvent("space"))
    assert session.encodes == 2


def test_config_keeps_history_unless_it_brings_one(session):
    handle(session, InteractionEvent(ref("a")))
    handle(session, SessionConfigEvent(k=2, exclude_item_ids=frozenset({"b"}), exclude_history=True))
    assert session.state.history_ids == ("a",) and session.state.k == 2
    assert session.state.exclude_item_ids == {"b"} and session.state.exclude_history
    handle(session, SessionConfigEvent(history=(ref("c"), ref("d"))))
    assert session.state.history_ids == ("c", "d") and session.state.k == 4  # k 0 = default


def test_rejections_accumulate_without_inference_until_a_config_replaces_them(session):
    handle(session, InteractionEvent(ref("a")))
    for item_id in ("b", "zz", "b"):  # unknown ids are kept (the ranking ignores them); repeats count once
        handle(session, RejectionEvent(item_id))
    assert session.state.rejected_ids == ("b", "zz") and session.recommender.rejected_ids == ("b", "zz")
    assert session.encodes == 1  # a rejection leaves the user text, and so the cached vector, as they were
    handle(session, SessionConfigEvent(k=2, min_score=0.25))  # an empty list keeps them
    assert session.state.rejected_ids == ("b", "zz") and session.recommender.min_score == 0.25
    handle(session, SessionConfigEvent(rejected_item_ids=("c", "c", "d")))
    assert session.state.rejected_ids == ("c", "d") and session.state.min_score is None
    handle(session, RejectionEvent("e"))
    with pytest.raises(InvalidArgument, match="already holds 3 rejected items") as caught:
        handle(session, RejectionEvent("a"))
    assert caught.value.field == "rejection" and session.state.rejected_ids == ("c", "d", "e")


def test_history_keeps_the_most_recent_items(session):
    for item_id in "abcde":
        update = handle(session, InteractionEvent(ref(item_id)))
    assert update.history_length == 3 and session.state.history_ids == ("c", "d", "e")
    assert [entry.resolved.item_id for entry in session.state.window] == ["d", "e"]


@pytest.mark.parametrize("event, error", [
    (InteractionEvent(ref("zz")), NotFound),
    (InteractionEvent(HistoryRef()), InvalidArgument),
    (SessionConfigEvent(k=11), InvalidArgument),
    (SessionConfigEvent(k=-1), InvalidArgument),
    (SessionConfigEvent(history=(ref("a"), ref("zz"))), NotFound),
    (SessionConfigEvent(filters=(AttributeFilter("", ("x",)),)), InvalidArgument),
    (SessionConfigEvent(filters=(AttributeFilter("category", ()),)), InvalidArgument),
    (ContextEvent(RequestContext(device="d" * 51)), InvalidArgument),
    (QueryEvent("q" * 51), InvalidArgument),
    (RejectionEvent(""), InvalidArgument),
    (SessionConfigEvent(rejected_item_ids=("a", "")), InvalidArgument),
    (SessionConfigEvent(rejected_item_ids=tuple("abcd")), InvalidArgument),
    (SessionConfigEvent(min_score=float("nan")), InvalidArgument),
    (None, InvalidArgument),
])
def test_a_bad_event_leaves_the_state_unchanged(session, event, error):
    handle(session, InteractionEvent(ref("a")))
    before = session.state
    with pytest.raises(error):
        handle(session, event)
    assert session.state is before


def test_a_failed_ranking_leaves_the_state_unchanged(session):
    handle(session, InteractionEvent(ref("a")))
    before = session.state

    def broken(*args):
        raise RuntimeError("index on fire")

    session.recommender.search = broken
    with pytest.raises(RuntimeError):
        handle(session, InteractionEvent(ref("b")))
    assert session.state is before


def test_forget_drops_the_state_and_refuses_later_events(session):
    handle(session, InteractionEvent(ref("a")))
    session.forget()
    assert session.state.history_ids == () and session.state.window == ()
    with pytest.raises(Aborted, match="ForgetSession"):
        handle(session, InteractionEvent(ref("b")))


def test_forget_during_an_event_wins(session):
    """ForgetSession while an event awaits inference: that event must not bring the state back."""
    original = session.recommender.encode_user

    async def slow_encode(text):
        session.forget()
        return await original(text)

    session.recommender.encode_user = slow_encode
    with pytest.raises(Aborted):
        handle(session, InteractionEvent(ref("a")))
    assert session.state.history_ids == ()


def test_registry_caps_each_clients_sessions_and_frees_them_on_close_and_forget():
    registry = SessionRegistry(max_sessions=10, max_per_client=2)
    recommender = FakeRecommender()
    first, second = registry.open(recommender, 4, "peer:a"), registry.open(recommender, 4, "peer:a")
    with pytest.raises(ResourceExhausted, match="already holds its maximum of 2") as caught:
        registry.open(recommender, 4, "peer:a")
    assert caught.value.reason == "CLIENT_SESSION_LIMIT" and caught.value.retry_after_s > 0
    registry.open(recommender, 4, "peer:b")  # another client is not held back
    registry.forget(first.id)
    third = registry.open(recommender, 4, "peer:a")
    registry.close(second), registry.close(third), registry.close(first)  # closing a forgotten one frees nothing
    assert registry._per_client == {"peer:b": 1}


def test_registry_caps_sessions_and_forgets_by_id():
    registry = SessionRegistry(max_sessions=2)
    recommender = FakeRecommender()
    first, second = registry.open(recommender, 4), registry.open(recommender, 4)
    assert first.id != second.id and len(first.id) >= 20 and len(registry) == 2
    with pytest.raises(ResourceExhausted, match="maximum of 2"):
        registry.open(recommender, 4)
    registry.forget(first.id)
    assert first.forgotten and len(registry) == 1
    with pytest.raises(NotFound):
        registry.forget(first.id)
    with pytest.raises(InvalidArgument):
        registry.forget("")
    registry.close(second)
    assert len(registry) == 0
    registry.open(recommender, 4)  # a slot is free again


def test_next_request_times_out_ends_and_is_woken_by_forget(session):
    async def scenario():
        async def requests(items, delay=0.0):
            for item in items:
                await asyncio.sleep(delay)
                yield item

        assert await session.next_request(aiter(requests(["x"])), 1.0) == "x"
        assert await session.next_request(aiter(requests([])), 1.0) is None
        from llmrec.server.errors import DeadlineExceeded
        with pytest.raises(DeadlineExceeded, match="0.05 s"):
            await session.next_request(aiter(requests(["late"], delay=1.0)), 0.05)
        asyncio.get_running_loop().call_later(0.05, session.forget)
        with pytest.raises(Aborted):
            await session.next_request(aiter(requests(["late"], delay=5.0)), 10.0)
        session.close()

    asyncio.run(scenario())
