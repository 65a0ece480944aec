"""Serving under load on the real tiny bundle: per-user determinism, back-pressure, metrics, the load generator."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import numpy as np
import pytest

from bench import loadgen
from llmrec import manifest as mf
from llmrec.onnx_encoder import OnnxEncoder
from llmrec.v1 import recommender_pb2 as pb
from llmrec.v1 import recommender_pb2_grpc as pb_grpc
from llmrec.server import metrics
from tests.conftest import FIXTURES


def _request(*item_ids: str, query: str = "") -> pb.RecommendRequest:
    return pb.RecommendRequest(history=[pb.HistoryItem(item_id=i) for i in item_ids], k=10,
                               context=pb.Context(query=query))


async def _many(target: str, requests: list[pb.RecommendRequest], one_client: bool = True) -> list:
    """All at once; as one client, or each as its own (a client may only have so many in flight: fairness)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        return await asyncio.gather(*(
            stub.Recommend(r, timeout=30, metadata=None if one_client else (("llmrec-client-id", f"user-{n}"),))
            for n, r in enumerate(requests)), return_exceptions=True)


def test_a_users_result_does_not_change_with_concurrent_load(server, stub):
    """On CPU each text is its own INT8 run, so other users' traffic cannot move this user's scores."""
    mine = _request("m1", "m13", "m27", query="space adventure")
    alone = stub.Recommend(mine, timeout=10)
    others = [_request(f"m{i}", f"m{(i * 7) % 42 + 1}", query=q)  # 80 requests: below the queue bound (128)
              for i in range(1, 21) for q in ("", "romantic comedy")]
    parallel_before = metrics.RUNS.labels("parallel")._value.get()
    mixed = [r for pair in zip(others, [mine] * len(others)) for r in pair]
    responses = asyncio.run(_many(server.target, mixed, one_client=False))
    # The load really was concurrent: requests ran in the parallel lane (single-threaded sessions) while
    # `alone` ran on the all-cores session.
    assert metrics.RUNS.labels("parallel")._value.get() > parallel_before
    for response in responses[1::2]:
        assert not isinstance(response, Exception)
        assert [(i.item_id, i.score) for i in response.items] == [(i.item_id, i.score) for i in alone.items]


def test_both_lanes_give_bitwise_identical_vectors(tiny_bundle):
    wide = OnnxEncoder(tiny_bundle / mf.MODEL_INT8_FILE, tiny_bundle / mf.TOKENIZER_FILE, intra_op_threads=2)
    narrow = wide.with_threads(1)
    assert (wide.intra_op_threads, narrow.intra_op_threads) == (2, 1)
    texts = [f"looking for: {'space ' * n}. recently: " + "; ".join(f"Film {i} (Drama)" for i in range(n))
             for n in range(1, 40, 3)]
    for text in texts:
        alone = wide.encode_tokens(*wide.tokenize([text], 128))
        assert np.array_equal(alone, narrow.encode_tokens(*narrow.tokenize([text], 128)))


def test_a_full_queue_answers_resource_exhausted(start_server):
    running = start_server(max_queue=1, max_inflight_per_client=64)  # the queue, not the client's cap, refuses
    responses = asyncio.run(_many(running.target, [_request(f"m{i % 42 + 1}") for i in range(64)]))
    codes = [r.code() if isinstance(r, grpc.aio.AioRpcError) else grpc.StatusCode.OK for r in responses]
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    refused = next(r for r in responses if isinstance(r, grpc.aio.AioRpcError))
    assert "capacity" in refused.details()


def test_metrics_endpoint_exposes_the_time_split_and_batch_sizes(start_server):
    running = start_server()  # metrics are on by default (the tests' settings: any free port)
    with grpc.insecure_channel(running.target) as channel:
        pb_grpc.RecommenderStub(channel).Recommend(_request("m1"), timeout=10)
    port = running.server.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for name in ("llmrec_queue_seconds_count", "llmrec_model_seconds_count", "llmrec_index_seconds_count",
                 "llmrec_ranking_seconds_count",
                 "llmrec_tokenize_seconds_count", "llmrec_batch_requests_bucket", "llmrec_run_texts_bucket",
                 'llmrec_rpcs_total{code="OK",method="Recommend"}', "llmrec_queue_depth",
                 'llmrec_dropped_total{reason="queue_full"}', "process_resident_memory_bytes"):
        assert name in text, name
    index_count = next(line for line in text.splitlines() if line.startswith("llmrec_index_seconds_count"))
    assert float(index_count.split()[-1]) >= 1


@pytest.mark.parametrize("method", loadgen.METHODS)
def test_load_generator_closed_and_open_loop(server, method):
    workload = loadgen.build_workload(FIXTURES / "tiny", count=16, history_items=5)
    closed = asyncio.run(loadgen.run_level(server.target, workload, method, concurrency=2, duration=0.4,
                                           warmup=0.1))
    opened = asyncio.run(loadgen.run_level(server.target, workload, method, rate=40, poisson=True, duration=0.4,
                                           warmup=0.1))
    for result in (closed, opened):
        summary = result.summary()
        assert summary["ok"] > 0 and summary["errors"] == {}, summary
        assert 0 < summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"]
