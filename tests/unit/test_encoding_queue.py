"""server.encoding with a fake model: run grouping, bounded queue, deadlines, cancellation, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from llmrec.server import metrics
from llmrec.server.encoding import REQUEST_CLIENT, REQUEST_DEADLINE, AsyncEncoder, BatchPolicy
from llmrec.server.errors import DeadlineExceeded, ResourceExhausted, Unavailable


class FakeEncoder:
    """Tokens = one id per character; a run returns one vector per row and records what it saw.

    While `gate` is clear, a run blocks (so tests can fill the queue behind it).
    """

    provider = "CPUExecutionProvider"
    dimension = 4

    def __init__(self) -> None:
        self.runs: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.running = threading.Event()

    def token_ids(self, texts, max_tokens):
        return [[ord(c) for c in text][:max_tokens] or [0] for text in texts]

    @staticmethod
    def padded_width(length, max_tokens):
        return min(max_tokens, -(-max(length, 1) // 4) * 4)

    def pad(self, rows, max_tokens):
        width = self.padded_width(max(len(r) for r in rows), max_tokens)
        ids = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
        return ids, (ids != 0).astype(np.int64)

    def encode_tokens(self, ids, mask):
        self.running.set()
        self.gate.wait(10)
        self.runs.append(["".join(chr(c) for c in row if c) for row in ids])
        out = np.zeros((len(ids), self.dimension), dtype=np.float32)
        out[:, 0] = ids.sum(axis=1)
        return out


def _encoder(fake: FakeEncoder, workers: int = 1, **policy) -> AsyncEncoder:
    return AsyncEncoder(fake, max_user_tokens=32, max_item_tokens=16, workers=workers, policy=BatchPolicy(**policy))


def _dropped(reason: str) -> float:
    return metrics.DROPPED.labels(reason)._value.get()


def test_on_cpu_every_text_runs_alone_and_gets_its_own_vector():
    fake = FakeEncoder()
    encoder = _encoder(fake)
    try:
        async def main():
            return await asyncio.gather(encoder.encode_users(["abc", "defgh"]), encoder.encode_items(["xy"]),
                                        encoder.encode_users(["abc"]))

        both, item, again = asyncio.run(main())
    finally:
        encoder.close()
    assert not encoder.across_requests
    assert all(len(run) == 1 for run in fake.runs) and len(fake.runs) == 4
    assert both[0, 0] == sum(map(ord, "abc")) and both[1, 0] == sum(map(ord, "defgh"))
    assert item[0, 0] == sum(map(ord, "xy")) and np.array_equal(again[0], both[0])


def test_across_requests_groups_texts_by_width_within_the_token_budget():
    fake = FakeEncoder()
    fake.gate.clear()
    encoder = _encoder(fake, across_requests=True, max_tokens=8, max_delay_s=0.05)
    try:
        async def main():
            first = asyncio.ensure_future(encoder.encode_users(["aaaa"]))  # occupies the worker
            await asyncio.to_thread(fake.running.wait, 5)
            rest = [asyncio.ensure_future(encoder.encode_users([t])) for t in ("bbbb", "cccc", "dddd", "eeeeeee")]
            await asyncio.sleep(0.05)
            fake.gate.set()
            return await asyncio.gather(first, *rest)

        results = asyncio.run(main())
    finally:
        encoder.close()
    assert fake.runs[0] == ["aaaa"]
    # Width 4 texts two per run (8-token budget), the width-8 text on its own.
    assert sorted(map(sorted, fake.runs[1:])) == [["bbbb", "cccc"], ["dddd"], ["eeeeeee"]]
    assert [r[0, 0] for r in results] == [sum(map(ord, t)) for t in ("aaaa", "bbbb", "cccc", "dddd", "eeeeeee")]


def test_a_full_queue_answers_resource_exhausted_at_once():
    fake = FakeEncoder()
    fake.gate.clear()
    encoder = _encoder(fake, max_queue=2)
    refused_before = _dropped("queue_full")
    try:
        async def main():
            running = asyncio.ensure_future(encoder.encode_users(["run"]))
            await asyncio.to_thread(fake.running.wait, 5)
            waiting = [asyncio.ensure_future(encoder.encode_users([f"w{i}"])) for i in range(2)]
            await asyncio.sleep(0)
            started = time.perf_counter()
            with pytest.raises(ResourceExhausted):
                await encoder.encode_users(["one too many"])
            refused_in = time.perf_counter() - started
            fake.gate.set()
            await asyncio.gather(running, *waiting)
            return refused_in

        assert asyncio.run(main()) < 0.1
    finally:
        encoder.close()
    assert _dropped("queue_full") == refused_before + 1
    assert ["one too many"] not in fake.runs


@pytest.mark.parametrize("across_requests", [False, True])
def test_waiting_requests_are_served_in_fair_order_between_clients(across_requests):
    """Start-time fair queueing: a client that queued four requests first does not make another wait for all
    four; each client's own requests keep their order."""
    fake = FakeEncoder()
    fake.gate.clear()
    encoder = _encoder(fake, across_requests=across_requests, max_requests=1)  # batched: one request a run
    try:
        async def as_client(client: str, text: str):
            REQUEST_CLIENT.set(client)
            return await encoder.encode_users([text])

        async def main():
            running = asyncio.ensure_future(as_client("a", "run"))
            await asyncio.to_thread(fake.running.wait, 5)
            waiting = [asyncio.ensure_future(as_client(client, text)) for client, text in (
                ("a", "a1"), ("a", "a2"), ("a", "a3"), ("a", "a4"), ("b", "b1"), ("a", "a5"), ("b", "b2"))]
            await asyncio.sleep(0.05)
            fake.gate.set()
            await asyncio.gather(running, *waiting)

        asyncio.run(main())
    finally:
        encoder.close()
    # FIFO would be a1 a2 a3 a4 b1 a5 b2: b would wait for all of a's requests queued before it.
    assert [run[0] for run in fake.runs] == ["run", "a1", "b1", "a2", "b2", "a3", "a4", "a5"]


