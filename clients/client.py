"""A typed, synchronous Python client for the llmrec.v1.Recommender service.

    with RecommenderClient("127.0.0.1:50051") as client:
        result = client.recommend(["50", {"title": "Blade Runner (1982)", "categories": ["Sci-Fi"]}], k=10)
        for item in result.items:
            print(item.rank, item.item_id, item.title)

History entries are oldest first and each is a catalogue id (str), an ItemText-like mapping
({"title", "categories", "brand", "description"}), an ItemText or a HistoryItem.
Failures raise RecommenderError carrying the gRPC status code and the server's message.

    client.recommend(["50"], k=5, explain=True, category="Sci-Fi")   # reasons + a sentence per item
    client.recommend(["50"], rejected=["172"], min_score=0.3)         # negative feedback, a score threshold
    batch = client.recommend_batch([{"history": ["50"]}, {"query": "space", "k": 3}])  # many users, one call
    for entry in batch.results: print(entry.items if entry.ok else entry.error)
    client.upsert_items([{"id": "new-1", "title": "Arrival (2016)", "categories": ["Sci-Fi"],
                          "attributes": {"studio": "Paramount"}}])
    for item in client.iter_items(): ...

Secured servers (server.security): TLS with the server's CA, mutual TLS with a client certificate, a token:

    RecommenderClient("recs.internal:50051", tls_ca="ca.pem", tls_cert="me.pem", tls_key="me.key", token=TOKEN)

client_id names the caller for the server's per-client fair sharing when authorization is off (sent as
`llmrec-client-id` metadata; with authorization on, the token or certificate decides and it is ignored).

Many replicas (docs/serving.md#many-replicas): one channel over all their addresses, calls spread round-robin over
the replicas that are up, those that report NOT_SERVING skipped (client-side health checking):

    RecommenderClient("ipv4:10.0.0.1:50051,10.0.0.2:50051", load_balancing="round_robin")
    RecommenderClient("dns:///recs-headless.llmrec:50051", load_balancing="round_robin")
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import ipaddress
import itertools
import json
import os
import queue
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmrec.v1 import recommender_pb2 as pb
from llmrec.v1 import recommender_pb2_grpc as pb_grpc

from llmrec.clients.status_details import FieldViolation, StatusDetails, details_of, status_details

HistoryLike = str | Mapping[str, Any] | pb.ItemText | pb.HistoryItem
# {"category": "Sci-Fi"} or {"category": ["Sci-Fi", "Horror"], "studio": "A24"}: each key must match, any value.
FiltersLike = Mapping[str, str | Sequence[str]] | Sequence[pb.AttributeFilter]
TimestampLike = dt.datetime | float | int | None

DEFAULT_MAX_MESSAGE_BYTES = 16 << 20
CLIENT_ID_METADATA = "llmrec-client-id"  # server.fairness reads it
_ITEM_TEXT_KEYS = {"title", "categories", "brand", "description"}


# Failures worth retrying as they are (after RetryInfo's delay when given): the server is busy, not there yet or
# any more, or the call was cut short. The others need a different request, credentials or server (`permanent`).
RETRYABLE_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED,
})


class RecommenderError(Exception):
    """A call failed. `code` is the gRPC status code, `message` the server's explanation.

    The server's rich details (google.rpc.Status), where it sent them:
        reason: a stable UPPER_SNAKE cause for programs, e.g. "ITEM_NOT_FOUND", "INVALID_FIELD" ("" if none);
        domain: "llmrec.v1"; metadata: the reason's specifics (e.g. item_ids, a JSON list; unknown_count);
        field_violations: the bad request fields, e.g. (FieldViolation("history[3].item_id", "..."),);
        retry_after_s: how long to wait before retrying (RESOURCE_EXHAUSTED, UNAVAILABLE), else None.
    """

    def __init__(self, code: grpc.StatusCode, message: str, details: StatusDetails | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        details = details or StatusDetails()
        self.reason = details.reason
        self.domain = details.domain
        self.metadata = dict(details.metadata)
        self.field_violations: tuple[FieldViolation, ...] = details.field_violations
        self.retry_after_s = details.retry_after_s

    @property
    def retryable(self) -> bool:
        """Whether the same call may succeed later (RETRYABLE_CODES); the CLI exits 4 for these, 3 otherwise."""
        return self.code in RETRYABLE_CODES

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> RecommenderError:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", details_of(error))

    @classmethod
    def from_status(cls, status: Any) -> RecommenderError:
        """The error a google.rpc.Status describes (one RecommendBatch entry)."""
        code = next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)
        return cls(code, status.message, status_details(status))


@dataclasses.dataclass(frozen=True)
class Reason:
    """One source of the user text behind a recommendation. kind: "history_item" or "query_term"."""

    kind: str
    item_id: str
    text: str
    weight: float
    similarity: float


@dataclasses.dataclass(frozen=True)
class Explanation:
    reasons: list[Reason]
    summary: str


@dataclasses.dataclass(frozen=True)
class Recommendation:
    rank: int
    item_id: str
    score: float
    title: str
    explanation: Explanation | None = None  # only when the request asked for explain


@dataclasses.dataclass(frozen=True)
class Recommendations:
    items: list[Recommendation]
    model_version: str
    index_version: str
    serving_path: str = ""  # "fast" (no encoder run) or "full"; "" when the server did not say


@dataclasses.dataclass(frozen=True)
class BatchEntry:
    """One request's outcome in a RecommendBatch: its items, or the error it alone got (error is None if ok)."""

    items: list[Recommendation]
    error: RecommenderError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclasses.dataclass(frozen=True)
