"""The llmrec.v1.Recommender gRPC service: thin methods that convert, call the core and convert back.

Versions reported in every response:
    model_version = manifest.bundle_version (the encoder and everything else in the bundle) of the model that
    produced that response: every method leases the served model (server.models) for as long as it computes, so
    a hot swap meanwhile does not change which model answers it.
    index_version = "<bundle_version>:<item_count>" (the index is built with the bundle; the count shows
    catalogue size at a glance), plus ":r<revision>" once UpsertItems/DeleteItems have changed the catalogue.

Every method runs in one scope (_rpc_scope) that turns domain errors into rich statuses (server.errors).
server.observability counts and logs each call with the status it really ended with: a call whose client
cancelled or whose deadline passed is CANCELLED or DEADLINE_EXCEEDED, not OK (grpc.aio cancels the handler task;
the encoder drops the work it was waiting for, between texts). A call that finished its answer just before the
cancel landed stays OK. Streams are measured here per message (RecommendStream) and per event (Session).

Requests are decoded by the deserializers `add_to_server` registers: bytes that are not the method's request
message become an `Undecodable`, answered INVALID_ARGUMENT ("request could not be decoded as
llmrec.v1.RecommendRequest", reason REQUEST_UNDECODABLE) with at most one short WARNING line per 10 s, not the
UNKNOWN/INTERNAL and traceback a failing deserializer gets from grpc. On Session the stream ends with it: the
server cannot tell which event the bytes were meant to be.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc

from llmrec.v1 import recommender_pb2 as pb
from llmrec.v1 import recommender_pb2_grpc as pb_grpc

from llmrec.server import convert, metrics, tracing
from llmrec.server.catalogue import page_token_after
from llmrec.server.encoding import set_request_deadline
from llmrec.server.fairness import FairShare
from llmrec.server.errors import (
    REASON_UNDECODABLE, InvalidArgument, ThrottledWarning, abort_with_described, code_number, describe, status_for,
)
from llmrec.server.models import ModelManager
from llmrec.server.recommender import Recommender
from llmrec.server.session import Session as SessionState, SessionRegistry  # Session is also an RPC here
from llmrec.server.settings import ServerSettings
from llmrec.server.validation import (
    Limits, check_batch_size, check_bundle_path, check_item_id, check_list_page_size, check_page_size,
)

logger = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Recommender"]
# ListItems leaves this much of the message limit for everything but the items (token, count, framing).
LIST_PAGE_MARGIN_BYTES = 64 << 10

_undecodable_warning = ThrottledWarning(logger, every_s=10.0)
_CANCEL_SETTLE_S = 0.02  # see Session
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}  # EventStatus.code -> its name


# --- decoding --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Undecodable:
    """What a request deserializer returns for bytes that are not its message (instead of raising)."""

    type_name: str  # e.g. "llmrec.v1.RecommendRequest"
    size: int       # bytes received

    def error(self, method: str) -> InvalidArgument:
        _undecodable_warning.warning("%s: %d request bytes could not be decoded as %s; answered INVALID_ARGUMENT",
                                     method, self.size, self.type_name)
        return InvalidArgument(f"request could not be decoded as {self.type_name}", reason=REASON_UNDECODABLE,
                               metadata={"message_type": self.type_name})


def safe_deserializer(message_class) -> Callable[[bytes], object]:
    """message_class.FromString that returns an Undecodable instead of raising (grpc would answer UNKNOWN with
    the exception's class in the message, or INTERNAL on a stream, and log a traceback per request)."""
    type_name = message_class.DESCRIPTOR.full_name

    def deserialize(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception:  # noqa: BLE001 - DecodeError, or anything else the parser raises: the bytes are bad
            return Undecodable(type_name, len(data))

    return deserialize


HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def method_handlers(servicer: pb_grpc.RecommenderServicer) -> dict[str, grpc.RpcMethodHandler]:
    """The handlers of every llmrec.v1.Recommender method, as the generated code makes them, but with
    safe_deserializer for the requests."""
    handlers = {}
    for method in SERVICE.methods:
        make = HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=safe_deserializer(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    return handlers


def add_to_server(servicer: pb_grpc.RecommenderServicer, server: grpc.aio.Server) -> None:
    """Register the servicer (in place of pb_grpc.add_RecommenderServicer_to_server: see method_handlers)."""
    handlers = method_handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


# --- the scope every method runs in ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _rpc_scope(name: str, context) -> AsyncIterator[None]:
    """Domain errors -> their rich status; anything else -> INTERNAL (logged). Counting, timing and the request
    id are server.observability's (it also sees calls that authorization refuses)."""
    set_request_deadline(context.time_remaining())  # the encoder drops work whose caller gave up
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except Exception as error:
        await abort_with_described(context, describe(error, name))


def _unary(method: Callable) -> Callable:
    @functools.wraps(method)
    async def wrapper(self, request, context):
        async with _rpc_scope(method.__name__, context):
            if isinstance(request, Undecodable):
                raise request.error(method.__name__)
            return await method(self, request, context)

    return wrapper


def _streaming(method: Callable) -> Callable:
    """The same as _unary for response-streaming methods."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        async with _rpc_scope(method.__name__, context):
            if isinstance(request, Undecodable):
                raise request.error(method.__name__)
            async for response in method(self, request, context):
                yield response

    return wrapper


def _client_work(method: Callable) -> Callable:
    """Counts a call that uses the encoder against its client's in-flight cap while it runs (server.fairness;
    RESOURCE_EXHAUSTED past it). Goes inside _unary/_streaming, so a refusal gets its rich status there."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            async with self.fairness.work(context):
                async for response in method(self, request, context):
                    yield response

        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        async with self.fairness.work(context):
            return await method(self, request, context)

    return unary


class RecommenderServicer(pb_grpc.RecommenderServicer):
    """Serves the model that `models` holds; answers UNAVAILABLE while it holds none (the model loads after bind).

    Args:
        settings: server settings (limits, page and session defaults, idle timeout).
        models: the served model and hot swaps (server.models).
    """

    def __init__(self, settings: ServerSettings, models: ModelManager) -> None:
        self.settings = settings
        self.models = models
        self.fairness = FairShare.from_settings(settings)
        self.sessions = SessionRegistry(settings.max_sessions, self.fairness.max_sessions_per_client)
        models.swap_listeners.append(self.sessions.rebind_idle)

    @_unary
    @_client_work
    async def Recommend(self, request: pb.RecommendRequest, context) -> pb.RecommendResponse:
        with self.models.slot.lease() as recommender:
            query = convert.recommend_query(request)
            items = await recommender.recommend(query)
            return pb.RecommendResponse(
                items=convert.recommended_items(items),
                model_version=recommender.model_version,
                index_version=recommender.index_version,
                serving_path=convert.serving_path(recommender.path(query)),
            )

    @_unary
    @_client_work
    async def RecommendBatch(self, request: pb.RecommendBatchRequest, context) -> pb.RecommendBatchResponse:
        with self.models.slot.lease() as recommender:  # every entry is answered by this one model
            check_batch_size(len(request.requests), self.settings.max_recommend_batch)
            queries = [convert.recommend_query(r) for r in request.requests]
            outcomes = await recommender.recommend_batch(queries)
            return pb.RecommendBatchResponse(
                results=[convert.batch_result(outcome, recommender.path(query))
                         for query, outcome in zip(queries, outcomes)],
                model_version=recommender.model_version,
                index_version=recommender.index_version,
            )

    @_streaming
    @_client_work
    async def RecommendStream(self, request: pb.RecommendRequest, context) -> AsyncIterator[pb.RecommendStreamResponse]:
        started = time.perf_counter()
        check_page_size(request.page_size)
        page_size = request.page_size or self.settings.default_page_size
        with self.models.slot.lease() as recommender:  # the whole ranking is made before the first page goes
            query = convert.recommend_query(request)
            items = convert.recommended_items(await recommender.recommend(query))
            versions = {"model_version": recommender.model_version, "index_version": recommender.index_version,
                        "serving_path": convert.serving_path(recommender.path(query))}
        starts = range(0, len(items), page_size) if items else range(1)  # an empty ranking is one empty page
        per_message = metrics.STREAM_MESSAGE_SECONDS.labels("RecommendStream")
        for page, start in enumerate(starts):
            message = pb.RecommendStreamResponse(
                items=items[start : start + page_size],
                page=page,
                last=start + page_size >= len(items),
                **versions,
            )
            per_message.observe(time.perf_counter() - started)
            yield message
            started = time.perf_counter()  # resumed: gRPC took the previous page

    @_streaming
    async def Session(self, request_iterator, context) -> AsyncIterator[pb.SessionResponse]:
        with self.models.slot.lease() as recommender:  # RESOURCE_EXHAUSTED if full (server-wide or this client's)
            session = self.sessions.open(recommender, self.settings.default_session_k, self.fairness.identify(context))
        try:
            requests = aiter(request_iterator)
            while (request := await session.next_request(requests, self.settings.session_idle_timeout_s)) is not None:
                if isinstance(request, Undecodable):  # no event id to answer it under: the stream ends
                    raise request.error("Session")
                received = time.perf_counter()
                kind = request.WhichOneof("event") or "none"
                # Each event first waits while its client has its cap of requests in flight (server.fairness),
                # then leases the model it is answered by: after a hot swap, the next event moves the session to
                # the new model (Session.rebind). A waiting event holds no model, so it keeps no old one alive.
                with tracing.span(tracing.SESSION_EVENT, {"llmrec.session.event": kind}):
                    async with self.fairness.event(session.client):
                        with self.models.slot.lease() as recommender:
                            session.rebind(recommender)
                            response = await self._session_step(session, recommender, request)
                metrics.SESSION_EVENTS.labels(kind, _CODE_NAMES.get(response.status.code, "UNKNOWN")).inc()
                metrics.SESSION_EVENT_SECONDS.labels(kind).observe(time.perf_counter() - received)
                yield response  # outside the span: a stream may stay suspended here for minutes
            # The end of the requests: a half-close, or a cancel (grpc.aio reads that as the end too, then cancels
            # this task a moment later). Waiting that moment lets a cancel land here, so the call counts as
            # CANCELLED and not OK; a half-close only ends 20 ms later (best effort: measured, not guaranteed).
            await asyncio.sleep(_CANCEL_SETTLE_S)
        finally:
            self.sessions.close(session)  # idle timeout, half-close, ForgetSession or cancel: the state goes

    async def _session_step(self, session: SessionState, recommender: Recommender, request) -> pb.SessionResponse:
        """One event -> one response. A bad event is answered with its status; the stream stays open."""
        response = pb.SessionResponse(event_id=request.event_id, model_version=recommender.model_version,
                                      session_id=session.id)
        try:
            update = await session.handle(convert.session_event(request))
        except Exception as error:  # per-event status, never the end of the session
            code, message = status_for(error, "Session event")
            response.status.code = code_number(code)
            response.status.message = message
            response.history_length = session.state.history_length
            response.index_version = recommender.index_version
            return response
        response.index_version = recommender.index_version
        response.status.code = 0
        response.status.message = update.message
        response.items.extend(convert.recommended_items(update.items))
        response.history_length = update.history_length
        if update.path:
            response.serving_path = convert.serving_path(update.path)
        return response

    @_unary
    @_client_work
    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        items = [convert.item_fields(text) for text in request.items]
        users = [convert.user(u.history, u.context) for u in request.users]
        with self.models.slot.lease() as recommender:
            item_vectors, user_vectors = await recommender.embed(items, users, self.settings.max_embed_inputs)
            return pb.EmbedResponse(
                items=[pb.Vector(values=row.tolist()) for row in item_vectors],
                users=[pb.Vector(values=row.tolist()) for row in user_vectors],
                model_version=recommender.model_version,
            )

    @_unary
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.GetModelInfoResponse:
        with self.models.slot.lease() as recommender:
            return self._model_info(recommender)

    def _model_info(self, recommender: Recommender) -> pb.GetModelInfoResponse:
        bundle = recommender.bundle
        manifest = bundle.manifest
        return pb.GetModelInfoResponse(
            model_version=recommender.model_version,
            index_version=recommender.index_version,
            template_version=manifest.template_version,
            base_model=manifest.base_model,
            dimension=manifest.dimension,
            item_count=recommender.catalogue.count,
            execution_provider=bundle.encoder.provider,
            model_precision=bundle.precision,
            max_k=recommender.limits.max_k,
            max_history_items=recommender.limits.max_request_history,
            max_text_chars=recommender.limits.max_text_chars,
            created_at=manifest.created_at,
            history_item_score=manifest.history_item_score,
            cooccurrence_weight=manifest.cooccurrence.weight,
            history_vector_weight=manifest.history_vector.weight,
            sequence_model_weight=manifest.sequence_model.weight if manifest.sequence_model is not None else 0.0,
            last_load=convert.load_attempt_message(self.models.last_attempt),
            rejected_item_weight=recommender.rule.rejected_weight,
            max_rejected_items=recommender.limits.max_rejected_items,
            max_recommend_batch=self.settings.max_recommend_batch,
            fast_path=recommender.fast_rule is not None,
            ranking_stage_candidates=manifest.ranking_stage.candidates if bundle.ranker is not None else 0,
            ranking_stage_weight=manifest.ranking_stage.weight if bundle.ranker is not None else 0.0,
            ranking_stage_default=recommender.ranking_stage_default,
            new_item_boost=recommender.rule.new_item_boost,
            new_item_cooccurrence=recommender.rule.borrowed_cooccurrence,
            new_item_share=recommender.new_item_share,
        )

    @_unary
    async def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.LoadModelResponse:
        check_bundle_path(request.bundle_path, Limits.from_settings(self.settings))
        result = await self.models.swap(Path(request.bundle_path) if request.bundle_path else None, "rpc")
        return pb.LoadModelResponse(
            swapped=result.swapped, model_version=result.model_version,
            previous_model_version=result.previous_model_version, index_version=result.index_version,
            carried_changes=result.carried_changes, swap_seconds=result.seconds)

    @_unary
    async def ForgetSession(self, request: pb.ForgetSessionRequest, context) -> pb.ForgetSessionResponse:
        self.sessions.forget(request.session_id)
        return pb.ForgetSessionResponse()

    # --- catalogue -----------------------------------------------------------------------------------------

    @_unary
    @_client_work
    async def UpsertItems(self, request: pb.UpsertItemsRequest, context) -> pb.UpsertItemsResponse:
        items = [convert.catalogue_item(item) for item in request.items]
        async with self.models.slot.writing() as recommender:  # waits while a hot swap carries changes over
            result = await recommender.upsert_items(items)
        return pb.UpsertItemsResponse(created=result.created, replaced=result.replaced,
                                      item_count=result.item_count, index_version=result.index_version)

    @_unary
    async def DeleteItems(self, request: pb.DeleteItemsRequest, context) -> pb.DeleteItemsResponse:
        async with self.models.slot.writing() as recommender:
            result = await recommender.delete_items(list(request.item_ids), request.allow_missing)
        return pb.DeleteItemsResponse(deleted=result.deleted, item_count=result.item_count,
                                      index_version=result.index_version)

    @_unary
    async def GetItem(self, request: pb.GetItemRequest, context) -> pb.GetItemResponse:
        with self.models.slot.lease() as recommender:
            check_item_id(request.item_id, "item_id", recommender.limits)
            item, row = recommender.catalogue.get(request.item_id, include_vector=request.include_vector)
        return pb.GetItemResponse(item=convert.catalogue_item_message(item), upserted=item.upserted,
                                  vector=pb.Vector(values=row.tolist()) if row is not None else None)

    @_unary
    async def ListItems(self, request: pb.ListItemsRequest, context) -> pb.ListItemsResponse:
        with self.models.slot.lease() as recommender:
            page_size = check_list_page_size(request.page_size, recommender.limits)
            items, next_token, total = recommender.catalogue.list_page(page_size, request.page_token)
        # Bounded by bytes too: page_size large items can outgrow the message limit (the send would fail with
        # RESOURCE_EXHAUSTED). A page stops before the item that would pass the budget and its token continues
        # there; one item always goes, so every page makes progress.
        budget = max(self.settings.max_message_bytes - LIST_PAGE_MARGIN_BYTES, self.settings.max_message_bytes // 2)
        messages: list[pb.CatalogueItem] = []
        size = 0
        for item in items:
            message = convert.catalogue_item_message(item)
            size += _embedded_size(message.ByteSize())
            if messages and size > budget:
                next_token = page_token_after(messages[-1].item_id)
                break
            messages.append(message)
        return pb.ListItemsResponse(items=messages, next_page_token=next_token, total_count=total)


def _embedded_size(size: int) -> int:
    """Bytes a message of `size` bytes takes as a repeated field: tag, length varint, body."""
    return 1 + max(1, (size.bit_length() + 6) // 7) + size