def test_a_batch_of_users_is_split_one_job_per_worker_and_a_refused_job_fails_only_its_texts():
    fake = FakeEncoder()
    encoder = _encoder(fake, workers=2)
    texts = ["u1", "u22", "u333", "u4444", "u5"]
    try:
        vectors = asyncio.run(encoder.encode_users_each(texts))
        assert [v[0] for v in vectors] == [sum(map(ord, t)) for t in texts]
        assert sorted(run[0] for run in fake.runs) == sorted(texts)  # every text its own run, as ever
    finally:
        encoder.close()

    fake = FakeEncoder()
    fake.gate.clear()
    encoder = _encoder(fake, workers=2, max_queue=1)
    try:
        async def main():
            running = []
            for number in range(2):  # one request for each worker to hold (the queue holds one at most)
                running.append(asyncio.ensure_future(encoder.encode_users([f"run{number}"])))
                for _ in range(500):
                    await asyncio.sleep(0.01)
                    if encoder.queued() == 0:
                        break
            batch = asyncio.ensure_future(encoder.encode_users_each(["x1", "x2", "y1", "y2"]))
            await asyncio.sleep(0.05)  # the first half waits in the queue, the second half is refused
            fake.gate.set()
            await asyncio.gather(*running)
            return await batch

        first, second, third, fourth = asyncio.run(main())
    finally:
        encoder.close()
    assert first[0] == sum(map(ord, "x1")) and second[0] == sum(map(ord, "x2"))
    assert isinstance(third, ResourceExhausted) and fourth is third


def test_a_batch_of_users_is_one_job_when_batching_across_requests():
    fake = FakeEncoder()
    encoder = _encoder(fake, workers=2, across_requests=True, max_tokens=64)
    texts = ["u1", "u2", "u3", "u4444", "u5555"]
    try:
        vectors = asyncio.run(encoder.encode_users_each(texts))
    finally:
        encoder.close()
    assert [v[0] for v in vectors] == [sum(map(ord, t)) for t in texts]
    assert sorted(map(sorted, fake.runs)) == [["u1", "u2", "u3"], ["u4444", "u5555"]]  # one run per width


