"""Live recommendation sessions: state that events update, a fresh ranking after each event, and the registry.

Semantics (documented for callers in the proto comments and here):
- config: sets k (0 = the server default), exclusions, exclude_history, filters and explain; a non-empty
  config.history replaces the session history, an empty one keeps it.
- interaction: appends one item to the history. The session keeps the most recent max_request_history
  items; older ones fall off (the model only reads the most recent few anyway).
- context: replaces the whole context, its query included.
- query: replaces only the query ("" clears it).
- rejection: adds one rejected item id (at most max_rejected_items per session; a config with a non-empty
  rejected_item_ids replaces them all). Rejected items are never returned, and the query moves away from them
  (llmrec.scoring). A rejection costs no inference: the user text, and so the cached vector, stay the same.
An event that fails (unknown id, bad k, oversized text, or an internal error) leaves the state as it was.

Cost per event is bounded whatever the history length: the state keeps the resolved and rendered window
the model reads (the most recent max_history_items entries), the ids of the bounded history (for
exclude_history), and the last user text with its vector. An interaction resolves and renders one item and
the user text is joined from the kept parts (llmrec.template.join_user_text, so it is exactly what
render_user gives); an event that leaves the text unchanged (k, exclusions, filters, explain) reuses the
cached vector and costs no inference. Catalogue items keep the text they had when they entered the window.
On the fast path (server.recommender: every history entry a catalogued item, no query) no event costs an
inference: an interaction with a catalogued item only updates the query over the catalogue's vectors.

Lifetime: a session lives as long as its Session stream. It ends when the client half-closes, after
session_idle_timeout_s without an event (DEADLINE_EXCEEDED), by ForgetSession(session_id) (ABORTED), or when the
server shuts down (UNAVAILABLE, reason SHUTTING_DOWN, with a RetryInfo: reconnect, to another replica), and its
state is dropped then; nothing of it is written anywhere. An event being answered when the server starts to shut
down is answered first. The registry caps live sessions server-wide and per client (server.fairness;
RESOURCE_EXHAUSTED with a RetryInfo when full).

Hot model swaps (server.models): a session is not ended by one. An event in flight when the model is swapped is
answered by the model it started on; the session then continues on the new model (`rebind`: at the swap for
sessions waiting for their next event, so that they do not keep the old model in memory, else at the next): its
history, rejected items, context and settings stay, the vectors the old model made are dropped (the next event
encodes the user text afresh), and the catalogue items of its window take the new catalogue's text and vectors (an
item the new catalogue lacks keeps its text and counts as an item given as text). Every response names the model
that made it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import secrets
from collections.abc import AsyncIterator

import numpy as np

from llmrec.template import RequestContext, join_user_text, render_context, render_history_item

from llmrec.server import metrics, validation
from llmrec.server.catalogue import ResolvedItem
from llmrec.server.domain import AttributeFilter, HistoryRef, ScoredItem
from llmrec.server.recommender import FAST_PATH
from llmrec.server.errors import (
    REASON_CLIENT_SESSIONS, REASON_SESSION_FORGOTTEN, REASON_SESSION_IDLE, REASON_SESSION_NOT_FOUND,
    REASON_TOO_MANY_SESSIONS, Aborted, DeadlineExceeded, InvalidArgument, NotFound, ResourceExhausted, ServiceError,
    shown_id,
)

NOTHING_YET_MESSAGE = "nothing to recommend from yet: send an interaction or a query"


@dataclasses.dataclass(frozen=True)
class SessionConfigEvent:
    k: int = 0
    exclude_item_ids: frozenset[str] = frozenset()
    exclude_history: bool = False
    history: tuple[HistoryRef, ...] = ()
    explain: bool = False
    filters: tuple[AttributeFilter, ...] = ()
    rejected_item_ids: tuple[str, ...] = ()
    min_score: float | None = None
    force_full_path: bool = False


@dataclasses.dataclass(frozen=True)
class InteractionEvent:
    item: HistoryRef


@dataclasses.dataclass(frozen=True)
class ContextEvent:
    context: RequestContext


@dataclasses.dataclass(frozen=True)
class QueryEvent:
    query: str


@dataclasses.dataclass(frozen=True)
class RejectionEvent:
    item_id: str


SessionEvent = SessionConfigEvent | InteractionEvent | ContextEvent | QueryEvent | RejectionEvent


@dataclasses.dataclass(frozen=True)
class WindowEntry:
    """One history entry the model reads: resolved once, rendered once."""

    resolved: ResolvedItem
    rendered: str  # llmrec.template.render_history_item(resolved.fields)

    @classmethod
    def of(cls, resolved: ResolvedItem) -> WindowEntry:
        return cls(resolved, render_history_item(resolved.fields))


@dataclasses.dataclass(frozen=True)
class SessionState:
    """Everything a session remembers. Immutable: an event yields a new state, committed only if valid.

    Attributes:
        k: items per answer.
        history_ids: the catalogue id of every kept history entry (None for items given as text), oldest
            first, at most max_request_history.
        window: the most recent max_history_items entries, resolved and rendered.
        context: the current context; context_text is its rendering.
        rejected_ids: the items the user rejected, distinct, in the order they came.
        min_score: drop items scoring below it (None: no threshold).
        force_full_path: run the encoder even where the fast path would serve.
    """

    k: int
    history_ids: tuple[str | None, ...] = ()
    window: tuple[WindowEntry, ...] = ()
    context: RequestContext = RequestContext()
    context_text: str = ""
    exclude_item_ids: frozenset[str] = frozenset()
    exclude_history: bool = False
    explain: bool = False
    filters: tuple[AttributeFilter, ...] = ()
    rejected_ids: tuple[str, ...] = ()
    min_score: float | None = None
    force_full_path: bool = False

    @property
    def history_length(self) -> int:
        return len(self.history_ids)

    @property
    def has_content(self) -> bool:
        return bool(self.history_ids) or bool(self.context.query.strip())

    @property
    def catalogued_history(self) -> bool:
        """A non-empty history of catalogued items only (none given as text, none the catalogue lacks since a
        model swap): what the fast path reads."""
        return bool(self.history_ids) and all(i is not None for i in self.history_ids) and \
            all(entry.resolved.vector is not None for entry in self.window)

    @property
    def user_text(self) -> str:
        """The model input, exactly as llmrec.template.render_user renders this history and context."""
        return join_user_text(self.context_text, [entry.rendered for entry in reversed(self.window)])

    def excluded_ids(self) -> frozenset[str]:
        if not self.exclude_history:
            return self.exclude_item_ids
        return self.exclude_item_ids | {i for i in self.history_ids if i is not None}


@dataclasses.dataclass(frozen=True)
class SessionUpdate:
    """The answer to one event: the new ranking (empty while there is nothing to rank from)."""

    items: list[ScoredItem]
    history_length: int
    message: str = ""
    path: str = ""  # server.recommender's FULL_PATH or FAST_PATH; "" when nothing was ranked


class Session:
    """One client's session against a recommender.

    Args:
        recommender: the core that resolves, encodes, ranks and explains (server.recommender.Recommender).
        default_k: k until a config event sets one.
        session_id: the server-assigned id (SessionResponse.session_id).
        client: the client it belongs to (server.fairness.client_key).
    """

    def __init__(self, recommender, default_k: int, session_id: str = "", client: str = "") -> None:
        self.recommender = recommender
        self.default_k = default_k
        self.id = session_id
        self.client = client
        self.state = SessionState(k=default_k)
        self.encodes = 0  # user-text inferences so far: at most one per event, none when the text is unchanged
        self.forgotten = False
        self.answering = False  # an event is being answered
        self._ending: ServiceError | None = None  # set by end(): the status the stream ends with
        self._ended = asyncio.Event()
        self._ended_waiter: asyncio.Future | None = None
        self._cached_text: str | None = None
        self._cached_vector: np.ndarray | None = None
        self._text_vectors: dict[str, np.ndarray] = {}  # item-tower vectors for explanations

    def apply(self, event: SessionEvent) -> SessionState:
        """The state after `event`, checked; self.state is not touched.

        Raises:
            InvalidArgument, NotFound: the event is bad; the session state stays as it was.
        """
        recommender = self.recommender
        limits = recommender.limits
        state = self.state
        window_size = max(recommender.max_history_items, 0)
        if isinstance(event, SessionConfigEvent):
            k = event.k or self.default_k
            validation.check_k(k, limits, "config.k")
            validation.check_exclusions(event.exclude_item_ids, limits, "config.exclude_item_ids")
            validation.check_filters(event.filters, limits, "config.filters")
            validation.check_history(event.history, limits, "config.history")
            validation.check_rejected(event.rejected_item_ids, limits, "config.rejected_item_ids")
            validation.check_min_score(event.min_score, "config.min_score")
            state = dataclasses.replace(
                state, k=k, exclude_item_ids=event.exclude_item_ids, exclude_history=event.exclude_history,
                explain=event.explain, filters=event.filters, min_score=event.min_score,
                force_full_path=event.force_full_path,
            )
            if event.rejected_item_ids:
                state = dataclasses.replace(state, rejected_ids=tuple(dict.fromkeys(event.rejected_item_ids)))
            if event.history:
                resolved = recommender.resolve(event.history, with_window_vectors=True)
                window = tuple(WindowEntry.of(r) for r in resolved[len(resolved) - window_size:]) \
                    if window_size else ()
                state = dataclasses.replace(state, history_ids=tuple(r.item_id for r in resolved), window=window)
        elif isinstance(event, InteractionEvent):
            validation.check_history_ref(event.item, "interaction", limits)
            (resolved,) = recommender.resolve([event.item], with_window_vectors=True)
            history_ids = (*state.history_ids, resolved.item_id)[-limits.max_request_history:]
            window = (*state.window, WindowEntry.of(resolved))[-window_size:] if window_size else ()
            state = dataclasses.replace(state, history_ids=history_ids, window=window)
        elif isinstance(event, ContextEvent):
            validation.check_context(event.context, limits)
            state = dataclasses.replace(state, context=event.context, context_text=render_context(event.context))
        elif isinstance(event, QueryEvent):
            validation.check_text(event.query, "query", limits)
            context = dataclasses.replace(state.context, query=event.query)
            state = dataclasses.replace(state, context=context, context_text=render_context(context))
        elif isinstance(event, RejectionEvent):
            validation.check_item_id(event.item_id, "rejection", limits)
            if event.item_id not in state.rejected_ids:
                if len(state.rejected_ids) >= limits.max_rejected_items:
                    raise InvalidArgument(
                        f"the session already holds {limits.max_rejected_items} rejected items, the limit; send a "
                        "config with rejected_item_ids to replace them", field="rejection")
                state = dataclasses.replace(state, rejected_ids=(*state.rejected_ids, event.item_id))
        else:
            raise InvalidArgument("the event sets none of config, interaction, context, query and rejection")
        return state

    async def handle(self, event: SessionEvent) -> SessionUpdate:
        """Apply one event and rank again.

        Raises:
            InvalidArgument, NotFound: the event is bad. On any error the session state stays as it was.
            Aborted: the session was forgotten meanwhile.
        """
        self.answering = True  # one model answers the whole event: rebind waits until it is done
        try:
            return await self._answer(event)
        finally:
            self.answering = False

    async def _answer(self, event: SessionEvent) -> SessionUpdate:
        self._check_live()
        state = self.apply(event)
        if not state.has_content:
            self.state = state
            return SessionUpdate(items=[], history_length=state.history_length, message=NOTHING_YET_MESSAGE)
        recommender = self.recommender
        path = recommender.path_for(state.catalogued_history, state.context, state.force_full_path)
        text, vector = self._cached_text, self._cached_vector
        if path == FAST_PATH:
            vector = None  # no encoder: search ranks with the fast rule; the cache stays for a later full event
        elif state.user_text != text or vector is None:
            text = state.user_text
            vector = await recommender.encode_user(text)
            self.encodes += 1
        items = recommender.search(vector, state.k, state.excluded_ids(), state.filters, state.history_ids,
                                   state.rejected_ids, state.min_score)
        if state.explain:
            items = await recommender.explain(items, [entry.resolved for entry in state.window],
                                              state.context.query, self._text_vectors)
        self._check_live()  # ForgetSession may have run while this event was being answered
        self.state = state  # committed only once the event has been fully answered
        self._cached_text, self._cached_vector = text, self._cached_vector if vector is None else vector
        return SessionUpdate(items=items, history_length=state.history_length, path=path)

    def rebind(self, recommender) -> None:
        """Go on with another recommender (a hot-swapped model); see the module docstring. Not while an event is
        being answered."""
        if recommender is self.recommender:
            return
        window_size = max(recommender.max_history_items, 0)
        entries = self.state.window[-window_size:] if window_size else ()
        found = recommender.catalogue.find(e.resolved.item_id for e in entries if e.resolved.item_id is not None)
        window = tuple(WindowEntry.of(found.get(e.resolved.item_id) or ResolvedItem(e.resolved.item_id,
                                                                                     e.resolved.fields))
                       if e.resolved.item_id is not None else e for e in entries)
        self.recommender = recommender
        self.state = dataclasses.replace(self.state, window=window)
        self._cached_text = self._cached_vector = None
        self._text_vectors = {}

    def end(self, error: ServiceError) -> None:
        """End the stream with `error` once the event being answered (if any) has been answered."""
        self._ending = error
        self._ended.set()

    def forget(self) -> None:
        """Drop everything the session holds and end its stream (ABORTED)."""
        self.forgotten = True
        self.state = SessionState(k=self.default_k)
        self._cached_text = self._cached_vector = None
        self._text_vectors = {}
        self._ended.set()

    def _check_live(self) -> None:
        if self.forgotten:
            raise Aborted(f"session {self.id} was ended by ForgetSession; the server holds nothing of it",
                          reason=REASON_SESSION_FORGOTTEN)

    async def next_request(self, requests: AsyncIterator, idle_timeout_s: float):
        """The next request from the stream; None when the client has half-closed.

        Raises:
            DeadlineExceeded: nothing came for idle_timeout_s seconds.
            Aborted: ForgetSession ended the session.
            ServiceError: the error end() was given (the server is shutting down).
        """
        self._check_live()
        if self._ending is not None:
            raise self._ending
        if self._ended_waiter is None:
            self._ended_waiter = _quiet(asyncio.ensure_future(self._ended.wait()))
        # Its outcome is always collected (_quiet), also when this call is cancelled or times out first: a read
        # that ends the moment the stream is cancelled (StopAsyncIteration, an RPC error) is otherwise logged as
        # "Task exception was never retrieved".
        reading = _quiet(asyncio.ensure_future(anext(requests)))
        try:
            done, _ = await asyncio.wait({reading, self._ended_waiter}, timeout=idle_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not reading.done():
                reading.cancel()
        if self.forgotten:
            self._check_live()
        if self._ending is not None:
            raise self._ending
        if reading not in done:
            raise DeadlineExceeded(f"session closed after {idle_timeout_s:g} s without an event",
                                   reason=REASON_SESSION_IDLE)
        try:
            return reading.result()
        except StopAsyncIteration:
            return None

    def close(self) -> None:
        """Release what the stream used (the state goes with the object)."""
        if self._ended_waiter is not None:
            self._ended_waiter.cancel()
            self._ended_waiter = None


def _quiet(task: asyncio.Future) -> asyncio.Future:
    """`task`, its outcome marked as collected whenever it ends (whoever awaits it still gets it)."""
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
    return task


class SessionRegistry:
    """The live sessions of one server, by id; at most max_sessions at once, max_per_client of one client.

    Args:
        max_sessions: the server-wide cap; opening one more raises ResourceExhausted.
        max_per_client: the cap of one client (server.fairness); None: only the server-wide one.
    """

    def __init__(self, max_sessions: int, max_per_client: int | None = None) -> None:
        self.max_sessions = max_sessions
        self.max_per_client = max_per_client
        self._sessions: dict[str, Session] = {}
        self._per_client: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, recommender, default_k: int, client: str = "") -> Session:
        """A new session of `client`. Raises ResourceExhausted when the server or the client is at its cap."""
        if len(self._sessions) >= self.max_sessions:
            raise ResourceExhausted(f"the server already holds its maximum of {self.max_sessions} live sessions; "
                                    "retry later or end idle sessions", reason=REASON_TOO_MANY_SESSIONS,
                                    metadata={"max_sessions": str(self.max_sessions)}, retry_after_s=5.0)
        if self.max_per_client is not None and self._per_client[client] >= self.max_per_client:
            metrics.CLIENT_REFUSED.labels("sessions").inc()
            raise ResourceExhausted(
                f"this client ({shown_id(client)}) already holds its maximum of {self.max_per_client} live sessions; "
                "end one (half-close or ForgetSession) or retry later", reason=REASON_CLIENT_SESSIONS,
                metadata={"client": client, "max_sessions_per_client": str(self.max_per_client)}, retry_after_s=5.0)
        session_id = secrets.token_urlsafe(16)  # unguessable: knowing it is what allows ForgetSession
        session = Session(recommender, default_k, session_id, client)
        self._sessions[session_id] = session
        self._per_client[client] += 1
        return session

    def close(self, session: Session) -> None:
        """The stream ended: forget the session's state and free its slots."""
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]
            self._release_client(session.client)
        session.close()

    def _release_client(self, client: str) -> None:
        self._per_client[client] -= 1
        if self._per_client[client] <= 0:
            del self._per_client[client]

    def rebind_idle(self, recommender) -> None:
        """Move every session that is not answering an event to `recommender` now (the others move at their next
        event), so that a swapped-out model is not kept in memory by idle sessions."""
        for session in list(self._sessions.values()):
            if not session.answering:
                session.rebind(recommender)

    def end_all(self, error: ServiceError) -> int:
        """End every live session's stream with `error` (each after the event it is answering). Returns how many."""
        sessions = list(self._sessions.values())
        for session in sessions:
            session.end(error)
        return len(sessions)

    def forget(self, session_id: str) -> None:
        """Drop a live session's state and end its stream.

        Raises:
            InvalidArgument: no id given. NotFound: no live session has this id (an ended one holds no state).
        """
        if not session_id:
            raise InvalidArgument("session_id is empty: pass SessionResponse.session_id", field="session_id")
        session = self._sessions.pop(session_id, None)
        if session is None:
            raise NotFound("no live session has this id; a session that ended holds no state on this server",
                           reason=REASON_SESSION_NOT_FOUND)
        self._release_client(session.client)
        session.forget()