class BatchRecommendations:
    results: list[BatchEntry]  # one per request, in request order
    model_version: str
    index_version: str


@dataclasses.dataclass(frozen=True)
class Page:
    """One RecommendStream message."""

    items: list[Recommendation]
    page: int
    last: bool
    model_version: str
    index_version: str


@dataclasses.dataclass(frozen=True)
class SessionUpdate:
    """The server's answer to one session event. `code` is 0 when the event was accepted."""

    event_id: str
    code: int
    message: str
    items: list[Recommendation]
    history_length: int
    model_version: str
    index_version: str
    session_id: str = ""

    @property
    def ok(self) -> bool:
        return self.code == 0

    @property
    def code_name(self) -> str:
        return _code_name(self.code)


@dataclasses.dataclass(frozen=True)
class Embeddings:
    items: list[list[float]]
    users: list[list[float]]
    model_version: str


@dataclasses.dataclass(frozen=True)
class CatalogueItem:
    """A live catalogue item. `vector` (the index row) only when asked for."""

    item_id: str
    title: str
    categories: list[str]
    brand: str
    description: str
    attributes: dict[str, str]
    upserted: bool = False
    vector: list[float] | None = None


@dataclasses.dataclass(frozen=True)
class ItemPage:
    items: list[CatalogueItem]
    next_page_token: str  # "" on the last page
    total_count: int


@dataclasses.dataclass(frozen=True)
class CatalogueChange:
    """The answer to UpsertItems or DeleteItems: counts, and the catalogue size and version after it."""

    created: int
    replaced: int
    deleted: int
    item_count: int
    index_version: str


# --- message builders -----------------------------------------------------------------------------------


def item_text(value: Mapping[str, Any] | pb.ItemText | str) -> pb.ItemText:
    """An ItemText from a mapping ({"title", "categories", "brand", "description"}), a message or a title."""
    if isinstance(value, pb.ItemText):
        return value
    if isinstance(value, str):
        return pb.ItemText(title=value)
    unknown = set(value) - _ITEM_TEXT_KEYS
    if unknown:
        raise ValueError(f"unknown item text fields {sorted(unknown)}; use {sorted(_ITEM_TEXT_KEYS)}")
    return pb.ItemText(
        title=value.get("title", ""),
        categories=list(value.get("categories", ())),
        brand=value.get("brand", ""),
        description=value.get("description", ""),
    )


def history_item(value: HistoryLike) -> pb.HistoryItem:
    """A catalogue id (str), an ItemText-like mapping, an ItemText or a HistoryItem -> HistoryItem."""
    if isinstance(value, pb.HistoryItem):
        return value
    if isinstance(value, str):
        return pb.HistoryItem(item_id=value)
    return pb.HistoryItem(text=item_text(value))


