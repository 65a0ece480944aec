"""Protobuf -> domain translation."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from llmrec.template import ItemFields, RequestContext
from llmrec.v1 import recommender_pb2 as pb
from llmrec.server import convert
from llmrec.server.domain import HistoryRef
from llmrec.server.session import ContextEvent, InteractionEvent, QueryEvent, SessionConfigEvent


def test_recommend_request():
    request = pb.RecommendRequest(
        history=[pb.HistoryItem(item_id="7"), pb.HistoryItem(text=pb.ItemText(title="T", categories=["a", "b"],
                                                                                 brand="B", description="D")),
                 pb.HistoryItem()],
        context=pb.Context(timestamp=Timestamp(seconds=1_700_000_000, nanos=500_000_000), utc_offset_minutes=-300,
                           device="tv", locale="fr-FR", query="q"),
        k=3, exclude_item_ids=["x", "x", "y"], exclude_history=True,
    )
    query = convert.recommend_query(request)
    assert query.user.history == (HistoryRef(item_id="7"), HistoryRef(text=ItemFields("T", ("a", "b"), "B", "D")),
                                  HistoryRef())
    assert query.user.context == RequestContext(1_700_000_000.5, -300, "tv", "fr-FR", "q")
    assert query.k == 3 and query.exclude_item_ids == {"x", "y"} and query.exclude_history


def test_unset_timestamp_is_none_not_the_epoch():
    assert convert.context(pb.Context()).timestamp is None
    assert convert.context(pb.Context(timestamp=Timestamp())).timestamp == 0.0


def test_session_events():
    assert isinstance(convert.session_event(pb.SessionRequest(config=pb.SessionConfig(k=2))), SessionConfigEvent)
    assert convert.session_event(pb.SessionRequest(interaction=pb.HistoryItem(item_id="a"))) == InteractionEvent(
        HistoryRef(item_id="a"))
    assert isinstance(convert.session_event(pb.SessionRequest(context=pb.Context())), ContextEvent)
    assert convert.session_event(pb.SessionRequest(query="")) == QueryEvent("")  # "" clears, still an event
    assert convert.session_event(pb.SessionRequest(event_id="1")) is None
