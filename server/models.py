"""The served model and hot swaps: leases that keep a replaced model alive until its requests finish, and the
load -> verify -> warm up -> carry catalogue changes over -> swap procedure (LoadModel, bundle_root polling).

A *generation* is one loaded bundle with its encoder and live catalogue. Every request leases the current
generation while it computes (ModelSlot.lease), so a swap is one assignment on the event loop: requests that
started before it finish on the old generation (and their responses name its model_version), later ones get the
new one, and the old one is closed (encoder stopped, last catalogue snapshot written, state directory released)
once its last lease ends.

A swap (ModelManager.swap) runs while the old model keeps serving:
1. read the candidate's manifest (its digest checked); the bundle version already served is a no-op;
2. load it exactly as start-up does (server.bundle: every file's sha256, template version, dimensions, shapes),
   warm it up at every padded width, and open its catalogue with the changes stored for its version;
3. carry the old catalogue's changes over (with a state directory): every upserted item re-encoded by the new model
   and upserted, every deleted item deleted, and upserts that the new version's own state holds but the old
   catalogue no longer has deleted; each journaled and fsynced under the new version's state directory;
4. freeze catalogue writes (running ones finish first), carry what changed during 3 the same way, swap, thaw: a
   write that arrived meanwhile waited and goes to the new model. So every change acknowledged on the old
   catalogue is durable in the new one before the first request reaches it.
With the shared store (catalogue_store = postgres) steps 3-4 are the store's migration instead
(server.store.postgres.Migration): done once for the whole fleet, from the database's own record of the old
version, the old version made read-only as it completes; a replica whose new version is migrated already carries
nothing. Replicas sharing a database swap one at a time (server.store.rollout_lock, held from 2 to the swap), and
a replica that starts on a new bundle migrates the same way before it serves.
A failure anywhere leaves the old generation serving, untouched; what was built is closed, and the failure is
logged, counted (llmrec_model_swaps_total{outcome="failed"}) and kept as the last attempt (GetModelInfo.last_load).
Carrying is idempotent (an item the new catalogue already holds with the same text and attributes is skipped), so
a retry after a failure half-way redoes only what is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

from llmrec import manifest as mf

from llmrec.server import metrics
from llmrec.server.bundle import LoadedBundle, one_line
from llmrec.server.catalogue import Catalogue, CatalogueChanges, open_catalogue
from llmrec.server.domain import CatalogueItem
from llmrec.server.encoding import REQUEST_DEADLINE, AsyncEncoder, BatchPolicy
from llmrec.server.errors import (
    REASON_BUNDLE_REJECTED, REASON_LOAD_IN_PROGRESS, REASON_NOT_LOADED, REASON_SHUTTING_DOWN, Aborted,
    FailedPrecondition, InvalidArgument, ServiceError, ThrottledWarning, Unavailable,
)
from llmrec.server.recommender import Recommender
from llmrec.server.settings import ServerSettings
from llmrec.server.state import StateError
from llmrec.server.store import ChangeStore, rollout_lock, store_for
from llmrec.server.validation import Limits

logger = logging.getLogger(__name__)

# Swapping back to a version waits this long for its previous generation to close (requests finish in seconds).
RELEASE_TIMEOUT_S = 60.0
CARRY_BATCH = 256  # carried items journaled as one change: one journal line and one fsync per batch
_poll_warning = ThrottledWarning(logger, every_s=300.0)


def batch_policy(settings: ServerSettings) -> BatchPolicy:
    """The encoder's queueing and batching policy from the settings (server.encoding)."""
    return BatchPolicy(
        across_requests=settings.batch_across_requests, max_requests=settings.batch_max_requests,
        max_tokens=settings.batch_max_tokens, max_delay_s=settings.batch_max_delay_ms / 1e3,
        max_queue=settings.max_queue,
    )


@dataclasses.dataclass(eq=False)
class Generation:
    """One loaded bundle, its encoder and its live catalogue, and the requests (leases) using them."""

    recommender: Recommender
    encoder: AsyncEncoder
    path: Path
    store: ChangeStore | None = None
    leases: int = 0
    retired: bool = False
    closing: asyncio.Future | None = None

    @property
    def model_version(self) -> str:
        return self.recommender.model_version

    def close(self) -> None:
        """Blocking: pending catalogue writes finish, a last snapshot, the state directory released; the encoder's
        threads stop (requests still waiting get UNAVAILABLE)."""
        try:
            self.recommender.catalogue.close()
        finally:
            self.encoder.close()


