"""clients.client message builders."""

from __future__ import annotations

import datetime as dt

import pytest

from llmrec.clients.client import RecommenderClient, history_item, item_text, timestamp
from llmrec.v1 import recommender_pb2 as pb


def test_history_items_from_ids_mappings_and_messages():
    assert history_item("50") == pb.HistoryItem(item_id="50")
    assert history_item({"title": "T", "categories": ["a"]}) == pb.HistoryItem(
        text=pb.ItemText(title="T", categories=["a"]))
    message = pb.HistoryItem(text=pb.ItemText(title="x"))
    assert history_item(message) is message
    assert item_text("Only a title") == pb.ItemText(title="Only a title")
    with pytest.raises(ValueError, match="unknown item text fields"):
        item_text({"titel": "typo"})


def test_timestamps():
    assert timestamp(None) is None
    assert timestamp(1.5).seconds == 1 and timestamp(1.5).nanos == 500_000_000
    naive = timestamp(dt.datetime(2024, 1, 1, 12))
    assert naive.seconds == int(dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone.utc).timestamp())
    aware = timestamp(dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=2))))
    assert naive.seconds - aware.seconds == 7200


def test_build_request():
    request = RecommenderClient.build_request(["1", {"title": "T"}], k=3, query="q", device="tv",
                                              exclude=["9"], exclude_history=True, page_size=2)
    assert [h.WhichOneof("item") for h in request.history] == ["item_id", "text"]
    assert (request.k, request.context.query, request.context.device) == (3, "q", "tv")
    assert list(request.exclude_item_ids) == ["9"] and request.exclude_history and request.page_size == 2
    assert not request.context.HasField("timestamp")