def timestamp(value: TimestampLike) -> Timestamp | None:
    """A datetime (naive = UTC) or Unix seconds -> Timestamp."""
    if value is None:
        return None
    message = Timestamp()
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        message.FromDatetime(value)
    else:
        message.FromNanoseconds(int(round(float(value) * 1e9)))
    return message


def context(
    query: str = "", device: str = "", locale: str = "", timestamp_: TimestampLike = None,
    utc_offset_minutes: int = 0,
) -> pb.Context:
    return pb.Context(query=query, device=device, locale=locale, utc_offset_minutes=utc_offset_minutes,
                      timestamp=timestamp(timestamp_))


def attribute_filters(filters: FiltersLike = (), category: str | Sequence[str] = ()) -> list[pb.AttributeFilter]:
    """AttributeFilter messages from {"key": value or [values]} (or messages), plus a category filter."""
    messages: list[pb.AttributeFilter] = []
    if isinstance(filters, Mapping):
        for key, values in filters.items():
            messages.append(pb.AttributeFilter(key=key, values=[values] if isinstance(values, str) else list(values)))
    else:
        messages.extend(filters)
    categories = [category] if isinstance(category, str) else list(category)
    if categories:
        messages.append(pb.AttributeFilter(key="category", values=categories))
    return messages


_CATALOGUE_KEYS = {"id", "item_id", "title", "categories", "brand", "description", "attributes"}


def catalogue_item(value: Mapping[str, Any] | pb.CatalogueItem) -> pb.CatalogueItem:
    """A CatalogueItem from a mapping ({"id", "title", "categories", "brand", "description", "attributes"},
    the bundle's items.jsonl row format plus attributes) or a message."""
    if isinstance(value, pb.CatalogueItem):
        return value
    unknown = set(value) - _CATALOGUE_KEYS
    if unknown:
        raise ValueError(f"unknown catalogue item fields {sorted(unknown)}; use {sorted(_CATALOGUE_KEYS)}")
    text = item_text({k: v for k, v in value.items() if k in _ITEM_TEXT_KEYS})
    return pb.CatalogueItem(item_id=str(value.get("id", value.get("item_id", ""))), text=text,
                            attributes={str(k): str(v) for k, v in (value.get("attributes") or {}).items()})


def _explanation(message: pb.RecommendedItem) -> Explanation | None:
    if not message.HasField("explanation"):
        return None
    reasons = [Reason(kind=pb.Reason.Kind.Name(r.kind).lower(), item_id=r.item_id, text=r.text, weight=r.weight,
                      similarity=r.similarity) for r in message.explanation.reasons]
    return Explanation(reasons=reasons, summary=message.explanation.summary)


_SERVING_PATHS = {pb.SERVING_PATH_FAST: "fast", pb.SERVING_PATH_FULL: "full"}


def _recommendations(items: Iterable[pb.RecommendedItem]) -> list[Recommendation]:
    return [Recommendation(rank=i.rank, item_id=i.item_id, score=i.score, title=i.title, explanation=_explanation(i))
            for i in items]


def _catalogue_item(message: pb.CatalogueItem, upserted: bool = False,
                    vector: list[float] | None = None) -> CatalogueItem:
    text = message.text
    return CatalogueItem(item_id=message.item_id, title=text.title, categories=list(text.categories),
                         brand=text.brand, description=text.description, attributes=dict(message.attributes),
                         upserted=upserted, vector=vector)


def _code_name(code: int) -> str:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.name
    return str(code)


# --- client -----------------------------------------------------------------------------------------------


PemLike = str | os.PathLike | bytes  # a PEM file's path, or its contents as bytes