async def load_generation(settings: ServerSettings, path: Path, stage: Callable[[str], None] | None = None,
                          on_store_serving: Callable[[bool], None] = lambda serving: None) -> Generation:
    """Load, verify and warm up a bundle and open its catalogue (replaying its version's stored changes).

    Args:
        stage: for a hot swap: called with "verify", "warm_up", then "catalogue" as each step starts (it may raise
            to stop the swap). None at start-up.
        on_store_serving: a shared catalogue store's health (server.store.store_for's on_serving).

    Raises:
        BundleError: the bundle cannot be served. StateError: its state directory cannot be used.
    """
    swapping = stage is not None
    stage = stage or (lambda _: None)
    stage("verify")
    bundle = await asyncio.to_thread(
        LoadedBundle.load, path, prefer_gpu=settings.prefer_gpu, intra_op_threads=settings.intra_op_threads,
        min_ef=settings.max_k, verify_hashes=settings.verify_hashes, spinning=settings.ort_spinning,
    )
    manifest = bundle.manifest
    stage("warm_up")
    workers = settings.encoder_workers or (1 if bundle.precision == "fp32" else settings.threads)
    encoder = await asyncio.to_thread(  # may load a second session (the parallel lane): off the loop
        AsyncEncoder, bundle.encoder, manifest.max_user_tokens, manifest.max_item_tokens, workers,
        batch_policy(settings))
    try:
        logger.info("encoder: %d workers, %s", workers, "batching across requests" if encoder.across_requests
                    else "one run per text (a request alone on all cores, concurrent ones one core each)")
        widths = await encoder.warm_up()
        logger.info("warmed up widths %s", widths)
        stage("catalogue")
        store = store_for(settings, manifest, on_store_serving, warn_other_versions=not swapping)
        catalogue = await asyncio.to_thread(open_catalogue, bundle, store, settings.cold_start_map,
                                            settings.new_item_cooccurrence)
    except BaseException:
        encoder.close()  # its workers are idle: this returns at once
        raise
    recommender = Recommender(bundle, encoder, Limits.from_settings(settings), catalogue, settings.new_item_share,
                              settings.encoder_path, settings.ranking_stage, settings.new_item_boost)
    return Generation(recommender, encoder, Path(path), store)


class ModelSlot:
    """The generation that serves new requests, and the replaced ones still finishing theirs.

    Everything here runs on the event loop: a lease or a swap is a plain assignment, never interleaved.
    """

    def __init__(self) -> None:
        self.current: Generation | None = None
        self._replaced: set[Generation] = set()  # swapped out, not closed yet (waiting for leases, or closing)
        self._closings: set[asyncio.Future] = set()  # closes (and memory releases) still running
        self._writers = 0
        self._writers_idle = asyncio.Event()
        self._writers_idle.set()
        self._thawed = asyncio.Event()  # clear while a swap holds catalogue writes back
        self._thawed.set()

    @contextlib.contextmanager
    def lease(self) -> Iterator[Recommender]:
        """The current model, kept open until the block ends even if a swap replaces it meanwhile.

        Raises:
            Unavailable: no model is loaded (not yet, or no longer: the server is shutting down).
        """
        generation = self.current
        if generation is None:
            raise Unavailable("the model is not loaded yet (or the server is shutting down); retry shortly",
                              reason=REASON_NOT_LOADED, retry_after_s=1.0)
        generation.leases += 1
        try:
            yield generation.recommender
        finally:
            generation.leases -= 1
            if generation.retired and not generation.leases:
                self._close(generation)

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[Recommender]:
        """A lease for a catalogue change: waits while a swap holds writes back, then leases the current model."""
        while not self._thawed.is_set():
            await self._thawed.wait()
        self._writers += 1
        self._writers_idle.clear()
        try:
            with self.lease() as recommender:
                yield recommender
        finally:
            self._writers -= 1
            if not self._writers:
                self._writers_idle.set()

    @contextlib.asynccontextmanager
    async def frozen(self) -> AsyncIterator[None]:
        """A block in which no catalogue change runs: new ones wait, running ones have finished."""
        self._thawed.clear()
        try:
            await self._writers_idle.wait()
            yield
        finally:
            self._thawed.set()

    def swap(self, generation: Generation) -> Generation | None:
        """Serve new requests with `generation`; the previous one (returned) closes once its leases end."""
        old, self.current = self.current, generation
        if old is not None:
            self._retire(old)
        return old

    async def released(self, model_version: str, timeout_s: float) -> None:
        """Wait (at most timeout_s) until no replaced generation of this version is still open: swapping back to
        a version needs its state directory, which the old generation holds until it has closed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while any(g.model_version == model_version for g in self._replaced):
                    await asyncio.sleep(0.01)

    async def close_all(self, timeout_s: float) -> None:
        """Stop serving and close every generation once its requests are done, or after timeout_s regardless."""
        if self.current is not None:
            old, self.current = self.current, None
            self._retire(old)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while any(g.closing is None for g in self._replaced):
                    await asyncio.sleep(0.01)
        for generation in list(self._replaced):  # leases that outlived the timeout: close under them
            self._close(generation)
        await asyncio.gather(*self._closings, return_exceptions=True)

    def _retire(self, generation: Generation) -> None:
        generation.retired = True
        self._replaced.add(generation)
        if not generation.leases:
            self._close(generation)

    def _close(self, generation: Generation) -> None:
        if generation.closing is None:
            generation.closing = asyncio.ensure_future(self._closed(generation))
            self._closings.add(generation.closing)
            generation.closing.add_done_callback(self._closings.discard)

    async def _closed(self, generation: Generation) -> None:
        try:
            await asyncio.to_thread(generation.close)
        except Exception:  # noqa: BLE001 - logged; the model is out of service either way
            logger.exception("closing model %s failed", generation.model_version)
        else:
            logger.info("model %s closed: its last request has finished", generation.model_version)
        finally:
            self._replaced.discard(generation)
        del generation  # the last reference: release_memory can now free the model
        await asyncio.to_thread(release_memory)


def release_memory() -> None:
    """Free what a closed model held and hand it back to the OS. Its objects form reference cycles, so they go at
    a collection; and glibc keeps freed memory for reuse, which made RSS grow by most of a model per swap (213 MB
    -> 347 MB after 6 swaps of the MovieLens bundle, back to 213 MB after malloc_trim)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# --- carrying catalogue changes over -----------------------------------------------------------------------


