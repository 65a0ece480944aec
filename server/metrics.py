"""Prometheus metrics of the serving path, exposed on an optional metrics port (`--metrics-port`).

Where a request's time goes, split the way the serving literature splits it:
    llmrec_queue_seconds     submitted to the encoder -> its micro-batch starts (waiting for a worker)
    llmrec_tokenize_seconds  tokenisation of one micro-batch
    llmrec_model_seconds     one ONNX Runtime run (one text on CPU, a batch of texts when batching)
    llmrec_index_seconds     one HNSW (or exact) search
    llmrec_rpc_seconds       the whole RPC, per method (a stream from open to close)
plus batch-size histograms (requests per micro-batch, texts and padded tokens per run), the queue depth, and
counters of RPCs by status and of requests dropped before compute (cancelled, past deadline, queue full).

All metrics live in REGISTRY (not prometheus_client's global one), with the process collector (RSS, CPU).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server

logger = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

_SECONDS = (0.0002, 0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2,
            0.5, 1.0, 2.5)
_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)

QUEUE_SECONDS = Histogram("llmrec_queue_seconds", "Encoder queue wait: submitted until its micro-batch starts.",
                          buckets=_SECONDS, registry=REGISTRY)
TOKENIZE_SECONDS = Histogram("llmrec_tokenize_seconds", "Tokenisation time per micro-batch.",
                             buckets=_SECONDS, registry=REGISTRY)
MODEL_SECONDS = Histogram("llmrec_model_seconds", "ONNX Runtime time per run (pooling included).",
                          buckets=_SECONDS, registry=REGISTRY)
INDEX_SECONDS = Histogram("llmrec_index_seconds", "Item index search time per query.",
                          buckets=_SECONDS, registry=REGISTRY)
RPC_SECONDS = Histogram("llmrec_rpc_seconds", "Server-side time per RPC (a stream: open to close).", ["method"],
                        buckets=_SECONDS, registry=REGISTRY)
BATCH_REQUESTS = Histogram("llmrec_batch_requests", "Requests per encoder micro-batch.",
                           buckets=_SIZES, registry=REGISTRY)
RUN_TEXTS = Histogram("llmrec_run_texts", "Texts per ONNX Runtime run.", buckets=_SIZES, registry=REGISTRY)
RUN_TOKENS = Histogram("llmrec_run_tokens", "Padded tokens (texts x width) per ONNX Runtime run.",
                       buckets=(16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384), registry=REGISTRY)
RUNS = Counter("llmrec_runs_total", "ONNX Runtime runs by lane: alone (the wide session, all cores) or parallel "
               "(one single-threaded run per worker).", ["lane"], registry=REGISTRY)
QUEUE_DEPTH = Gauge("llmrec_queue_depth", "Requests waiting in the encoder queue.", registry=REGISTRY)
DROPPED = Counter("llmrec_dropped_total", "Requests dropped before compute.", ["reason"], registry=REGISTRY)
RPCS = Counter("llmrec_rpcs_total", "Finished RPCs by method and status code.",
               ["method", "code"], registry=REGISTRY)
REJECTED_UNKNOWN = Counter("llmrec_rejected_unknown_ids_total", "Rejected item ids a ranking ignored because the "
                           "catalogue does not hold them (once per ranking).", registry=REGISTRY)
CLIENT_REFUSED = Counter("llmrec_client_refused_total", "Calls refused by a per-client cap (server.fairness), by "
                         "limit: sessions or in_flight.", ["limit"], registry=REGISTRY)

for _reason in ("cancelled", "deadline", "queue_full"):
    DROPPED.labels(_reason)
for _lane in ("alone", "parallel"):
    RUNS.labels(_lane)
for _limit in ("sessions", "in_flight"):
    CLIENT_REFUSED.labels(_limit)


def start_metrics_server(host: str, port: int) -> tuple[Any, int]:
    """Serve REGISTRY at http://host:port/metrics from a daemon thread. Returns (http server, bound port)."""
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    return server, int(server.server_port)


def time_calls(obj: Any, name: str, histogram: Histogram) -> bool:
    """Wrap obj.<name> (a bound method) so every call is observed in `histogram`. False if obj has no such
    callable (the wrapped object changed shape; metrics must never break serving)."""
    method = getattr(obj, name, None)
    if not callable(method):
        logger.warning("cannot time %s.%s: no such method", type(obj).__name__, name)
        return False

    @functools.wraps(method)
    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            histogram.observe(time.perf_counter() - started)

    setattr(obj, name, timed)
    return True


def observe_rpc(method: str, code_name: str, seconds: float) -> None:
    RPCS.labels(method, code_name).inc()
    RPC_SECONDS.labels(method).observe(seconds)
