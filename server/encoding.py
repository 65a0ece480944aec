"""Run the ONNX encoder off the asyncio event loop, through one bounded queue with micro-batching.

`encode_users` / `encode_items` are the single entry points for texts; request micro-batching lives here and
nowhere else. The event loop only enqueues a job and awaits its future; dedicated worker threads tokenise
and run ONNX Runtime (both release the GIL), so health checks and other streams are answered meanwhile.

What happens to a request:
1. `put`: a full queue (BatchPolicy.max_queue waiting requests) answers ResourceExhausted at once, before
   any work, so callers back off early instead of timing out late.
2. Waiting requests are taken in fair order between clients (the REQUEST_CLIENT context variable, set by the
   servicer from the caller's identity: server.fairness), not first come first served: start-time fair
   queueing, each request costing its number of texts. A client that queues 60 requests delays another
   client's next request by at most one request's worth of each, not by all 60; one client alone is served
   in arrival order, as before.
   A free worker takes the next request, or, when batching across requests, what is waiting as one
   micro-batch (at most max_requests; it waits up to max_delay_s for more). Per text, one at a time: a worker
   runs what it took to the end, so taking a dozen at once would make a newcomer wait behind all of them
   (fairness lost), to save a lock and a wake-up against runs of milliseconds. Requests whose caller
   cancelled, or whose gRPC deadline (carried in the REQUEST_DEADLINE context variable, set by the servicer)
   has passed, are dropped here and again right before their own compute: they never cost a model run. A
   request already running is checked again between its texts (between runs when batching) and stops there:
   a 300-text UpsertItems whose caller gave up costs at most one more run, not 300.
3. Compute, in one of two modes:
   * per text (the default on CPU): every text is its own session.run at its own padded width.
     Dynamic INT8 quantises activations per tensor, i.e. per run, with the padding included: a text's
     vector would otherwise depend on which other texts share its run (cosine ~0.99 batched vs alone, and
     results shift with other users' traffic). On these 2-core CPUs batching also buys little (docs/benchmarks.md,
     measured by `make bench`), so determinism wins: a user's result never depends on load.
     Two lanes, one per kind of load: a request that finds the encoder otherwise idle runs on the wide
     session (intra-op threads = cores: the lowest latency); while several are in flight, each worker (one
     per core) runs its own request on a single-threaded session, in parallel. Splitting one batch-1
     128-token run over two threads is far from twice as fast, so the parallel lane is the throughput path.
     Both sessions give bitwise-identical vectors (threads split the work, not the arithmetic).
   * across requests (the default on CUDA, where the model is FP32 and batching is where the GPU's
     throughput comes from): texts of all requests in the micro-batch are grouped by padded width and run
     together, at most max_tokens padded tokens per run (the token budget).
4. Each request's future is resolved as soon as its own texts are done (not at the end of the batch).
   (RecommendBatch's texts are split into one request per worker beforehand: encode_users_each.)

Traced calls (server.tracing) get llmrec.queue, llmrec.tokenize and llmrec.model spans from the worker threads:
the job carries the submitting call's context (a Handoff), since the workers run outside it.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Sequence

import numpy as np

from llmrec.onnx_encoder import LENGTH_BUCKET, OnnxEncoder

from llmrec.server import metrics, tracing
from llmrec.server.errors import (
    REASON_DEADLINE, REASON_QUEUE_FULL, REASON_SHUTTING_DOWN, DeadlineExceeded, ResourceExhausted, Unavailable,
)

logger = logging.getLogger(__name__)

# time.monotonic() by which the current request must be answered; None = no deadline. Set per RPC.
REQUEST_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("llmrec_request_deadline",
                                                                               default=None)


# Who the current request is for, as server.fairness names clients: the unit of fair queueing. Set per RPC.
REQUEST_CLIENT: contextvars.ContextVar[str] = contextvars.ContextVar("llmrec_request_client", default="")


def set_request_deadline(time_remaining: float | None) -> None:
    """Record the current RPC's remaining time (grpc context.time_remaining()) for this task's encodes."""
    REQUEST_DEADLINE.set(None if time_remaining is None else time.monotonic() + time_remaining)


@dataclasses.dataclass(frozen=True)
class BatchPolicy:
    """How requests are queued and grouped.

    Attributes:
        across_requests: run texts of different requests in one session.run (see the module docstring);
            None = decide by provider (CUDA: yes, CPU: no).
        max_requests: requests one micro-batch takes at most.
        max_tokens: padded tokens (texts x width) one run holds at most when batching (the token budget).
        max_delay_s: when batching, how long a worker waits for more requests once it has one.
        max_queue: requests that may wait; one more is refused with ResourceExhausted.
    """

    across_requests: bool | None = None
    max_requests: int = 32
    max_tokens: int = 4096
    max_delay_s: float = 0.002
    max_queue: int = 128

    def __post_init__(self) -> None:
        if min(self.max_requests, self.max_tokens, self.max_queue) < 1 or self.max_delay_s < 0:
            raise ValueError("max_requests, max_tokens and max_queue must be >= 1, max_delay_s >= 0")

    def resolved(self, provider: str) -> BatchPolicy:
        """This policy with across_requests decided for the provider the model runs on."""
        if self.across_requests is not None:
            return self
        return dataclasses.replace(self, across_requests=provider == "CUDAExecutionProvider")


@dataclasses.dataclass(eq=False)
class _Job:
    texts: list[str]
    max_tokens: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    submitted: float  # perf_counter
    deadline: float | None  # monotonic
    trace: tracing.Handoff | None  # the submitting call's span context, when it is traced
    client: str = ""  # REQUEST_CLIENT when submitted
    vectors: np.ndarray | None = None
    pending: int = 0  # texts not yet encoded (batched mode)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


class _FairJobs:
    """Waiting jobs in start-time fair queueing order between clients (not thread-safe: _JobQueue locks).

    Each client's jobs get consecutive virtual start tags, spaced by their cost (texts); a job's tag is at least
    the virtual time (the tag of the job taken last), so a client that was idle starts level with the others
    instead of behind every job already waiting, and cannot bank credit for later. Smallest tag first; ties in
    arrival order. A single client's jobs keep their arrival order.
    """

    _PRUNE_ABOVE = 64  # finish tags kept for clients with nothing waiting before they are pruned

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Job]] = []
        self._arrival = itertools.count()
        self._virtual = 0.0
        self._finish: dict[str, float] = {}  # client -> the tag after its last job

    def __len__(self) -> int:
        return len(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)

    def append(self, job: _Job) -> None:
        start = max(self._virtual, self._finish.get(job.client, self._virtual))
        self._finish[job.client] = start + max(len(job.texts), 1)
        heapq.heappush(self._heap, (start, next(self._arrival), job))

    def popleft(self) -> _Job:
        start, _, job = heapq.heappop(self._heap)
        self._virtual = start
        if not self._heap:  # nothing waits: no client is ahead of another any more
            self._virtual = 0.0
            self._finish.clear()
        elif len(self._finish) > self._PRUNE_ABOVE + len(self._heap):  # tags at or behind the virtual time
            self._finish = {c: f for c, f in self._finish.items() if f > self._virtual}  # change nothing
        return job

    def clear(self) -> list[_Job]:
        jobs = [job for _, _, job in sorted(self._heap)]
        self._heap.clear()
        self._virtual = 0.0
        self._finish.clear()
        return jobs


class _JobQueue:
    """A bounded queue, fair between clients (_FairJobs), shared by the event loop (put) and the worker threads
    (take)."""

    def __init__(self, limit: int) -> None:
        self._jobs = _FairJobs()
        self._limit = limit
        self._ready = threading.Condition(threading.Lock())
        self._closed = False
        self._busy = 0  # workers between take() and finished()

    def put(self, job: _Job) -> None:
        with self._ready:
            if self._closed:
                raise _shutting_down()
            if len(self._jobs) >= self._limit:
                metrics.DROPPED.labels("queue_full").inc()
                raise ResourceExhausted(f"the server is at capacity ({self._limit} requests waiting); retry shortly",
                                        reason=REASON_QUEUE_FULL, metadata={"max_queue": str(self._limit)},
                                        retry_after_s=0.5)
            self._jobs.append(job)
            metrics.QUEUE_DEPTH.set(len(self._jobs))
            self._ready.notify()

    def take(self, max_jobs: int, max_delay: float) -> tuple[list[_Job], bool] | None:
        """Block until a job is waiting; return up to max_jobs of them in fair order (None once closed and
        empty), and whether this is all the work there is (no other worker busy, nothing left waiting). Every
        take must be followed by finished()."""
        with self._ready:
            while not self._jobs and not self._closed:
                self._ready.wait()
            if not self._jobs:
                return None
            if max_delay > 0 and len(self._jobs) < max_jobs:
                end = time.monotonic() + max_delay
                while len(self._jobs) < max_jobs and not self._closed:
                    remaining = end - time.monotonic()
                    if remaining <= 0:
                        break
                    self._ready.wait(remaining)
            count = min(max_jobs, len(self._jobs))
            taken = [self._jobs.popleft() for _ in range(count)]
            metrics.QUEUE_DEPTH.set(len(self._jobs))
            alone = self._busy == 0 and not self._jobs and count == 1
            self._busy += 1
            if self._jobs:
                self._ready.notify()  # more waiting: wake another worker
            return taken, alone

    def finished(self) -> None:
        with self._ready:
            self._busy -= 1

    def close(self) -> list[_Job]:
        """Refuse new jobs, wake every worker, and return the jobs still waiting."""
        with self._ready:
            self._closed = True
            left = self._jobs.clear()
            metrics.QUEUE_DEPTH.set(0)
            self._ready.notify_all()
            return left

    def __len__(self) -> int:
        return len(self._jobs)


def _shutting_down() -> Unavailable:
    # Retrying makes sense: a restarted server, or another replica behind the same address.
    return Unavailable("the server is shutting down", reason=REASON_SHUTTING_DOWN, retry_after_s=1.0)


class AsyncEncoder:
    """Async front of an OnnxEncoder with the bundle's token limits.

    Args:
        encoder: the loaded ONNX encoder.
        max_user_tokens: token window for user texts (manifest.max_user_tokens).
        max_item_tokens: token window for item texts (manifest.max_item_tokens).
        workers: inference threads taking from the queue. With more than one on CPU (per-text mode), a
            single-threaded session of the same model is made for the parallel lane (this takes a moment:
            construct off the event loop).
        policy: queueing and batching (BatchPolicy); across_requests=None decides by the encoder's provider.
    """

    def __init__(self, encoder: OnnxEncoder, max_user_tokens: int, max_item_tokens: int, workers: int = 1,
                 policy: BatchPolicy | None = None) -> None:
        self.encoder = encoder
        self.max_user_tokens = max_user_tokens
        self.max_item_tokens = max_item_tokens
        self.policy = (policy or BatchPolicy()).resolved(getattr(encoder, "provider", "CPUExecutionProvider"))
        parallel = not self.policy.across_requests and workers > 1 and getattr(encoder, "intra_op_threads", 1) > 1
        # The lane for requests that run while others do: one thread each, `workers` of them side by side.
        self.parallel_encoder = encoder.with_threads(1) if parallel else encoder
        self._queue = _JobQueue(self.policy.max_queue)
        self._workers = [threading.Thread(target=self._work, name=f"llmrec-encoder-{i}", daemon=True)
                         for i in range(max(workers, 1))]
        for thread in self._workers:
            thread.start()

    @property
    def across_requests(self) -> bool:
        return bool(self.policy.across_requests)

    async def encode_users(self, texts: Sequence[str]) -> np.ndarray:
        """Rendered user texts -> (len(texts), dimension) float32 unit vectors."""
        return await self._submit(list(texts), self.max_user_tokens)

    async def encode_items(self, texts: Sequence[str]) -> np.ndarray:
        """Rendered item texts -> (len(texts), dimension) float32 unit vectors."""
        return await self._submit(list(texts), self.max_item_tokens)

    async def encode_users_each(self, texts: Sequence[str]) -> list[np.ndarray | Exception]:
        """Many users' texts at once (RecommendBatch): per text its unit vector, or the exception that stopped
        its job. Per text on CPU, the texts are split into one job per worker, so every worker takes a share at
        once; batching across requests (CUDA), they are one job, run in padded batches per width. A job that
        fails (a full queue, its deadline) fails only its own texts.
        """
        texts = list(texts)
        if not texts:
            return []
        parts = 1 if self.across_requests else min(len(self._workers), len(texts))
        size = math.ceil(len(texts) / parts)
        chunks = [texts[start : start + size] for start in range(0, len(texts), size)]
        results = await asyncio.gather(*(self._submit(chunk, self.max_user_tokens) for chunk in chunks),
                                       return_exceptions=True)
        out: list[np.ndarray | Exception] = []
        for chunk, result in zip(chunks, results):
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result  # cancelled: the call is over
            out.extend([result] * len(chunk) if isinstance(result, Exception) else list(result))
        return out

    async def _submit(self, texts: list[str], max_tokens: int) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.encoder.dimension), dtype=np.float32)
        deadline = REQUEST_DEADLINE.get()
        if deadline is not None and time.monotonic() >= deadline:
            metrics.DROPPED.labels("deadline").inc()
            raise DeadlineExceeded("the request's deadline passed before it could be encoded", reason=REASON_DEADLINE)
        loop = asyncio.get_running_loop()
        job = _Job(texts, max_tokens, loop.create_future(), loop, time.perf_counter(), deadline, tracing.handoff(),
                   REQUEST_CLIENT.get())
        self._queue.put(job)
        # If the caller is cancelled (client gone), awaiting cancels the future: the worker then skips the job.
        return await job.future

    # --- worker threads ----------------------------------------------------------------------------------

    def _work(self) -> None:
        policy = self.policy
        max_jobs = policy.max_requests if policy.across_requests else 1  # see the module docstring, step 2
        delay = policy.max_delay_s if policy.across_requests else 0.0
        while True:
            taken = self._queue.take(max_jobs, delay)
            if taken is None:
                return
            jobs, alone = taken
            engine = self.encoder if alone else self.parallel_encoder
            metrics.BATCH_REQUESTS.observe(len(jobs))
            started, started_ns = time.perf_counter(), time.time_ns()
            for job in jobs:
                metrics.QUEUE_SECONDS.observe(started - job.submitted)
                if job.trace is not None:
                    job.trace.record(tracing.QUEUE, job.trace.submitted_ns, started_ns,
                                     {"llmrec.batch_requests": len(jobs)})
            live = [job for job in jobs if self._still_wanted(job)]
            try:
                if self.policy.across_requests:
                    self._run_batched(live, engine)
                else:
                    for job in live:
                        if self._still_wanted(job):  # it may have expired while earlier jobs ran
                            self._run_alone(job, engine)
            except Exception as error:  # noqa: BLE001 - delivered to the callers, logged by the servicer
                for job in live:
                    self._deliver(job, error=error)
            finally:
                self._queue.finished()

    def _still_wanted(self, job: _Job) -> bool:
        if job.future.done():  # cancelled by its caller (a racy read is harmless: resolving re-checks)
            metrics.DROPPED.labels("cancelled").inc()
            return False
        if job.expired(time.monotonic()):
            metrics.DROPPED.labels("deadline").inc()
            self._deliver(job, error=DeadlineExceeded("the request's deadline passed before it was encoded",
                                                      reason=REASON_DEADLINE))
            return False
        return True

    def _run_alone(self, job: _Job, engine: OnnxEncoder) -> None:
        """Every text of the job in its own run: its vector depends on nothing but the text."""
        tokenized = time.perf_counter()
        with tracing.child(job.trace, tracing.TOKENIZE, {"llmrec.texts": len(job.texts)}):
            rows = self.encoder.token_ids(job.texts, job.max_tokens)
        metrics.TOKENIZE_SECONDS.observe(time.perf_counter() - tokenized)
        out = np.empty((len(rows), self.encoder.dimension), dtype=np.float32)
        for position, row in enumerate(rows):
            if position and not self._still_wanted(job):  # cancelled or past its deadline meanwhile: stop here
                return
            ids, mask = self.encoder.pad([row], job.max_tokens)
            with tracing.child(job.trace, tracing.MODEL, self._run_attributes(engine, ids)):
                out[position] = self._run(engine, ids, mask)[0]
        self._deliver(job, out)

    def _run_batched(self, jobs: list[_Job], engine: OnnxEncoder) -> None:
        """Texts of all jobs grouped by (window, padded width), at most policy.max_tokens tokens per run."""
        if not jobs:
            return
        tokenized = time.perf_counter()
        groups: dict[tuple[int, int], list[tuple[_Job, int, list[int]]]] = collections.defaultdict(list)
        for job in jobs:
            job.vectors = np.empty((len(job.texts), self.encoder.dimension), dtype=np.float32)
            job.pending = len(job.texts)
            with tracing.child(job.trace, tracing.TOKENIZE, {"llmrec.texts": len(job.texts)}):
                rows = self.encoder.token_ids(job.texts, job.max_tokens)
            for position, row in enumerate(rows):
                width = self.encoder.padded_width(len(row), job.max_tokens)
                groups[(job.max_tokens, width)].append((job, position, row))
        metrics.TOKENIZE_SECONDS.observe(time.perf_counter() - tokenized)
        gone: set[_Job] = set()  # jobs dropped since (cancelled, past their deadline): their texts are skipped

        def wanted(job: _Job) -> bool:
            if job in gone:
                return False
            if self._still_wanted(job):
                return True
            gone.add(job)
            return False

        for (max_tokens, width), entries in sorted(groups.items(), key=lambda g: g[0][1]):
            entries = [entry for entry in entries if wanted(entry[0])]
            per_run = max(1, self.policy.max_tokens // width)
            for start in range(0, len(entries), per_run):
                chunk = [entry for entry in entries[start : start + per_run] if wanted(entry[0])]
                if not chunk:
                    continue
                ids, mask = self.encoder.pad([row for _, _, row in chunk], max_tokens)
                ran_from = time.time_ns()
                vectors = self._run(engine, ids, mask)
                ran_to = time.time_ns()
                # One run serves several calls: each traced one gets a span of it.
                for job in {job for job, _, _ in chunk if job.trace is not None}:
                    job.trace.record(tracing.MODEL, ran_from, ran_to, self._run_attributes(engine, ids))
                for (job, position, _), vector in zip(chunk, vectors):
                    job.vectors[position] = vector
                    job.pending -= 1
                    if job.pending == 0:
                        self._deliver(job, job.vectors)

    def _run(self, engine: OnnxEncoder, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        vectors = engine.encode_tokens(ids, mask)
        metrics.MODEL_SECONDS.observe(time.perf_counter() - started)
        metrics.RUNS.labels("alone" if engine is self.encoder else "parallel").inc()
        metrics.RUN_TEXTS.observe(ids.shape[0])
        metrics.RUN_TOKENS.observe(ids.size)
        return vectors

    def _run_attributes(self, engine: OnnxEncoder, ids: np.ndarray) -> dict[str, object]:
        return {"llmrec.lane": "alone" if engine is self.encoder else "parallel", "llmrec.texts": ids.shape[0],
                "llmrec.padded_tokens": ids.size}

    @staticmethod
    def _deliver(job: _Job, vectors: np.ndarray | None = None, error: BaseException | None = None) -> None:
        def settle() -> None:
            if job.future.done():  # cancelled meanwhile, or already settled
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(vectors)

        try:
            job.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    # --- warm-up and shutdown ----------------------------------------------------------------------------

    async def warm_up(self) -> list[int]:
        """Run one inference at every padded width a request can produce, so no request pays for a first run.

        When batching across requests, also run the largest batch of every width (CUDA) or of the widest
        one (CPU, where shapes need no tuning but the memory arena grows once).

        Returns:
            The widths (token counts) that were run.
        """
        return await asyncio.to_thread(self._warm_up_sync)

    def warm_up_widths(self) -> list[int]:
        """Every width OnnxEncoder.tokenize can pad to: multiples of LENGTH_BUCKET, capped by the token limits."""
        widths = set(range(LENGTH_BUCKET, self.max_user_tokens + 1, LENGTH_BUCKET))
        widths |= {self.max_user_tokens, self.max_item_tokens}
        widths |= set(range(LENGTH_BUCKET, self.max_item_tokens + 1, LENGTH_BUCKET))
        return sorted(widths)

    def _warm_up_sync(self) -> list[int]:
        widths = self.warm_up_widths()
        # Token ids of some ordinary text, long enough to fill the widest window.
        ids = self.encoder.tokenizer.encode("a warm up sentence " * max(widths)).ids
        engines = [self.encoder] + ([self.parallel_encoder] if self.parallel_encoder is not self.encoder else [])
        for width in widths:
            row = np.asarray(ids[:width], dtype=np.int64)[None, :]
            for engine in engines:
                engine.encode_tokens(row, np.ones_like(row))
            for size in self._warm_up_batch_sizes(width, widths[-1]):
                block = np.repeat(row, size, axis=0)
                self.encoder.encode_tokens(block, np.ones_like(block))
        return widths

    def _warm_up_batch_sizes(self, width: int, widest: int) -> list[int]:
        """Batch shapes to run once when batching across requests: on CUDA every power of two up to the
        largest batch of each width (kernels are chosen per shape); on CPU only the largest batch of the widest
        width (shapes need no tuning, but the memory arena grows once)."""
        if not self.across_requests:
            return []
        largest = min(self.policy.max_requests, max(1, self.policy.max_tokens // width))
        if self.encoder.provider != "CUDAExecutionProvider":
            return [largest] if width == widest and largest > 1 else []
        return sorted({2 ** i for i in range(1, largest.bit_length()) if 2 ** i <= largest} | {largest} - {1})

    def queued(self) -> int:
        """Requests waiting for a worker."""
        return len(self._queue)

    def close(self) -> None:
        """Stop the worker threads once running work has finished; waiting requests get UNAVAILABLE."""
        for job in self._queue.close():
            self._deliver(job, error=_shutting_down())
        for thread in self._workers:
            thread.join(timeout=30)
