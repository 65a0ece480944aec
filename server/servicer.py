"""The llmrec.v1.Recommender gRPC service: thin methods that convert, call the core and convert back.

Versions reported in every response:
    model_version = manifest.bundle_version (the encoder and everything else in the bundle).
    index_version = "<bundle_version>:<item_count>" (the index is built with the bundle; the count shows
    catalogue size at a glance), plus ":r<revision>" once UpsertItems/DeleteItems have changed the catalogue.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc

from llmrec.v1 import recommender_pb2 as pb
from llmrec.v1 import recommender_pb2_grpc as pb_grpc

from llmrec.server import convert, metrics
from llmrec.server.encoding import set_request_deadline
from llmrec.server.errors import Unavailable, abort_with, code_number, status_for
from llmrec.server.recommender import Recommender
from llmrec.server.session import SessionRegistry
from llmrec.server.settings import ServerSettings
from llmrec.server.validation import check_item_id, check_list_page_size, check_page_size

logger = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def _rpc_scope(name: str, context) -> AsyncIterator[None]:
    """Domain errors -> their status; anything else -> INTERNAL (logged). Logs outcome and latency only."""
    started = time.perf_counter()
    code = grpc.StatusCode.OK
    set_request_deadline(context.time_remaining())  # the encoder drops work whose caller gave up
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except Exception as error:
        code, _ = status_for(error, name)
        await abort_with(context, error, name)
    finally:
        # Never the request itself: histories and queries are personal data.
        elapsed = time.perf_counter() - started
        metrics.observe_rpc(name, code.name, elapsed)
        logger.debug("%s %s in %.1f ms", name, code.name, elapsed * 1e3)


def _unary(method: Callable) -> Callable:
    @functools.wraps(method)
    async def wrapper(self, request, context):
        async with _rpc_scope(method.__name__, context):
            return await method(self, request, context)

    return wrapper


def _streaming(method: Callable) -> Callable:
    """The same as _unary for response-streaming methods."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        async with _rpc_scope(method.__name__, context):
            async for response in method(self, request, context):
                yield response

    return wrapper


class RecommenderServicer(pb_grpc.RecommenderServicer):
    """Serves one Recommender; answers UNAVAILABLE until `attach` gives it one (the model loads after bind).

    Args:
        settings: server settings (limits, page and session defaults, idle timeout).
    """

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self._recommender: Recommender | None = None
        self.sessions = SessionRegistry(settings.max_sessions)

    def attach(self, recommender: Recommender | None) -> None:
        """Start (or, with None, stop) answering with this recommender."""
        self._recommender = recommender

    def _ready(self) -> Recommender:
        if self._recommender is None:
            raise Unavailable("the model is not loaded yet (or the server is shutting down); retry shortly")
        return self._recommender

    @_unary
    async def Recommend(self, request: pb.RecommendRequest, context) -> pb.RecommendResponse:
        recommender = self._ready()
        items = await recommender.recommend(convert.recommend_query(request))
        return pb.RecommendResponse(
            items=convert.recommended_items(items),
            model_version=recommender.model_version,
            index_version=recommender.index_version,
        )

    @_streaming
    async def RecommendStream(self, request: pb.RecommendRequest, context) -> AsyncIterator[pb.RecommendStreamResponse]:
        recommender = self._ready()
        check_page_size(request.page_size)
        page_size = request.page_size or self.settings.default_page_size
        items = convert.recommended_items(await recommender.recommend(convert.recommend_query(request)))
        starts = range(0, len(items), page_size) if items else range(1)  # an empty ranking is one empty page
        for page, start in enumerate(starts):
            yield pb.RecommendStreamResponse(
                items=items[start : start + page_size],
                page=page,
                last=start + page_size >= len(items),
                model_version=recommender.model_version,
                index_version=recommender.index_version,
            )

    @_streaming
    async def Session(self, request_iterator, context) -> AsyncIterator[pb.SessionResponse]:
        recommender = self._ready()
        session = self.sessions.open(recommender, self.settings.default_session_k)  # RESOURCE_EXHAUSTED if full
        try:
            requests = aiter(request_iterator)
            while (request := await session.next_request(requests, self.settings.session_idle_timeout_s)) is not None:
                yield await self._session_step(session, recommender, request)
        finally:
            self.sessions.close(session)  # idle timeout, half-close, ForgetSession or cancel: the state goes

    async def _session_step(self, session: Session, recommender: Recommender, request) -> pb.SessionResponse:
        """One event -> one response. A bad event is answered with its status; the stream stays open."""
        response = pb.SessionResponse(
            event_id=request.event_id,
            model_version=recommender.model_version,
            index_version=recommender.index_version,
            session_id=session.id,
        )
        try:
            update = await session.handle(convert.session_event(request))
        except Exception as error:  # per-event status, never the end of the session
            code, message = status_for(error, "Session event")
            response.status.code = code_number(code)
            response.status.message = message
            response.history_length = session.state.history_length
            return response
        response.status.code = 0
        response.status.message = update.message
        response.items.extend(convert.recommended_items(update.items))
        response.history_length = update.history_length
        return response

    @_unary
    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        recommender = self._ready()
        items = [convert.item_fields(text) for text in request.items]
        users = [convert.user(u.history, u.context) for u in request.users]
        item_vectors, user_vectors = await recommender.embed(items, users, self.settings.max_embed_inputs)
        return pb.EmbedResponse(
            items=[pb.Vector(values=row.tolist()) for row in item_vectors],
            users=[pb.Vector(values=row.tolist()) for row in user_vectors],
            model_version=recommender.model_version,
        )

    @_unary
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.GetModelInfoResponse:
        recommender = self._ready()
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
        )

    @_unary
    async def ForgetSession(self, request: pb.ForgetSessionRequest, context) -> pb.ForgetSessionResponse:
        self.sessions.forget(request.session_id)
        return pb.ForgetSessionResponse()

    # --- catalogue -----------------------------------------------------------------------------------------

    @_unary
    async def UpsertItems(self, request: pb.UpsertItemsRequest, context) -> pb.UpsertItemsResponse:
        result = await self._ready().upsert_items([convert.catalogue_item(item) for item in request.items])
        return pb.UpsertItemsResponse(created=result.created, replaced=result.replaced,
                                      item_count=result.item_count, index_version=result.index_version)

    @_unary
    async def DeleteItems(self, request: pb.DeleteItemsRequest, context) -> pb.DeleteItemsResponse:
        result = await self._ready().delete_items(list(request.item_ids), request.allow_missing)
        return pb.DeleteItemsResponse(deleted=result.deleted, item_count=result.item_count,
                                      index_version=result.index_version)

    @_unary
    async def GetItem(self, request: pb.GetItemRequest, context) -> pb.GetItemResponse:
        recommender = self._ready()
        check_item_id(request.item_id, "item_id", recommender.limits)
        item, row = recommender.catalogue.get(request.item_id, include_vector=request.include_vector)
        return pb.GetItemResponse(item=convert.catalogue_item_message(item), upserted=item.upserted,
                                  vector=pb.Vector(values=row.tolist()) if row is not None else None)

    @_unary
    async def ListItems(self, request: pb.ListItemsRequest, context) -> pb.ListItemsResponse:
        recommender = self._ready()
        page_size = check_list_page_size(request.page_size, recommender.limits)
        items, next_token, total = recommender.catalogue.list_page(page_size, request.page_token)
        return pb.ListItemsResponse(items=[convert.catalogue_item_message(i) for i in items],
                                    next_page_token=next_token, total_count=total)