def plan_carry(changes: CatalogueChanges, new: Catalogue) -> tuple[list[CatalogueItem], list[str]]:
    """What makes `new` hold the old catalogue's changes: (items to re-encode and upsert, ids to delete).

    Items `new` already holds as upserted with the same text and attributes are skipped; upserts that `new`'s own
    stored state holds but the old catalogue does not (deleted there since) are deleted.
    """
    upserts = [item for item in changes.items.values()
               if item is not None and new.item_of(item.item_id) != dataclasses.replace(item, upserted=True)]
    deleted = {item_id for item_id, item in changes.items.items() if item is None}
    stale = {item_id for item_id in new.upserted_ids() if item_id not in changes.live}
    return upserts, sorted(item_id for item_id in deleted | stale if new.item_of(item_id) is not None)


async def carry_changes(old: Recommender, new: Recommender, check: Callable[[], None] = lambda: None) -> int:
    """Apply the old catalogue's changes to the new one, encoded by the new model, durably (journaled in the new
    version's state directory). `check` runs between batches and may raise to stop. Returns the items changed."""
    upserts, deletes = plan_carry(await old.catalogue.changes(), new.catalogue)
    for start in range(0, len(upserts), CARRY_BATCH):
        check()
        batch = upserts[start : start + CARRY_BATCH]
        await new.catalogue.upsert(batch, await new.item_rows(batch))
    if deletes:
        check()
        await new.catalogue.delete(deletes, allow_missing=True)
    return len(upserts) + len(deletes)


# --- swaps -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoadAttempt:
    """One hot swap attempt, as GetModelInfo.last_load reports it."""

    bundle_path: str
    trigger: str  # "rpc" (LoadModel) or "poll" (bundle_root polling)
    ok: bool = False
    error: str = ""
    model_version: str = ""  # the candidate's version, once its manifest was read
    finished_at: float = 0.0  # time.time()
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class SwapResult:
    swapped: bool  # False: that bundle version was being served already
    model_version: str
    previous_model_version: str
    index_version: str
    carried_changes: int = 0
    seconds: float = 0.0  # start of the load to swapped in


