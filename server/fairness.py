"""Fair sharing between clients: who a caller is, and per-client caps on live sessions and in-flight work.

Who a client is (client_key):
    * authorization on (server.security): the authenticated identity's name (a token's name, a certificate's
      CN or SAN); metadata cannot change it.
    * authorization off: the `llmrec-client-id` metadata when the caller sends it (RecommenderClient(client_id=),
      `llmrec --client-id`), else the caller's address without its port, so every caller behind one address (a
      NAT, a proxy, 127.0.0.1) shares one allowance. Without authorization an id is whatever the caller says:
      fair sharing then keeps well-behaved clients, and accidents, from starving each other, not a hostile
      caller, which can send any id. Turn authorization on for that.

The caps (settings; RESOURCE_EXHAUSTED with ErrorInfo and a RetryInfo beyond them):
    max_sessions_per_client: live Session streams of one client (default: half of max_sessions). One more is
        refused when it opens: reason CLIENT_SESSION_LIMIT, retry after 5 s (server.session.SessionRegistry
        enforces it beside the server-wide cap).
    max_inflight_per_client: RPCs of one client that use the encoder (Recommend, RecommendStream,
        RecommendBatch, Embed, UpsertItems), running at once (default: half of max_queue, so that one client
        alone does not fill the encoder queue that the others need too; a RecommendBatch counts once but may wait
        in one queue slot per encoder worker). One more is refused at once: reason
        CLIENT_BUSY, retry after BUSY_RETRY_S. Session events count against the same cap but wait for a slot
        instead of failing: a stream has at most one event in flight, and not reading it is the stream's own
        back-pressure (a backend that multiplexes many users' sessions gets its share, not errors).
Half by default: whatever one client does, half of each resource stays for the others.

The caps bound how much one client holds; the order in which the encoder serves what is waiting bounds how long
the others wait behind it. Every encoder request is tagged with its client (encoding.REQUEST_CLIENT, set here)
and the encoder serves clients in fair order (server.encoding).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from llmrec.server import metrics
from llmrec.server.encoding import REQUEST_CLIENT
from llmrec.server.errors import REASON_CLIENT_BUSY, ResourceExhausted, shown_id
from llmrec.server.security import current_identity

if TYPE_CHECKING:
    from llmrec.server.settings import ServerSettings

CLIENT_ID_METADATA = "llmrec-client-id"
MAX_CLIENT_ID_CHARS = 128  # a longer id is cut: it names a client, it is no place for data
BUSY_RETRY_S = 0.2  # a few requests' time on a busy 2-core server


def client_key(context) -> str:
    """The client the current call counts against (see the module docstring), as "<kind>:<name>"."""
    identity = current_identity()
    if identity is not None:
        return f"identity:{identity.name}"
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_ID_METADATA and isinstance(value, str) and value.strip():
            return f"client-id:{value.strip()[:MAX_CLIENT_ID_CHARS]}"
    return f"peer:{peer_host(context.peer() or '')}"


def peer_host(peer: str) -> str:
    """A gRPC peer without its port: "ipv4:10.0.0.7:53124" -> "10.0.0.7", "ipv6:[::1]:53124" -> "::1"; other
    forms ("unix:/path") as they are."""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in address:
        return address.rsplit(":", 1)[0].strip("[]")
    return peer


@dataclasses.dataclass
class _Client:
    slots: asyncio.Semaphore  # in-flight work
    users: int = 0  # holders and waiters of a slot: the entry goes when none is left


class FairShare:
    """The per-client caps of one server. Used on the event loop only (no locks needed).

    Args:
        max_sessions_per_client: live sessions one client may hold (the session registry enforces it).
        max_inflight_per_client: encoder-using RPCs (and session events) one client may have running.
    """

    def __init__(self, max_sessions_per_client: int, max_inflight_per_client: int) -> None:
        self.max_sessions_per_client = max_sessions_per_client
        self.max_inflight_per_client = max_inflight_per_client
        self._clients: dict[str, _Client] = {}

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> FairShare:
        """The caps the settings give; unset ones are half of the server-wide resource (at least 1)."""
        return cls(settings.max_sessions_per_client or max(1, settings.max_sessions // 2),
                   settings.max_inflight_per_client or max(1, settings.max_queue // 2))

    @staticmethod
    def identify(context) -> str:
        """The calling client's key, also recorded for the encoder's fair order (encoding.REQUEST_CLIENT)."""
        client = client_key(context)
        REQUEST_CLIENT.set(client)
        return client

    @contextlib.asynccontextmanager
    async def work(self, context) -> AsyncIterator[str]:
        """One encoder-using RPC of the calling client while the block runs; yields the client key.

        Raises:
            ResourceExhausted: at once, when the client already has max_inflight_per_client of them running (or
                session events waiting for a slot).
        """
        client = self.identify(context)
        async with self._slot(client, wait=False):
            yield client

    @contextlib.asynccontextmanager
    async def event(self, client: str) -> AsyncIterator[None]:
        """One Session event of `client` while the block runs: waits for a slot rather than failing."""
        async with self._slot(client, wait=True):
            yield

    @contextlib.asynccontextmanager
    async def _slot(self, client: str, wait: bool) -> AsyncIterator[None]:
        entry = self._clients.get(client)
        if entry is None:
            entry = self._clients[client] = _Client(asyncio.Semaphore(self.max_inflight_per_client))
        if not wait and entry.slots.locked():  # locked: no slot free, or events already waiting for one
            if not entry.users:
                del self._clients[client]
            metrics.CLIENT_REFUSED.labels("in_flight").inc()
            raise ResourceExhausted(
                f"this client ({shown_id(client)}) already has {self.max_inflight_per_client} requests in flight, "
                "its share of the encoder; wait for answers before sending more, or retry shortly",
                reason=REASON_CLIENT_BUSY,
                metadata={"client": client, "max_inflight_per_client": str(self.max_inflight_per_client)},
                retry_after_s=BUSY_RETRY_S)
        entry.users += 1
        try:
            async with entry.slots:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._clients[client]
