"""Prometheus metrics of the serving path, served at /metrics on metrics_host:metrics_port (on by default).

Where a request's time goes, split the way the serving literature splits it:
    llmrec_queue_seconds      submitted to the encoder -> its micro-batch starts (waiting for a worker)
    llmrec_tokenize_seconds   tokenisation of one micro-batch
    llmrec_model_seconds      one ONNX Runtime run (one text on CPU, a batch of texts when batching)
    llmrec_ranking_seconds    the scoring rule's top k for one query (query, adjustments, re-score), index included
    llmrec_index_seconds      one HNSW (or exact) search, inside the ranking
Per call, with streams measured per message and per event (a 300 s Session never lands in a latency histogram):
    llmrec_rpcs_total               finished RPCs by method and status, calls refused by authorization included
    llmrec_rpc_seconds              unary RPCs only, by method
    llmrec_stream_seconds           streaming RPCs' lifetimes, open to close, by method (buckets up to an hour)
    llmrec_stream_message_seconds   RecommendStream: time to produce each page
    llmrec_session_event_seconds    Session: one event, SessionRequest received -> its SessionResponse
    llmrec_session_events_total     Session events by kind and the status their response carries
    llmrec_model_swaps_total        hot model swaps by outcome (ok, failed)
    llmrec_model_swap_seconds       one hot model swap: start of the load to swapped in (server.models)
    llmrec_client_refused_total     calls refused by a per-client cap (server.fairness), by limit
    llmrec_rejected_unknown_ids_total  rejected item ids a ranking ignored: the catalogue does not hold them
    llmrec_rankings_total           rankings made, by serving path: full (the encoder ran) or fast (no encoder)
plus batch-size histograms (requests per micro-batch, texts and padded tokens per run), runs per lane, the queue
depth and encoder requests dropped by reason.

All metrics live in REGISTRY (not prometheus_client's global one), with the process collector (RSS, CPU).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server

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
RANKING_SECONDS = Histogram("llmrec_ranking_seconds", "Scoring rule top-k time per query (query vector, "
                            "adjustments, re-score of raised items, final order), the index search included.",
                            buckets=_SECONDS, registry=REGISTRY)
RANKING_STAGE_SECONDS = Histogram("llmrec_ranking_stage_seconds", "Ranking stage time per query: the cross-encoder "
                                  "over the first stage's list (tokenisation and one ONNX run).",
                                  buckets=_SECONDS, registry=REGISTRY)
INDEX_SECONDS = Histogram("llmrec_index_seconds", "Item index (HNSW, or exact) search time per query.",
                          buckets=_SECONDS, registry=REGISTRY)
RPC_SECONDS = Histogram("llmrec_rpc_seconds", "Server-side time per unary RPC, by method (streaming RPCs: "
                        "llmrec_stream_seconds, llmrec_stream_message_seconds, llmrec_session_event_seconds).",
                        ["method"], buckets=_SECONDS, registry=REGISTRY)
STREAM_SECONDS = Histogram("llmrec_stream_seconds", "Lifetime of a streaming RPC (RecommendStream, Session), open "
                           "to close, by method.", ["method"],
                           buckets=(0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
                                    3600.0), registry=REGISTRY)
STREAM_MESSAGE_SECONDS = Histogram("llmrec_stream_message_seconds", "Time to produce one response message of a "
                                   "server stream: the first from the start of the call, each later one from the "
                                   "previous message's hand-off to gRPC.", ["method"], buckets=_SECONDS,
                                   registry=REGISTRY)
SESSION_EVENT_SECONDS = Histogram("llmrec_session_event_seconds", "Session: one event, SessionRequest received -> "
                                  "its SessionResponse handed to gRPC, by event kind.", ["event"], buckets=_SECONDS,
                                  registry=REGISTRY)
SESSION_EVENTS = Counter("llmrec_session_events_total", "Session events answered, by event kind and the status "
                         "code in the SessionResponse (a failed event leaves the stream open).", ["event", "code"],
                         registry=REGISTRY)
BATCH_REQUESTS = Histogram("llmrec_batch_requests", "Requests per encoder micro-batch.",
                           buckets=_SIZES, registry=REGISTRY)
RUN_TEXTS = Histogram("llmrec_run_texts", "Texts per ONNX Runtime run.", buckets=_SIZES, registry=REGISTRY)
RUN_TOKENS = Histogram("llmrec_run_tokens", "Padded tokens (texts x width) per ONNX Runtime run.",
                       buckets=(16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384), registry=REGISTRY)
RUNS = Counter("llmrec_runs_total", "ONNX Runtime runs by lane: alone (the wide session, all cores) or parallel "
               "(one single-threaded run per worker).", ["lane"], registry=REGISTRY)
QUEUE_DEPTH = Gauge("llmrec_queue_depth", "Requests waiting in the encoder queue.", registry=REGISTRY)
DROPPED = Counter("llmrec_dropped_total", "Encoder requests (one per batch of texts to encode; an RPC may make "
                  "several) given up before all their texts were encoded, by reason: queue_full (refused at once: "
                  "max_queue were waiting), deadline (the call's deadline had passed: at submission, in the queue, "
                  "or between two of its texts), cancelled (the caller went away while it waited or between two "
                  "of its texts).", ["reason"], registry=REGISTRY)
RPCS = Counter("llmrec_rpcs_total", "Finished llmrec.v1.Recommender RPCs by method and status code, calls refused "
               "by authorization (UNAUTHENTICATED, PERMISSION_DENIED) included.", ["method", "code"],
               registry=REGISTRY)
MODEL_SWAPS = Counter("llmrec_model_swaps_total", "Hot model swaps by outcome: ok (swapped in) or failed (the "
                      "previous model kept serving; the log and GetModelInfo.last_load say why).", ["outcome"],
                      registry=REGISTRY)
MODEL_SWAP_SECONDS = Histogram("llmrec_model_swap_seconds", "Hot model swap time: start of the load (verify, "
                               "warm-up, catalogue carry-over) to swapped in, successful swaps only.",
                               buckets=(0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600), registry=REGISTRY)
REJECTED_UNKNOWN = Counter("llmrec_rejected_unknown_ids_total", "Rejected item ids a ranking ignored because the "
                           "catalogue does not hold them (once per ranking).", registry=REGISTRY)
RANKINGS = Counter("llmrec_rankings_total", "Rankings made, by serving path: full (the encoder ran for this user, "
                   "or its vector was cached by a session) or fast (no encoder: server.recommender).", ["path"],
                   registry=REGISTRY)
CLIENT_REFUSED = Counter("llmrec_client_refused_total", "Calls refused by a per-client cap (server.fairness), by "
                         "limit: sessions or in_flight.", ["limit"], registry=REGISTRY)

for _reason in ("cancelled", "deadline", "queue_full"):
    DROPPED.labels(_reason)
for _lane in ("alone", "parallel"):
    RUNS.labels(_lane)
for _outcome in ("ok", "failed"):
    MODEL_SWAPS.labels(_outcome)
for _limit in ("sessions", "in_flight"):
    CLIENT_REFUSED.labels(_limit)
for _path in ("full", "fast"):
    RANKINGS.labels(_path)


def start_metrics_server(host: str, port: int) -> tuple[Any, int]:
    """Serve REGISTRY at http://host:port/metrics from a daemon thread. Returns (http server, bound port)."""
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    return server, int(server.server_port)


def observe_call(method: str, code_name: str, seconds: float, streaming: bool) -> None:
    """One finished RPC: counted by status; its time goes to the unary latency or the stream lifetime histogram."""
    RPCS.labels(method, code_name).inc()
    (STREAM_SECONDS if streaming else RPC_SECONDS).labels(method).observe(seconds)
