"""Soak: a real server process answering a mix of every RPC, with sessions opened and abandoned, for a fixed
number of iterations; its resident memory may not grow by more than 10% between the end of warm-up and the end.

Sessions are abandoned three ways in turn (cancelled mid-stream, ended by ForgetSession, half-closed after one
event) on a server whose session cap (--max-sessions 8) is far below the iteration count: a session the server
failed to drop would soon refuse new ones, so the count check catches leaks too small to show in RSS.

Size: LLMREC_SOAK_ITERATIONS iterations after warm-up (60 in `make test`, 1,500 in `make soak`), RSS in soak.json.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import grpc
import pytest

from llmrec.item_record import read_items
from llmrec.v1 import recommender_pb2 as pb
from llmrec.v1 import recommender_pb2_grpc as pb_grpc

from fault_helpers import CALL_TIMEOUT_S, ServerProcess, report_dir, size, write_report

ITERATIONS = size("LLMREC_SOAK_ITERATIONS", 60)
WARMUP = 40  # iterations before the first RSS sample: every code path and padded length has run by then
MAX_GROWTH = 0.10
MAX_SESSIONS = 8
TINY_IDS = [item_id for item_id, _ in read_items(Path(__file__).parents[1] / "fixtures" / "tiny" / "items.jsonl")]
QUERIES = ["space adventure", "a quiet drama", "funny cartoon for kids", "", "war film", "ünïcode 🎬"]


def history(rng: random.Random, length: int) -> list[pb.HistoryItem]:
    return [pb.HistoryItem(item_id=rng.choice(TINY_IDS)) for _ in range(length)]


def session_round(stub: pb_grpc.RecommenderStub, rng: random.Random, iteration: int, counts: dict) -> None:
    """Open a session, send events, abandon it one of three ways. Retries (a bounded number of times) while the
    cap is reached: the server drops an abandoned session asynchronously, so the cap may lag by a moment."""
    for attempt in range(100):
        config = pb.SessionRequest(event_id="c", config=pb.SessionConfig(k=5, history=history(rng, 3)))
        interaction = pb.SessionRequest(event_id="i", interaction=pb.HistoryItem(item_id=rng.choice(TINY_IDS)))
        query = pb.SessionRequest(event_id="q", query=rng.choice(QUERIES))
        way = iteration % 3
        try:
            release = threading.Event()  # holds the stream open (no half-close) until the call is abandoned

            def events(*sent: pb.SessionRequest):
                yield from sent
                release.wait(CALL_TIMEOUT_S)

            if way == 0:  # cancelled mid-stream, never half-closed
                call = stub.Session(events(config, interaction), timeout=CALL_TIMEOUT_S)
                next(call)
                next(call)
                call.cancel()
                release.set()
            elif way == 1:  # ended by ForgetSession
                call = stub.Session(events(config, query), timeout=CALL_TIMEOUT_S)
                first = next(call)
                next(call)
                stub.ForgetSession(pb.ForgetSessionRequest(session_id=first.session_id), timeout=CALL_TIMEOUT_S)
                try:
                    for _ in call:
                        pass
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.ABORTED, error
                call.cancel()
                release.set()
            else:  # three events, then half-close and read to the end
                for response in stub.Session(iter([config, interaction, query]), timeout=CALL_TIMEOUT_S):
                    assert response.status.code == 0, response.status
            counts["sessions"] += 1
            return
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            counts["session_cap_waits"] += 1
            time.sleep(0.05)
    raise AssertionError(f"the server kept refusing sessions (cap {MAX_SESSIONS}) after 100 tries: abandoned "
                         "sessions are not being dropped")


def free_session_slots(stub: pb_grpc.RecommenderStub) -> int:
    """Open sessions until the cap refuses one (or all MAX_SESSIONS are open), then abandon them: how many
    opened. After a soak every slot must be free again, or abandoned sessions leaked."""
    release = threading.Event()
    calls = []

    def events():
        yield pb.SessionRequest(event_id="slot", query="slot")
        release.wait(CALL_TIMEOUT_S)

    try:
        for _ in range(MAX_SESSIONS):
            call = stub.Session(events(), timeout=CALL_TIMEOUT_S)
            calls.append(call)
            try:
                next(call)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                return len(calls) - 1
        return len(calls)
    finally:
        for call in calls:
            call.cancel()
        release.set()


def iteration(stub: pb_grpc.RecommenderStub, rng: random.Random, n: int, counts: dict) -> None:
    timeout = CALL_TIMEOUT_S
    context = pb.Context(query=rng.choice(QUERIES))
    response = stub.Recommend(pb.RecommendRequest(history=history(rng, rng.randint(1, 6)), context=context, k=10,
                                                  explain=n % 4 == 0), timeout=timeout)
    assert len(response.items) == 10
    stream = stub.RecommendStream(pb.RecommendRequest(history=history(rng, 2), k=30, page_size=3), timeout=timeout)
    next(stream)  # one page, then the stream is abandoned
    stream.cancel()
    stub.Embed(pb.EmbedRequest(items=[pb.ItemText(title=f"Soak film {n}")],
                               users=[pb.UserInput(history=history(rng, 2), context=context)]), timeout=timeout)
    stub.GetItem(pb.GetItemRequest(item_id=rng.choice(TINY_IDS), include_vector=n % 2 == 0), timeout=timeout)
    stub.ListItems(pb.ListItemsRequest(page_size=10), timeout=timeout)
    stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout)
    # Catalogue churn over a bounded set of ids: replaced, deleted and re-created, so the live catalogue stays
    # the same size and any growth is the server's.
    soak_id = f"soak-{n % 10}"
    stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.CatalogueItem(
        item_id=soak_id, text=pb.ItemText(title=f"Soak item {n}", categories=["Soak"]),
        attributes={"n": str(n % 7)})]), timeout=timeout)
    if n % 2:
        stub.DeleteItems(pb.DeleteItemsRequest(item_ids=[soak_id]), timeout=timeout)
    try:  # an error path: unknown item
        stub.Recommend(pb.RecommendRequest(history=[pb.HistoryItem(item_id=f"no-such-{n}")], k=5), timeout=timeout)
        raise AssertionError("an unknown id was accepted")
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND, error
    session_round(stub, rng, n, counts)
    counts["iterations"] += 1


@pytest.mark.timeout(600 + 10 * (WARMUP + ITERATIONS))  # generous: a loaded 2-core machine runs ~3 s an iteration
def test_memory_stays_flat_under_a_mixed_load_with_abandoned_sessions(tiny_bundle: Path, tmp_path: Path):
    server = ServerProcess(tiny_bundle, tmp_path / "server.log", tmp_path / "state", "--snapshot-every", "25",
                           "--max-sessions", str(MAX_SESSIONS),
                           # one client counts the free slots: the per-client cap (half by default) must not hide them
                           "--max-sessions-per-client", str(MAX_SESSIONS)).start()
    rng = random.Random(7)
    counts = {"iterations": 0, "sessions": 0, "session_cap_waits": 0}
    samples: list[tuple[int, int]] = []
    try:
        server.wait_serving()
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.RecommenderStub(channel)
            for n in range(WARMUP):
                iteration(stub, rng, n, counts)
            rss_start = server.rss_kb()
            samples.append((0, rss_start))
            every = max(1, ITERATIONS // 10)
            for n in range(ITERATIONS):
                iteration(stub, rng, WARMUP + n, counts)
                if (n + 1) % every == 0:
                    samples.append((n + 1, server.rss_kb()))
            rss_end = server.rss_kb()
            for _ in range(50):  # the last abandoned sessions are dropped asynchronously: a few tries
                slots = free_session_slots(stub)
                if slots == MAX_SESSIONS:
                    break
                time.sleep(0.1)
        assert server.alive() and server.health() == "SERVING"
    finally:
        exit_code = server.stop()
    growth = (rss_end - rss_start) / rss_start
    lowest = min(rss for _, rss in samples)
    growth_from_lowest = (rss_end - lowest) / lowest  # a high first sample must not hide growth after it
    write_report(report_dir(tmp_path), "soak.json", {
        "warmup_iterations": WARMUP, "iterations": ITERATIONS, "rpcs_per_iteration": "~12 (every RPC, 1 session)",
        "sessions_opened_and_abandoned": counts["sessions"], "session_cap": MAX_SESSIONS,
        "session_cap_waits": counts["session_cap_waits"], "free_session_slots_at_end": slots,
        "rss_kb": {"start": rss_start, "end": rss_end},
        "rss_samples_kb": samples, "growth": round(growth, 4), "growth_from_lowest": round(growth_from_lowest, 4),
        "max_growth": MAX_GROWTH,
        "exit_code_after_sigterm": exit_code, "tracebacks_in_log": server.run_log().count("Traceback"),
    })
    assert exit_code == 0
    assert slots == MAX_SESSIONS, f"only {slots} of {MAX_SESSIONS} session slots are free: abandoned sessions leaked"
    assert growth <= MAX_GROWTH, f"RSS grew {growth:.1%} over {ITERATIONS} iterations: {samples}"
    assert growth_from_lowest <= MAX_GROWTH, f"RSS grew {growth_from_lowest:.1%} from its lowest sample: {samples}"
    assert "Traceback" not in server.run_log()
