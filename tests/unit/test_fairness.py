"""server.fairness: who a caller is, the in-flight cap (refused at once for RPCs, waited for by session events)."""

from __future__ import annotations

import asyncio

import pytest

from llmrec.server import security
from llmrec.server.encoding import REQUEST_CLIENT
from llmrec.server.errors import ResourceExhausted
from llmrec.server.fairness import FairShare, client_key, peer_host
from llmrec.server.settings import ServerSettings


class Context:
    def __init__(self, peer: str = "ipv4:10.0.0.7:53124", metadata=()) -> None:
        self._peer, self._metadata = peer, tuple(metadata)

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self):
        return self._metadata


def test_a_client_is_its_identity_else_its_declared_id_else_its_address():
    assert client_key(Context()) == "peer:10.0.0.7"
    assert client_key(Context("ipv6:[::1]:5000")) == "peer:::1"
    assert client_key(Context(metadata=[("llmrec-client-id", " shop-frontend ")])) == "client-id:shop-frontend"
    assert client_key(Context(metadata=[("llmrec-client-id", "x" * 500)])) == "client-id:" + "x" * 128
    token = security._IDENTITY.set(security.Identity("reporting", frozenset({"read"}), "token"))
    try:  # authenticated: the identity decides, whatever the metadata says
        assert client_key(Context(metadata=[("llmrec-client-id", "someone-else")])) == "identity:reporting"
    finally:
        security._IDENTITY.reset(token)
    assert peer_host("unix:/run/llmrec.sock") == "unix:/run/llmrec.sock"


def test_unset_caps_are_half_of_the_server_wide_ones(tmp_path):
    fair = FairShare.from_settings(ServerSettings(bundle=tmp_path, max_sessions=9, max_queue=128))
    assert (fair.max_sessions_per_client, fair.max_inflight_per_client) == (4, 64)
    fair = FairShare.from_settings(ServerSettings(bundle=tmp_path, max_sessions_per_client=3,
                                                  max_inflight_per_client=1, max_queue=1))
    assert (fair.max_sessions_per_client, fair.max_inflight_per_client) == (3, 1)


def test_work_past_the_cap_is_refused_at_once_and_events_wait_their_turn():
    fair = FairShare(max_sessions_per_client=10, max_inflight_per_client=2)
    a, b = Context(metadata=[("llmrec-client-id", "a")]), Context(metadata=[("llmrec-client-id", "b")])

    async def main():
        order: list[str] = []
        release = asyncio.Event()

        async def work(context, name):
            async with fair.work(context) as client:
                assert REQUEST_CLIENT.get() == client  # the encoder's fair order sees the same client
                order.append(f"start {name}")
                await release.wait()

        async def event(name):
            async with fair.event("client-id:a"):
                order.append(f"start {name}")

        holders = [asyncio.ensure_future(work(a, f"a{n}")) for n in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(ResourceExhausted, match="already has 2 requests in flight") as caught:
            await work(a, "a2")
        assert caught.value.reason == "CLIENT_BUSY" and caught.value.retry_after_s > 0
        other = asyncio.ensure_future(work(b, "b0"))  # another client is not held back
        waiting = asyncio.ensure_future(event("e0"))
        await asyncio.sleep(0.01)
        assert "start e0" not in order and "start b0" in order
        release.set()
        await asyncio.gather(*holders, other, waiting)
        assert order.index("start e0") > order.index("start a1")
        assert fair._clients == {}  # nothing is kept for clients with nothing in flight

    asyncio.run(main())


def test_a_cancelled_waiting_event_gives_its_place_up():
    fair = FairShare(max_sessions_per_client=10, max_inflight_per_client=1)

    async def main():
        release = asyncio.Event()

        async def hold():
            async with fair.event("c"):
                await release.wait()

        holder = asyncio.ensure_future(hold())
        await asyncio.sleep(0.01)
        waiter = asyncio.ensure_future(hold())
        await asyncio.sleep(0.01)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        release.set()
        await holder
        assert fair._clients == {}
        async with fair.work(Context(metadata=[("llmrec-client-id", "c")])):  # the slot is free again
            pass

    asyncio.run(main())