class RecommenderClient:
    """Client for one server. Use as a context manager, or call close().

    Args:
        target: "host:port".
        timeout_s: deadline for each unary call (and for each RecommendStream as a whole).
        max_message_bytes: gRPC send/receive limit; match the server's.
        tls_ca: the CA that signed the server's certificate (PEM); None with TLS = the system's roots.
        tls_cert, tls_key: this client's certificate and key, for servers that require mutual TLS.
        token: a bearer token, sent as `authorization: Bearer <token>` metadata with every call.
        tls: use TLS; None (the default) = when any of tls_ca, tls_cert, tls_key is given.
        tls_server_name: the name to check the server's certificate against, when not the target's host.
        client_id: who this client is for the server's fair sharing when authorization is off
            (`llmrec-client-id` metadata on every call); None = the server goes by this host's address.
        load_balancing: "round_robin" spreads calls over every address the target resolves to (several
            replicas), skipping those whose health is not SERVING; None = gRPC's default (pick_first).
        channel_options: further gRPC channel arguments, e.g. (("grpc.keepalive_time_ms", 30000),).
    """

    def __init__(self, target: str, timeout_s: float = 10.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 *, tls_ca: PemLike | None = None, tls_cert: PemLike | None = None, tls_key: PemLike | None = None,
                 token: str | None = None, tls: bool | None = None, tls_server_name: str | None = None,
                 client_id: str | None = None, load_balancing: str | None = None,
                 channel_options: Sequence[tuple[str, Any]] = ()):
        self.target = target
        self.timeout_s = timeout_s
        self.channel = open_channel(target, max_message_bytes, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
                                    token=token, tls=tls, tls_server_name=tls_server_name, client_id=client_id,
                                    load_balancing=load_balancing, channel_options=channel_options)
        self.stub = pb_grpc.RecommenderStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> RecommenderClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    @staticmethod
    def build_request(
        history: Sequence[HistoryLike] = (), *, k: int = 10, query: str = "", device: str = "", locale: str = "",
        timestamp: TimestampLike = None, utc_offset_minutes: int = 0, exclude: Iterable[str] = (),
        exclude_history: bool = False, page_size: int = 0, explain: bool = False, filters: FiltersLike = (),
        category: str | Sequence[str] = (), rejected: Iterable[str] = (), min_score: float | None = None,
        new_item_share: float | None = None, force_full_path: bool = False, ranking_stage: bool | None = None,
    ) -> pb.RecommendRequest:
        """The RecommendRequest the keyword arguments describe (filters and category: attribute_filters;
        rejected: ids the user rejected, never returned and pushing items like them down; min_score: drop
        items scoring below it; new_item_share None: the server's default; force_full_path: run the encoder
        even where the fast path would serve; ranking_stage: re-score with the model's cross-encoder, None: the
        server's default)."""
        return pb.RecommendRequest(
            history=[history_item(h) for h in history],
            context=context(query, device, locale, timestamp, utc_offset_minutes),
            k=k, exclude_item_ids=list(exclude), exclude_history=exclude_history, page_size=page_size,
            explain=explain, filters=attribute_filters(filters, category), rejected_item_ids=list(rejected),
            min_score=min_score, new_item_share=new_item_share, force_full_path=force_full_path,
            ranking_stage=ranking_stage,
        )

    def recommend(self, history: Sequence[HistoryLike] = (), **kwargs: Any) -> Recommendations:
        """Top-k items for a history (oldest first) and context.

        Args:
            history: catalogue ids and/or item texts, oldest first.
            **kwargs: k, query, device, locale, timestamp, utc_offset_minutes, exclude, exclude_history,
                explain, filters, category, rejected, min_score, new_item_share (the share of k reserved for new
                items), force_full_path, ranking_stage (None: the server's default).
        """
        request = self.build_request(history, **kwargs)
        response = self._call(self.stub.Recommend, request)
        return Recommendations(_recommendations(response.items), response.model_version, response.index_version,
                               _SERVING_PATHS.get(response.serving_path, ""))

    def recommend_batch(self, requests: Sequence[Mapping[str, Any] | pb.RecommendRequest]) -> BatchRecommendations:
        """recommend() for many users in one call: one entry per request, in order, each ok or with its own
        error (a bad request fails only its entry; RecommenderError is raised only when the whole call fails).

        Args:
            requests: RecommendRequest messages, or mappings of recommend()'s arguments ({"history": [...],
                "k": 5, "query": ..., "rejected": [...], ...}).
        """
        messages = [r if isinstance(r, pb.RecommendRequest) else self.build_request(**r) for r in requests]
        response = self._call(self.stub.RecommendBatch, pb.RecommendBatchRequest(requests=messages))
        results = [BatchEntry(_recommendations(r.items)) if r.status.code == 0
                   else BatchEntry([], RecommenderError.from_status(r.status)) for r in response.results]
        return BatchRecommendations(results, response.model_version, response.index_version)

    def recommend_stream(self, history: Sequence[HistoryLike] = (), **kwargs: Any) -> Iterator[Page]:
        """The same ranking as recommend(), page by page (page_size=0 means the server default of 10)."""
        request = self.build_request(history, **kwargs)
        try:
            for message in self.stub.RecommendStream(request, timeout=self.timeout_s):
                yield Page(_recommendations(message.items), message.page, message.last,
                           message.model_version, message.index_version)
        except grpc.RpcError as error:
            raise RecommenderError.from_rpc_error(error) from None

    def session(self, timeout_s: float | None = None) -> ClientSession:
        """Open a live session (a context manager). timeout_s bounds the whole session; None = no deadline."""
        return ClientSession(self.stub, timeout_s)

    def embed(
        self, items: Sequence[Mapping[str, Any] | pb.ItemText | str] = (),
        users: Sequence[Mapping[str, Any] | pb.UserInput] = (),
    ) -> Embeddings:
        """Unit vectors for item texts and for users.

        Args:
            items: item texts (mappings, ItemText messages or plain titles).
            users: UserInput messages or mappings {"history": [...], "query", "device", "locale", "timestamp",
                "utc_offset_minutes"}.
        """
        request = pb.EmbedRequest(items=[item_text(i) for i in items], users=[_user_input(u) for u in users])
        response = self._call(self.stub.Embed, request)
        return Embeddings([list(v.values) for v in response.items], [list(v.values) for v in response.users],
                          response.model_version)

    def model_info(self) -> pb.GetModelInfoResponse:
        return self._call(self.stub.GetModelInfo, pb.GetModelInfoRequest())

    def load_model(self, bundle_path: str = "", timeout_s: float = 600.0) -> pb.LoadModelResponse:
        """Admin: hot-swap the served model for the bundle at bundle_path, a directory on the server ("" = the
        newest under the server's bundle_root); returns once the new model serves. A rejected bundle raises
        FAILED_PRECONDITION (reason BUNDLE_REJECTED) and the old model serves on. timeout_s replaces the client's
        per-call deadline: a swap loads and warms up a whole model and re-encodes the upserted items."""
        try:
            return self.stub.LoadModel(pb.LoadModelRequest(bundle_path=bundle_path), timeout=timeout_s)
        except grpc.RpcError as error:
            raise RecommenderError.from_rpc_error(error) from None

    def forget_session(self, session_id: str) -> None:
        """End a live session and drop its state on the server (NOT_FOUND if no live session has the id)."""
        self._call(self.stub.ForgetSession, pb.ForgetSessionRequest(session_id=session_id))

    # --- catalogue ---------------------------------------------------------------------------------------

    def upsert_items(self, items: Sequence[Mapping[str, Any] | pb.CatalogueItem]) -> CatalogueChange:
        """Add or replace items; returns once the change is durable and visible to the next recommend()."""
        response = self._call(self.stub.UpsertItems, pb.UpsertItemsRequest(items=[catalogue_item(i) for i in items]))
        return CatalogueChange(response.created, response.replaced, 0, response.item_count, response.index_version)

    def delete_items(self, item_ids: Sequence[str], allow_missing: bool = False) -> CatalogueChange:
        """Delete items (NOT_FOUND for unknown ids, and nothing deleted, unless allow_missing)."""
        response = self._call(self.stub.DeleteItems,
                              pb.DeleteItemsRequest(item_ids=list(item_ids), allow_missing=allow_missing))
        return CatalogueChange(0, 0, response.deleted, response.item_count, response.index_version)

    def get_item(self, item_id: str, include_vector: bool = False) -> CatalogueItem:
        response = self._call(self.stub.GetItem, pb.GetItemRequest(item_id=item_id, include_vector=include_vector))
        vector = list(response.vector.values) if response.HasField("vector") else None
        return _catalogue_item(response.item, response.upserted, vector)

    def list_items(self, page_size: int = 0, page_token: str = "") -> ItemPage:
        """One page of the catalogue in item id order (page_size 0 = the server default of 100)."""
        response = self._call(self.stub.ListItems, pb.ListItemsRequest(page_size=page_size, page_token=page_token))
        return ItemPage([_catalogue_item(i) for i in response.items], response.next_page_token,
                        response.total_count)

    def iter_items(self, page_size: int = 1000) -> Iterator[CatalogueItem]:
        """Every catalogue item, page by page."""
        token = ""
        while True:
            page = self.list_items(page_size, token)
            yield from page.items
            token = page.next_page_token
            if not token:
                return

    def health(self, service: str = "") -> str:
        """The serving status name: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN"."""
        response = self._call(self.health_stub.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_serving(self, timeout_s: float = 60.0, service: str = "") -> None:
        """Block until health reports SERVING (the server loads and warms its model first).

        Raises:
            RecommenderError: DEADLINE_EXCEEDED if it is not serving within timeout_s.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self.health(service) == "SERVING":
                    return
            except RecommenderError as error:
                if error.code != grpc.StatusCode.UNAVAILABLE:  # not up yet reads as UNAVAILABLE
                    raise
            time.sleep(0.1)
        raise RecommenderError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{self.target} not SERVING after {timeout_s:g} s")

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError as error:
            raise RecommenderError.from_rpc_error(error) from None


def open_channel(target: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, *, tls_ca: PemLike | None = None,
                 tls_cert: PemLike | None = None, tls_key: PemLike | None = None, token: str | None = None,
                 tls: bool | None = None, tls_server_name: str | None = None,
                 client_id: str | None = None, load_balancing: str | None = None,
                 channel_options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to `target`: TLS when asked for (or when any tls_* is given), the token and the client id on
    every call, calls balanced by `load_balancing` (a gRPC policy name such as "round_robin") with client-side
    health checking.

    The token travels as call metadata added by a client interceptor, not as gRPC call credentials: gRPC
    refuses call credentials on plaintext channels, and a token over plaintext to a loopback address (tests, a
    sidecar proxy that terminates TLS) is legitimate, so one mechanism serves both. Over plaintext to any other
    address the token could be read on the wire: that draws a warning.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("give tls_cert and tls_key together (a client certificate and its key)")
    options = [("grpc.max_send_message_length", max_message_bytes),
               ("grpc.max_receive_message_length", max_message_bytes), *channel_options]
    if load_balancing:
        # The health service's "" entry: a replica that is loading or catching up is NOT_SERVING and gets no calls.
        options.append(("grpc.service_config", json.dumps({"loadBalancingConfig": [{load_balancing: {}}],
                                                           "healthCheckConfig": {"serviceName": ""}})))
    secure = tls if tls is not None else any(value is not None for value in (tls_ca, tls_cert, tls_key))
    if secure:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_pem(tls_ca), private_key=_pem(tls_key), certificate_chain=_pem(tls_cert))
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        channel = grpc.secure_channel(target, credentials, options=options)
    elif tls_ca is not None or tls_cert is not None:
        raise ValueError("tls=False with TLS files: drop the files or the tls=False")
    else:
        channel = grpc.insecure_channel(target, options=options)
    headers = []
    if token:
        if not secure and not _is_local(target):
            warnings.warn(f"sending a bearer token to {target} without TLS: anyone on the path can read it",
                          stacklevel=3)
        headers.append(("authorization", f"Bearer {token}"))
    if client_id:
        headers.append((CLIENT_ID_METADATA, client_id))
    return grpc.intercept_channel(channel, _CallMetadata(headers)) if headers else channel


def _pem(value: PemLike | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as file:
        return file.read()


def _is_local(target: str) -> bool:
    """A unix socket or a loopback host ("127.0.0.1:50051", "localhost:1", "[::1]:2", "dns:///localhost:3")."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host = target.rsplit("/", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _CallDetails(collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
        grpc.ClientCallDetails):
    pass


