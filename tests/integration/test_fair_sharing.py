"""Per-client fair sharing through the real server: session and in-flight caps per client (by identity, declared
client id or address), refusals with RetryInfo, session events that wait, and a flood that leaves another client
served."""

from __future__ import annotations

import asyncio
import queue
import time

import grpc
import pytest

from llmrec.server import metrics
from llmrec.server.security import hash_token
from llmrec.v1 import recommender_pb2 as pb
from llmrec.v1 import recommender_pb2_grpc as pb_grpc
from test_production_serving import details

HISTORY = [pb.HistoryItem(item_id=f"m{n}") for n in range(1, 21)]  # 20 items: a full-width user text


def as_client(name: str) -> tuple[tuple[str, str], ...]:
    return (("llmrec-client-id", name),)


def recommend(item: str = "m1", k: int = 5) -> pb.RecommendRequest:
    return pb.RecommendRequest(history=[pb.HistoryItem(item_id=item)], k=k)


def open_session(stub, metadata) -> tuple[object, pb.SessionResponse]:
    """A session stream (its calls made lock-step by a queue-fed iterator) and the answer to its first event."""
    requests: queue.Queue = queue.Queue()
    requests.put(pb.SessionRequest(event_id="1", query="space"))
    responses = stub.Session(iter(requests.get, None), timeout=60, metadata=metadata)
    responses.requests = requests
    return responses, next(responses)


def runs() -> float:
    return sum(metrics.RUNS.labels(lane)._value.get() for lane in ("alone", "parallel"))


def test_one_clients_sessions_are_capped_while_another_client_opens_its_own(start_server):
    running = start_server(max_sessions_per_client=2)
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        mine = [open_session(stub, as_client("a"))[0] for _ in range(2)]
        with pytest.raises(grpc.RpcError) as caught:
            open_session(stub, as_client("a"))
        error = caught.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "already holds its maximum of 2 live sessions" in error.details()
        found = details(error)
        assert found["info"].reason == "CLIENT_SESSION_LIMIT" and found["info"].metadata["client"] == "client-id:a"
        assert found["retry"].retry_delay.seconds == 5
        other, first = open_session(stub, as_client("b"))
        assert first.status.code == 0
        mine[0].cancel()  # ending one frees the client's slot
        deadline = time.monotonic() + 30
        while True:
            try:
                again, _ = open_session(stub, as_client("a"))
                break
            except grpc.RpcError:  # the server drops a cancelled stream a moment later
                assert time.monotonic() < deadline
                time.sleep(0.05)
        for stream in (mine[1], other, again):
            stream.cancel()


def test_a_client_past_its_in_flight_cap_is_refused_at_once_and_its_session_events_wait(start_server):
    running = start_server(max_inflight_per_client=1, max_recommend_batch=200)
    batch = pb.RecommendBatchRequest(requests=[pb.RecommendRequest(history=HISTORY[n % 5:], k=5)
                                               for n in range(200)])
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        session, _ = open_session(stub, as_client("a"))
        before = runs()
        holding = stub.RecommendBatch.future(batch, timeout=120, metadata=as_client("a"))
        while runs() == before:  # the batch is being encoded: it holds client a's one slot
            time.sleep(0.001)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Recommend(recommend(), timeout=30, metadata=as_client("a"))
        other = stub.Recommend(recommend(), timeout=30, metadata=as_client("b"))  # another client is served
        session.requests.put(pb.SessionRequest(event_id="2", interaction=pb.HistoryItem(item_id="m2")))
        event = next(session)  # waits for the slot, then is answered: an event is never refused for it
        finished_first = holding.done()
        assert all(result.status.code == 0 for result in holding.result().results)
        session.cancel()
    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "1 requests in flight" in error.details()
    found = details(error)
    assert found["info"].reason == "CLIENT_BUSY" and found["retry"].retry_delay.nanos == 200_000_000
    assert len(other.items) == 5 and event.status.code == 0 and len(event.items) == 10
    assert finished_first  # the event could only run once the batch had let go of the slot


def test_with_authorization_on_the_identity_decides_not_the_declared_id(start_server):
    tokens = {name: f"token-{name}-" + "x" * 32 for name in ("a", "b")}
    running = start_server(auth_tokens=[f"{name}@{hash_token(token)}=read" for name, token in tokens.items()],
                           max_sessions_per_client=1)

    def credentials(name: str, declared: str):
        return (("authorization", f"Bearer {tokens[name]}"), ("llmrec-client-id", declared))

    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        first, _ = open_session(stub, credentials("a", "one"))
        with pytest.raises(grpc.RpcError) as caught:  # another declared id does not make another client
            open_session(stub, credentials("a", "two"))
        assert details(caught.value)["info"].metadata["client"] == "identity:a"
        second, answer = open_session(stub, credentials("b", "one"))
        assert answer.status.code == 0
        first.cancel(), second.cancel()


def test_a_flooding_client_is_held_to_its_share_while_another_clients_requests_succeed(start_server):
    """Client "flood" opens more sessions than its cap and keeps them all busy, with concurrent Recommends on
    top; client "calm" sends its Recommends one at a time meanwhile. Bounded by counts, not time."""
    running = start_server(max_sessions_per_client=6, max_inflight_per_client=4)
    calm_requests = 10

    async def main():
        async with grpc.aio.insecure_channel(running.target) as channel:
            stub = pb_grpc.RecommenderStub(channel)
            calm_done = asyncio.Event()
            counts = {"session_refused": 0, "events_ok": 0, "recommend_ok": 0, "recommend_refused": 0}

            async def busy_session(n: int) -> None:
                """Lock step: the next event as soon as the last one is answered."""
                call = stub.Session(timeout=120, metadata=as_client("flood"))
                number = 0
                try:
                    while not calm_done.is_set():
                        number += 1
                        await call.write(pb.SessionRequest(event_id=str(number),
                                                           interaction=HISTORY[(n + number) % 20]))
                        response = await call.read()
                        if response is grpc.aio.EOF:
                            break
                        counts["events_ok"] += response.status.code == 0
                    await call.done_writing()
                except grpc.aio.AioRpcError:
                    pass  # refused: its status is read below
                code = await call.code()
                assert code in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED), await call.details()
                counts["session_refused"] += code == grpc.StatusCode.RESOURCE_EXHAUSTED

            async def busy_recommends() -> None:
                while not calm_done.is_set():
                    try:
                        await stub.Recommend(recommend(), timeout=60, metadata=as_client("flood"))
                        counts["recommend_ok"] += 1
                    except grpc.aio.AioRpcError as error:
                        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                        counts["recommend_refused"] += 1
                        await asyncio.sleep(0.01)

            flood = [asyncio.ensure_future(busy_session(n)) for n in range(10)]
            flood += [asyncio.ensure_future(busy_recommends()) for _ in range(8)]
            while counts["events_ok"] < 20:  # the flood is under way before the calm client starts
                await asyncio.sleep(0.01)
            answers = []
            for n in range(calm_requests):
                answers.append(await stub.Recommend(recommend(f"m{n + 1}"), timeout=60, metadata=as_client("calm")))
            calm_done.set()
            await asyncio.gather(*flood)
            return answers, counts

    answers, counts = asyncio.run(main())
    assert all(len(answer.items) == 5 for answer in answers) and len(answers) == calm_requests
    assert counts["session_refused"] == 4  # ten sessions asked for, six allowed
    assert counts["recommend_refused"] > 0 and counts["events_ok"] >= 20