class ModelManager:
    """Loads bundles and swaps them in: the first at start-up, later ones by LoadModel or bundle_root polling.

    Args:
        settings: what to load and how (the same settings for every generation).
    """

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.slot = ModelSlot()
        self.last_attempt: LoadAttempt | None = None
        # Called with the new recommender right after each swap (the servicer moves idle sessions over).
        self.swap_listeners: list[Callable[[Recommender], None]] = []
        # A shared catalogue store's health (server.app reports it): only the serving generation's store counts.
        self.on_store_serving: Callable[[bool], None] = lambda serving: None
        self._swapping: asyncio.Task | None = None
        self._stopping = False

    @property
    def loading(self) -> bool:
        return self._swapping is not None and not self._swapping.done()

    async def load_first(self) -> Generation:
        """Load the bundle the settings name and serve it.

        Raises:
            BundleError, StateError: as load_generation.
        """
        path = await asyncio.to_thread(self.settings.resolve_bundle_dir)
        logger.info("loading bundle %s", path)
        generation = await load_generation(self.settings, path, on_store_serving=self._store_health(path))
        try:
            store = generation.store
            if store is not None and store.shared:  # the fleet may hold an earlier version's changes: take them
                async with store.migration(generation.recommender.item_rows) as migration:
                    await migration.finish()
        except BaseException:
            await asyncio.to_thread(generation.close)
            raise
        self.slot.swap(generation)
        return generation

    def _store_health(self, path: Path) -> Callable[[bool], None]:
        """The on_serving callback for the store of the generation loaded from `path` (called from its thread)."""
        def report(serving: bool) -> None:
            current = self.slot.current
            if current is None or current.path == Path(path):
                self.on_store_serving(serving)
        return report

    async def swap(self, bundle_path: Path | None, trigger: str) -> SwapResult:
        """Load the bundle at bundle_path (None: the newest under bundle_root) and swap it in (module docstring).

        A caller that goes away, or whose deadline passes, does not cut the swap short: it runs to its end.

        Raises:
            InvalidArgument: no bundle_path and no bundle_root. Aborted: another load is running.
            Unavailable: nothing is served yet, or the server is shutting down.
            FailedPrecondition: the bundle was rejected (reason BUNDLE_REJECTED; the old model serves on).
        """
        if bundle_path is None and self.settings.bundle_root is None:
            raise InvalidArgument("bundle_path is empty and this server has no bundle_root to take the newest bundle "
                                  "from; name a bundle directory", field="bundle_path")
        self._check_stopping()
        if self.slot.current is None:
            raise Unavailable("the first model is still loading; retry once the server is SERVING",
                              reason=REASON_NOT_LOADED, retry_after_s=1.0)
        if self.loading:
            raise Aborted("another model load is in progress; retry when it is over (GetModelInfo.last_load says "
                          "how it went)", reason=REASON_LOAD_IN_PROGRESS)
        task = asyncio.create_task(self._swap(bundle_path, trigger))
        task.add_done_callback(lambda done: done.cancelled() or done.exception())  # its caller may have left
        self._swapping = task
        return await asyncio.shield(task)

    async def _swap(self, bundle_path: Path | None, trigger: str) -> SwapResult:
        REQUEST_DEADLINE.set(None)  # the server's own work now, not bounded by the caller's deadline
        started = time.perf_counter()
        old = self.slot.current
        assert old is not None
        attempt = LoadAttempt(str(bundle_path or self.settings.bundle_root), trigger)
        stage = "resolve"
        new: Generation | None = None

        def at(name: str) -> None:
            nonlocal stage
            self._check_stopping()
            stage = name

        try:
            path = bundle_path or await asyncio.to_thread(mf.latest_bundle, self.settings.bundle_root)
            attempt.bundle_path = str(path)
            at("verify")
            manifest = await asyncio.to_thread(mf.read_manifest, path, False)  # digest only: hashes come next
            attempt.model_version = manifest.bundle_version
            if manifest.bundle_version == old.model_version:
                logger.info("hot swap (%s): %s holds model %s, which is being served already", trigger, path,
                            old.model_version)
                self._finish(attempt, started, ok=True)
                return SwapResult(False, old.model_version, old.model_version, old.recommender.index_version)
            at("rollout")
            async with rollout_lock(self.settings, self._check_stopping):
                logger.info("hot swap (%s): loading %s while model %s serves", trigger, path, old.model_version)
                await self.slot.released(manifest.bundle_version, RELEASE_TIMEOUT_S)
                new = await load_generation(self.settings, path, at, self._store_health(path))
                at("carry")
                if new.store is not None and new.store.shared:
                    carried = await self._migrate(new)
                else:
                    carried = await carry_changes(old.recommender, new.recommender, self._check_stopping)
                    async with self.slot.frozen():  # what changed meanwhile, with no write running
                        carried += await carry_changes(old.recommender, new.recommender, self._check_stopping)
                        self._check_stopping()
                        self.slot.swap(new)
                logger.info("hot swap (%s): model %s swapped in; releasing the rollout lock", trigger,
                            new.model_version)
        except BaseException as error:
            if new is not None and self.slot.current is not new:
                await asyncio.to_thread(new.close)
            if isinstance(error, (mf.BundleError, StateError, OSError)):  # OSError: e.g. a name too long
                error = FailedPrecondition(
                    f"bundle {attempt.bundle_path} was not loaded ({stage}): {one_line(error)}; model "
                    f"{old.model_version} is still being served", reason=REASON_BUNDLE_REJECTED,
                    metadata={"bundle_path": attempt.bundle_path, "stage": stage,
                              "serving_model_version": old.model_version})
            self._finish(attempt, started, ok=False, error=error, stage=stage)
            raise error from None
        seconds = self._finish(attempt, started, ok=True)
        for listener in self.swap_listeners:
            listener(new.recommender)
        metrics.MODEL_SWAPS.labels("ok").inc()
        metrics.MODEL_SWAP_SECONDS.observe(seconds)
        logger.info("hot swap (%s): SERVING model %s, index %s, in %.2f s (%d catalogue changes carried over); "
                    "model %s closes when its last request finishes", trigger, new.model_version,
                    new.recommender.index_version, seconds, carried, old.model_version)
        return SwapResult(True, new.model_version, old.model_version, new.recommender.index_version, carried, seconds)

    async def _migrate(self, new: Generation) -> int:
        """Swap to `new`, whose shared store takes over the fleet's catalogue changes (its migration, run here
        unless another replica completed it); the items this replica carried."""
        async with new.store.migration(new.recommender.item_rows, self._check_stopping) as migration:
            if migration.superseded_by is not None:
                raise StateError(f"bundle version {new.model_version} was superseded by {migration.superseded_by} in "
                                 "the shared catalogue and is read-only there; to roll back, publish its model under "
                                 "a new bundle version")
            async with self.slot.frozen():  # writes arriving from here wait, and go to the new model
                carried = await migration.finish()
                self._check_stopping()
                self.slot.swap(new)
        return carried

    def _finish(self, attempt: LoadAttempt, started: float, ok: bool, error: BaseException | None = None,
                stage: str = "") -> float:
        attempt.seconds = time.perf_counter() - started
        attempt.finished_at = time.time()
        attempt.ok = ok
        self.last_attempt = attempt
        if error is not None:
            attempt.error = error.message if isinstance(error, ServiceError) else \
                f"{type(error).__name__}: {one_line(error)}"
            metrics.MODEL_SWAPS.labels("failed").inc()
            log = logger.error if not isinstance(error, asyncio.CancelledError) else logger.warning
            log("hot swap (%s) to %s failed at %s after %.2f s; the previous model serves on: %s", attempt.trigger,
                attempt.bundle_path, stage, attempt.seconds, attempt.error,
                exc_info=error if not isinstance(error, (ServiceError, asyncio.CancelledError)) else None)
        return attempt.seconds

    def _check_stopping(self) -> None:
        if self._stopping:
            raise Unavailable("the server is shutting down", reason=REASON_SHUTTING_DOWN, retry_after_s=1.0)

    async def poll(self, root: Path, interval_s: float) -> None:
        """Swap to the newest bundle under root whenever it changes, checked every interval_s; until cancelled.

        "Changes": another directory, or the same one with other files, sizes or times (a bundle copied in
        file by file is retried until it is whole; export renames complete bundles into place). A bundle that
        failed is not retried until it changes; LoadModel can name it again.
        """
        current = self.slot.current
        seen = await asyncio.to_thread(_fingerprint, current.path) if current is not None else None
        while True:
            await asyncio.sleep(interval_s)
            try:
                newest = await asyncio.to_thread(mf.latest_bundle, root)
                fingerprint = await asyncio.to_thread(_fingerprint, newest)
            except (mf.BundleError, OSError) as error:
                _poll_warning.warning("bundle polling under %s: %s", root, error)
                continue
            if fingerprint == seen or self.loading or self._stopping:
                continue
            seen = fingerprint
            with contextlib.suppress(Exception):  # logged, counted and kept as last_load by swap()
                await self.swap(newest, "poll")

    def refuse_swaps(self) -> None:
        """The server is shutting down: LoadModel answers UNAVAILABLE, a running swap stops at its next step."""
        self._stopping = True

    async def stop(self, timeout_s: float) -> None:
        """No more swaps (a running one is waited for: it stops at its next step); close every generation once its
        requests are done, or after timeout_s regardless."""
        self.refuse_swaps()
        if self._swapping is not None:
            await asyncio.gather(self._swapping, return_exceptions=True)
        await self.slot.close_all(timeout_s)


def _fingerprint(path: Path) -> tuple:
    """A bundle directory's path and every file's (name, size, mtime): what polling compares."""
    files = sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in Path(path).rglob("*") if p.is_file())
    return (str(path), tuple(files))