def test_requests_past_their_deadline_or_cancelled_are_dropped_before_compute():
    fake = FakeEncoder()
    fake.gate.clear()
    encoder = _encoder(fake)
    deadline_before, cancelled_before = _dropped("deadline"), _dropped("cancelled")
    try:
        async def main():
            running = asyncio.ensure_future(encoder.encode_users(["run"]))
            await asyncio.to_thread(fake.running.wait, 5)

            async def with_deadline(text, seconds):
                REQUEST_DEADLINE.set(time.monotonic() + seconds)
                return await encoder.encode_users([text])

            late = asyncio.ensure_future(with_deadline("late", 0.02))
            gone = asyncio.ensure_future(encoder.encode_users(["gone"]))
            fine = asyncio.ensure_future(with_deadline("fine", 30))
            await asyncio.sleep(0.05)
            gone.cancel()
            await asyncio.sleep(0.01)
            fake.gate.set()
            await running
            with pytest.raises(DeadlineExceeded):
                await late
            with pytest.raises(asyncio.CancelledError):
                await gone
            return await fine

        assert asyncio.run(main())[0, 0] == sum(map(ord, "fine"))
    finally:
        encoder.close()
    assert fake.runs == [["run"], ["fine"]]
    assert _dropped("deadline") == deadline_before + 1 and _dropped("cancelled") == cancelled_before + 1


def test_an_expired_deadline_is_refused_without_queueing():
    fake = FakeEncoder()
    encoder = _encoder(fake)
    try:
        async def main():
            REQUEST_DEADLINE.set(time.monotonic() - 1)
            await encoder.encode_users(["x"])

        with pytest.raises(DeadlineExceeded):
            asyncio.run(main())
    finally:
        encoder.close()
    assert fake.runs == []


def test_close_answers_waiting_requests_unavailable():
    fake = FakeEncoder()
    fake.gate.clear()
    encoder = _encoder(fake)

    async def main():
        running = asyncio.ensure_future(encoder.encode_users(["run"]))
        await asyncio.to_thread(fake.running.wait, 5)
        waiting = asyncio.ensure_future(encoder.encode_users(["waiting"]))
        await asyncio.sleep(0.01)
        closing = asyncio.ensure_future(asyncio.to_thread(encoder.close))
        await asyncio.sleep(0.05)
        fake.gate.set()
        await closing
        with pytest.raises(Unavailable):
            await waiting
        return await running

    asyncio.run(main())
    assert fake.runs == [["run"]]


class SteppedEncoder(FakeEncoder):
    """A FakeEncoder whose every run waits for the test to allow it (`steps`), so it can act between runs."""

    def __init__(self) -> None:
        super().__init__()
        self.steps = threading.Semaphore(0)
        self.started = threading.Semaphore(0)

    def encode_tokens(self, ids, mask):
        self.started.release()
        self.steps.acquire(timeout=10)
        return super().encode_tokens(ids, mask)


@pytest.mark.parametrize("across_requests", [False, True])
def test_a_cancelled_request_stops_between_its_texts(across_requests):
    fake = SteppedEncoder()
    encoder = _encoder(fake, across_requests=across_requests, max_tokens=4)  # batched: one 4-char text per run
    texts = [f"t{i:02d}" for i in range(30)]
    cancelled_before = _dropped("cancelled")
    try:
        async def main():
            task = asyncio.ensure_future(encoder.encode_items(texts))
            assert await asyncio.to_thread(fake.started.acquire, True, 5)  # the first run has begun
            task.cancel()
            await asyncio.sleep(0.05)
            fake.steps.release(len(texts))  # let it run everything it still wants to
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.1)

        asyncio.run(main())
    finally:
        encoder.close()
    assert len(fake.runs) == 1, f"{len(fake.runs)} runs for a request cancelled during its first"
    assert _dropped("cancelled") == cancelled_before + 1


def test_a_request_past_its_deadline_stops_between_its_texts():
    fake = SteppedEncoder()
    encoder = _encoder(fake)
    texts = [f"t{i:02d}" for i in range(30)]
    try:
        async def main():
            REQUEST_DEADLINE.set(time.monotonic() + 0.2)
            task = asyncio.ensure_future(encoder.encode_items(texts))
            for _ in range(3):  # three runs in time
                assert await asyncio.to_thread(fake.started.acquire, True, 5)
                fake.steps.release()
            await asyncio.sleep(0.3)  # the deadline passes during the fourth run
            fake.steps.release(len(texts))
            with pytest.raises(DeadlineExceeded):
                await task

        asyncio.run(main())
    finally:
        encoder.close()
    assert len(fake.runs) == 4