class _CallMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                    grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the same metadata (`authorization: Bearer <token>`, the client id) to every call, streams and health
    checks too."""

    def __init__(self, headers: Sequence[tuple[str, str]]) -> None:
        self._headers = list(headers)

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(details.method, details.timeout, [*(details.metadata or ()), *self._headers],
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def _user_input(value: Mapping[str, Any] | pb.UserInput) -> pb.UserInput:
    if isinstance(value, pb.UserInput):
        return value
    unknown = set(value) - {"history", "query", "device", "locale", "timestamp", "utc_offset_minutes"}
    if unknown:
        raise ValueError(f"unknown user fields {sorted(unknown)}")
    return pb.UserInput(
        history=[history_item(h) for h in value.get("history", ())],
        context=context(value.get("query", ""), value.get("device", ""), value.get("locale", ""),
                        value.get("timestamp"), value.get("utc_offset_minutes", 0)),
    )


class ClientSession:
    """A live Session stream, used in lock step: every event returns the server's answer to it.

    A rejected event (unknown id, bad k) comes back as a SessionUpdate with ok == False; the session goes on.
    RecommenderError is raised only when the stream itself ends with an error. A server that shuts down ends its
    sessions with UNAVAILABLE (reason SHUTTING_DOWN; `.retryable`): open a new session, which another replica
    answers, and send the history again with configure(history=...). A hot model swap does not end a session:
    later answers carry the new model_version.
    """

    _END = object()

    def __init__(self, stub: pb_grpc.RecommenderStub, timeout_s: float | None = None) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._responses = stub.Session(iter(self._requests.get, self._END), timeout=timeout_s)
        self._event_ids = itertools.count(1)
        self._closed = False
        self.session_id = ""  # server-assigned; known after the first answer (pass it to forget_session)

    def __enter__(self) -> ClientSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def send(self, request: pb.SessionRequest) -> SessionUpdate:
        """Send one event (an event_id is assigned when empty) and wait for its answer."""
        if self._closed:
            raise RuntimeError("the session is closed")
        if not request.event_id:
            request.event_id = str(next(self._event_ids))
        self._requests.put(request)
        try:
            message = next(self._responses)
        except grpc.RpcError as error:
            self._closed = True
            raise RecommenderError.from_rpc_error(error) from None
        except StopIteration:
            self._closed = True
            raise RecommenderError(grpc.StatusCode.UNKNOWN, "the server ended the session") from None
        self.session_id = message.session_id or self.session_id
        return SessionUpdate(
            event_id=message.event_id, code=message.status.code, message=message.status.message,
            items=_recommendations(message.items), history_length=message.history_length,
            model_version=message.model_version, index_version=message.index_version,
            session_id=message.session_id,
        )

    def configure(self, *, k: int = 0, exclude: Iterable[str] = (), exclude_history: bool = False,
                  history: Sequence[HistoryLike] = (), explain: bool = False, filters: FiltersLike = (),
                  category: str | Sequence[str] = (), rejected: Iterable[str] = (),
                  min_score: float | None = None) -> SessionUpdate:
        """Set k (0 = server default), exclusions, filters, explain, the score threshold (None: none) and, when
        given, the history known so far and the rejected items (each replacing the session's)."""
        return self.send(pb.SessionRequest(config=pb.SessionConfig(
            k=k, exclude_item_ids=list(exclude), exclude_history=exclude_history,
            history=[history_item(h) for h in history], explain=explain,
            filters=attribute_filters(filters, category), rejected_item_ids=list(rejected), min_score=min_score,
        )))

    def interact(self, item: HistoryLike) -> SessionUpdate:
        """The user interacted with an item (catalogue id or item text)."""
        return self.send(pb.SessionRequest(interaction=history_item(item)))

    def set_context(self, *, query: str = "", device: str = "", locale: str = "", timestamp: TimestampLike = None,
                    utc_offset_minutes: int = 0) -> SessionUpdate:
        """Replace the whole context (its query included)."""
        return self.send(pb.SessionRequest(context=context(query, device, locale, timestamp, utc_offset_minutes)))

    def query(self, text: str) -> SessionUpdate:
        """Replace the query only ("" clears it)."""
        return self.send(pb.SessionRequest(query=text))

    def reject(self, item_id: str) -> SessionUpdate:
        """The user rejected an item: never returned again in this session, and items like it move down."""
        return self.send(pb.SessionRequest(rejection=item_id))

    def close(self) -> None:
        """Half-close the stream and let the server finish it."""
        if not self._closed:
            self._closed = True
            self._requests.put(self._END)
            try:
                for _ in self._responses:
                    pass
            except grpc.RpcError:
                pass
