"""ModelSlot (server.models): leases keep a swapped-out model open until its requests finish; catalogue writes are
held back while a swap carries changes over. The generations are stand-ins: only their close() is observed."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmrec.server.errors import Unavailable
from llmrec.server.models import Generation, ModelSlot


def generation(version: str) -> Generation:
    closed = threading.Event()
    recommender = SimpleNamespace(model_version=version, catalogue=SimpleNamespace(close=lambda: None))
    made = Generation(recommender, SimpleNamespace(close=closed.set), Path(version))
    made.closed = closed  # what the tests look at
    return made


async def settle(times: int = 20) -> None:
    """Let scheduled callbacks and to_thread closes run."""
    for _ in range(times):
        await asyncio.sleep(0.01)


def test_nothing_loaded_is_unavailable():
    with pytest.raises(Unavailable, match="not loaded"):
        with ModelSlot().lease():
            pass


def test_a_swapped_out_model_closes_only_after_its_last_lease():
    async def scenario():
        slot = ModelSlot()
        old, new = generation("old"), generation("new")
        slot.swap(old)
        with slot.lease() as during:
            assert slot.swap(new) is old
            with slot.lease() as after:
                assert (during, after) == (old.recommender, new.recommender)
            await settle()
            assert not old.closed.is_set()  # a request still runs on it
        await settle()
        assert old.closed.is_set() and not new.closed.is_set()
        await slot.close_all(timeout_s=1)
        assert new.closed.is_set() and slot.current is None

    asyncio.run(scenario())


def test_a_freeze_waits_for_running_writes_and_holds_new_ones_back():
    async def scenario():
        slot = ModelSlot()
        old, new = generation("old"), generation("new")
        slot.swap(old)
        order: list[str] = []
        release_write = asyncio.Event()

        async def running_write():
            async with slot.writing() as recommender:
                order.append(f"write on {recommender.model_version} starts")
                await release_write.wait()
                order.append("running write ends")

        async def swap():
            async with slot.frozen():
                order.append("frozen")
                late = asyncio.create_task(late_write())
                await settle()
                slot.swap(new)
                order.append("swapped")
            await late

        async def late_write():
            async with slot.writing() as recommender:
                order.append(f"late write on {recommender.model_version}")

        writing = asyncio.create_task(running_write())
        await settle()
        swapping = asyncio.create_task(swap())
        await settle()
        assert order == ["write on old starts"]  # the freeze waits for it
        release_write.set()
        await asyncio.gather(writing, swapping)
        assert order == ["write on old starts", "running write ends", "frozen", "swapped", "late write on new"]
        await slot.close_all(timeout_s=1)

    asyncio.run(scenario())


def test_swapping_back_waits_until_the_old_generation_of_that_version_has_closed():
    async def scenario():
        slot = ModelSlot()
        first, second = generation("a"), generation("b")
        slot.swap(first)
        with slot.lease():
            slot.swap(second)
            waiting = asyncio.create_task(slot.released("a", timeout_s=30))
            await settle()
            assert not waiting.done()  # "a" still holds its state directory
        await asyncio.wait_for(waiting, 10)
        assert first.closed.is_set()
        await slot.close_all(timeout_s=1)

    asyncio.run(scenario())


def test_close_all_closes_under_a_lease_that_outlives_the_timeout():
    async def scenario():
        slot = ModelSlot()
        stuck = generation("stuck")
        slot.swap(stuck)
        with slot.lease():
            await slot.close_all(timeout_s=0.05)
            assert stuck.closed.is_set()

    asyncio.run(scenario())
