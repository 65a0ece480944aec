"""Live sessions through the real gRPC server: ids, ForgetSession, the session cap, the cached user vector,
explanations and filters inside a session."""

from __future__ import annotations

import queue

import grpc
import pytest

from llmrec.v1 import recommender_pb2 as pb
from llmrec.v1 import recommender_pb2_grpc as pb_grpc
from rpc_helpers import ids_of

OK = 0


class LiveSession:
    """Lock-step driver for the bidirectional Session stream."""

    def __init__(self, stub: pb_grpc.RecommenderStub, timeout: float = 30) -> None:
        self._requests: queue.Queue = queue.Queue()
        self.responses = stub.Session(iter(self._requests.get, None), timeout=timeout)

    def send(self, event_id: str = "", **event) -> pb.SessionResponse:
        self._requests.put(pb.SessionRequest(event_id=event_id, **event))
        return next(self.responses)

    def close(self) -> list[pb.SessionResponse]:
        self._requests.put(None)
        return list(self.responses)


def test_every_response_carries_the_server_assigned_session_id(stub):
    first, second = LiveSession(stub), LiveSession(stub)
    a = [first.send("1", config=pb.SessionConfig(k=3)), first.send("2", interaction=pb.HistoryItem(item_id="m1")),
         first.send("3", interaction=pb.HistoryItem(item_id="nope"))]
    b = second.send("1", query="comedy")
    assert len({r.session_id for r in a}) == 1 and len(a[0].session_id) >= 20
    assert b.session_id and b.session_id != a[0].session_id
    assert a[2].status.code == grpc.StatusCode.NOT_FOUND.value[0] and a[2].session_id == a[0].session_id
    first.close(), second.close()


def test_forget_session_ends_the_stream_and_drops_its_state(stub):
    live = LiveSession(stub)
    session_id = live.send("1", interaction=pb.HistoryItem(item_id="m1")).session_id
    assert stub.ForgetSession(pb.ForgetSessionRequest(session_id=session_id), timeout=10) == pb.ForgetSessionResponse()
    with pytest.raises(grpc.RpcError) as caught:
        next(live.responses)  # ends without another event being sent
    assert caught.value.code() == grpc.StatusCode.ABORTED and "ForgetSession" in caught.value.details()
    with pytest.raises(grpc.RpcError) as again:
        stub.ForgetSession(pb.ForgetSessionRequest(session_id=session_id), timeout=10)
    assert again.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as empty:
        stub.ForgetSession(pb.ForgetSessionRequest(), timeout=10)
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_sessions_are_capped_server_wide(start_server):
    capped = start_server(max_sessions=2, max_sessions_per_client=2)  # one client may take them all here
    with grpc.insecure_channel(capped.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        first, second = LiveSession(stub), LiveSession(stub)
        assert first.send("1", query="space").status.code == OK
        assert second.send("1", query="space").status.code == OK
        third = LiveSession(stub)
        with pytest.raises(grpc.RpcError) as caught:
            third.send("1", query="space")
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "2 live sessions" in caught.value.details()
        assert first.close() == []  # ending one frees its slot
        fourth = LiveSession(stub)
        assert fourth.send("1", query="space").status.code == OK
        second.close(), fourth.close()


def test_an_event_that_keeps_the_user_text_costs_no_inference(start_server):
    """k and exclusions reuse the session's cached user vector; an interaction costs one inference."""
    private = start_server()
    recommender = private.server.recommender
    calls: list[str] = []
    original = recommender.encode_user

    async def counting(text):
        calls.append(text)
        return await original(text)

    recommender.encode_user = counting
    with grpc.insecure_channel(private.target) as channel:
        live = LiveSession(pb_grpc.RecommenderStub(channel))
        configured = live.send("c", config=pb.SessionConfig(k=10, history=[pb.HistoryItem(item_id=i)
                                                                          for i in ("m1", "m2", "m3")]))
        assert len(calls) == 1
        smaller = live.send("k", config=pb.SessionConfig(k=4))
        excluded = live.send("x", config=pb.SessionConfig(k=4, exclude_item_ids=[configured.items[0].item_id]))
        assert len(calls) == 1  # no inference for either
        assert ids_of(smaller.items) == ids_of(configured.items)[:4]
        assert ids_of(excluded.items) == ids_of(configured.items)[1:5]
        for n, item_id in enumerate(("m4", "m5", "m6"), 2):
            assert live.send(item_id, interaction=pb.HistoryItem(item_id=item_id)).history_length == n + 2
            assert len(calls) == n
        assert "Alien (1979)" in calls[-2] and calls[-1].startswith("recently: 2001: A Space Odyssey")
        live.close()


def test_session_explanations_and_filters(stub, tiny_catalogue):
    fields = dict(tiny_catalogue)
    live = LiveSession(stub)
    response = live.send("c", config=pb.SessionConfig(
        k=3, explain=True, exclude_history=True, history=[pb.HistoryItem(item_id="m27")],
        filters=[pb.AttributeFilter(key="category", values=["Romance"])]))
    assert response.status.code == OK and len(response.items) == 3
    assert all("Romance" in fields[i.item_id].categories and i.item_id != "m27" for i in response.items)
    for item in response.items:
        assert item.explanation.summary.startswith("Because you liked Titanic (1997)")
        assert item.explanation.reasons[0].item_id == "m27"
    with_query = live.send("q", query="funny")
    reasons = {r.text for i in with_query.items for r in i.explanation.reasons}
    assert "funny" in reasons
    plain = live.send("p", config=pb.SessionConfig(k=3))
    assert not any(i.HasField("explanation") for i in plain.items)
    live.close()


def test_sessions_see_catalogue_changes(state_server):
    with grpc.insecure_channel(state_server.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        live = LiveSession(stub)
        assert live.send("q", query="deep sea documentary").status.code == OK
        stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.CatalogueItem(
            item_id="abyss", text=pb.ItemText(title="Blue Planet (2001)", categories=["Documentary", "Ocean"],
                                              description="Deep sea creatures of the ocean floor."))]), timeout=10)
        after = live.send("k", config=pb.SessionConfig(k=3))  # cached vector, fresh catalogue
        assert after.items[0].item_id == "abyss" and after.index_version.endswith(":r1")
        assert live.send("i", interaction=pb.HistoryItem(item_id="abyss")).status.code == OK
        stub.DeleteItems(pb.DeleteItemsRequest(item_ids=["abyss"]), timeout=10)
        gone = live.send("k2", config=pb.SessionConfig(k=3))
        assert gone.status.code == OK and "abyss" not in ids_of(gone.items)
        assert gone.history_length == 1  # the history keeps the text it was given
        live.close()
