"""The shared catalogue store: one PostgreSQL database, many replicas (docs/serving.md#many-replicas).

Tables (created on first use; one row set per bundle version, as the local store keeps one directory per version):

    llmrec_catalogue_head     (bundle_version, index_dimension, last_seq,   the sequence counter, and the
                               created_at, superseded_by, migrated_from,    version's migration state
                               migrated_seq, migration_complete)
    llmrec_catalogue_changes  (bundle_version, seq, change jsonb, committed_at)   every change, in order
    llmrec_catalogue_items    (bundle_version, item_id, seq, item jsonb)   each changed item's latest state
                                                                              (item NULL: deleted)

Write protocol: one transaction takes the next sequence number by incrementing the head row, inserts the change
(the same JSON the local journal holds, vectors included, so no replica runs inference to apply it), updates
the items it touches and NOTIFYs `llmrec_catalogue`; the call is acknowledged only after COMMIT returned and
this replica has applied the change. The head row's lock is held until COMMIT, so changes commit in sequence
order with no gaps: a replica that has seen change N has seen every change before it, and a rolled-back
transaction leaves no hole.

Follow protocol: each replica has one connection that LISTENs and applies every change after the last one it
applied, in order, on one thread (a notification wakes it; it also polls every POLL_S, so nothing depends on a
notification arriving). A lost connection makes the replica report NOT_SERVING and refuse changes; it
reconnects, LISTENs first, then catches up by sequence, and only then reports SERVING again.

Start-up reads, in one REPEATABLE READ transaction, the head's sequence S and every row of the items table (a
snapshot of the catalogue as of S, whatever the length of the history), then the changes after S.

Bundle versions: a new version takes the previous version's changes over once, in the database, and the previous
version turns read-only (Migration; docs/serving.md#rollout-across-replicas); hot swaps take rollout_lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from llmrec.item_record import attributes_from_record, item_from_record, item_id_from_record

from llmrec.server.domain import CatalogueItem
from llmrec.server.state import Delete, StateError, Upsert, change_record, item_from_json, operation_from_record
from llmrec.server.store import ChangeStore, Operation, Replica, StoreUnavailable, VersionSuperseded

logger = logging.getLogger(__name__)

CHANNEL = "llmrec_catalogue"
POLL_S = 0.5  # the follower looks for changes this often even without a notification (and sees close() by then)
RETRY_S = 0.5  # between reconnection attempts
FETCH_ROWS = 1000  # changes (or snapshot items) read per round trip
SNAPSHOT_CHUNK = 1024  # snapshot items applied per operation
_SCHEMA_LOCK = 7_351_237_117  # pg_advisory_xact_lock key: replicas starting together create the tables once
_MIGRATION_LOCK = 7_351_237_118  # pg_advisory_lock key: one migration between bundle versions at a time
_ROLLOUT_LOCK = 7_351_237_119  # pg_advisory_lock key: one replica's hot swap at a time, fleet-wide
LOCK_POLL_S = 0.2  # how often a replica waiting for an advisory lock tries again (and checks for shutdown)
MIGRATION_BATCH = 256  # source items re-encoded and committed per change while the source still takes writes
_CONNECTION = {  # merged into the DSN; a dead peer is noticed in ~25 s even without traffic
    "application_name": "llmrec-server", "connect_timeout": 10,
    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
}
SCHEMA = """
CREATE TABLE IF NOT EXISTS llmrec_catalogue_head (
    bundle_version text PRIMARY KEY,
    index_dimension integer NOT NULL,
    last_seq bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS llmrec_catalogue_changes (
    bundle_version text NOT NULL,
    seq bigint NOT NULL,
    change jsonb NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (bundle_version, seq)
);
CREATE TABLE IF NOT EXISTS llmrec_catalogue_items (
    bundle_version text NOT NULL,
    item_id text NOT NULL,
    seq bigint NOT NULL,
    item jsonb,
    PRIMARY KEY (bundle_version, item_id)
)
"""
# What bundle-version migrations add (Migration): run once, when the columns are missing, since ALTER TABLE and
# CREATE INDEX lock the tables (and need their owner) even when there is nothing to add.
MIGRATION_SCHEMA = """
ALTER TABLE llmrec_catalogue_head ADD COLUMN IF NOT EXISTS created_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE llmrec_catalogue_head ADD COLUMN IF NOT EXISTS superseded_by text;
ALTER TABLE llmrec_catalogue_head ADD COLUMN IF NOT EXISTS migrated_from text;
ALTER TABLE llmrec_catalogue_head ADD COLUMN IF NOT EXISTS migrated_seq bigint NOT NULL DEFAULT 0;
-- true for rows made before migrations existed (they were served as they were); new rows start false
ALTER TABLE llmrec_catalogue_head ADD COLUMN IF NOT EXISTS migration_complete boolean NOT NULL DEFAULT true;
CREATE INDEX IF NOT EXISTS llmrec_catalogue_items_by_seq ON llmrec_catalogue_items (bundle_version, seq)
"""


class PostgresStore(ChangeStore):
    """Catalogue changes of one bundle version in a PostgreSQL database shared by every replica.

    Args:
        dsn: libpq connection string or URI (never logged).
        bundle_version, index_dimension: the served bundle's; a database that holds this version with another
            dimension is refused.
        on_serving: told False when this replica may have fallen behind, True once it has caught up again.
        connect_timeout_s: how long open() keeps trying to reach the database.
        apply_timeout_s: how long commit() waits for this replica to apply its own committed change.
    """

    shared = True

    def __init__(self, dsn: str, bundle_version: str, index_dimension: int,
                 on_serving: Callable[[bool], None] = lambda serving: None, connect_timeout_s: float = 60.0,
                 apply_timeout_s: float = 30.0) -> None:
        self._dsn = dsn
        self.bundle_version = bundle_version
        self.index_dimension = index_dimension
        self._on_serving = on_serving
        self._connect_timeout_s = connect_timeout_s
        self._apply_timeout_s = apply_timeout_s
        self._replica: Replica | None = None
        self._applied = threading.Condition()  # notified after every applied change
        self._caught_up = False  # the follower is connected, listening and has applied everything it saw
        self._stop = threading.Event()
        self._follower: threading.Thread | None = None
        self._writer: psycopg.Connection | None = None  # used by the catalogue's one writer thread only

    # --- start-up -------------------------------------------------------------------------------------

    def open(self, replica: Replica) -> int:
        deadline = time.monotonic() + self._connect_timeout_s
        while True:
            try:
                connection = self._connect()
                break
            except psycopg.OperationalError as error:
                if time.monotonic() >= deadline:
                    raise StateError(f"cannot reach the shared catalogue database within "
                                     f"{self._connect_timeout_s:g} s: {_first_line(error)}") from None
                logger.warning("shared catalogue database unreachable, retrying: %s", _first_line(error))
                time.sleep(RETRY_S)
        try:
            self._prepare(connection)
            connection.execute(f"LISTEN {CHANNEL}")  # before reading: a change committed meanwhile still wakes us
            started = time.perf_counter()
            replayed = self._read_snapshot(connection, replica)
            replayed += self._catch_up(connection, replica)
        except psycopg.Error as error:
            connection.close()
            raise StateError(f"cannot read the shared catalogue: {_first_line(error)}") from None
        except BaseException:
            connection.close()
            raise
        logger.info("shared catalogue: caught up to change %d (%d operations) in %.2f s", replica.revision,
                    replayed, time.perf_counter() - started)
        self._replica = replica
        self._caught_up = True
        self._follower = threading.Thread(target=self._follow, args=(connection,), name="llmrec-catalogue-follower",
                                          daemon=True)
        self._follower.start()
        return replayed

    def _connect(self) -> psycopg.Connection:
        return psycopg.connect(self._dsn, autocommit=True, **_CONNECTION)

    def _prepare(self, connection: psycopg.Connection) -> None:
        """Create the tables and this version's head row if missing; refuse another index dimension."""
        with connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            connection.execute(SCHEMA)
            if connection.execute("SELECT NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = "
                                  "'llmrec_catalogue_head'::regclass AND attname = 'migration_complete' AND NOT "
                                  "attisdropped)").fetchone()[0]:
                connection.execute(MIGRATION_SCHEMA)
            connection.execute("INSERT INTO llmrec_catalogue_head (bundle_version, index_dimension, last_seq, "
                               "migration_complete) VALUES (%s, %s, 0, false) ON CONFLICT DO NOTHING",
                               (self.bundle_version, self.index_dimension))
            dimension, successor = connection.execute(
                "SELECT index_dimension, superseded_by FROM llmrec_catalogue_head WHERE bundle_version = %s",
                (self.bundle_version,)).fetchone()
        if dimension != self.index_dimension:
            raise StateError(f"the shared catalogue database holds bundle {self.bundle_version} with index rows of "
                             f"{dimension} values, but this bundle's have {self.index_dimension}: two different "
                             "bundles share one version name")
        if successor is not None:
            logger.warning("shared catalogue: bundle %s was superseded by %s (its changes were migrated there): it "
                           "is served read-only, catalogue changes are refused; serve %s or a newer bundle",
                           self.bundle_version, successor, successor)

    def _read_snapshot(self, connection: psycopg.Connection, replica: Replica) -> int:
        """Apply every changed item as of the head's sequence, read in one consistent snapshot."""
        operations = 0
        with connection.transaction():
            connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            (sequence,) = connection.execute("SELECT last_seq FROM llmrec_catalogue_head WHERE bundle_version = %s",
                                             (self.bundle_version,)).fetchone()
            with connection.cursor(name="llmrec_snapshot") as cursor:
                cursor.itersize = FETCH_ROWS
                cursor.execute("SELECT item_id, item FROM llmrec_catalogue_items WHERE bundle_version = %s",
                               (self.bundle_version,))
                upserts: list[tuple[Any, Any]] = []
                deletes: list[str] = []
                for item_id, item in cursor:
                    if item is None:
                        deletes.append(item_id)
                    else:
                        upserts.append(item_from_json(item, self.index_dimension))
                    if len(upserts) == SNAPSHOT_CHUNK or len(deletes) == SNAPSHOT_CHUNK:
                        operations += _apply_batch(replica, sequence, upserts, deletes)
                operations += _apply_batch(replica, sequence, upserts, deletes)
        replica.revision = sequence
        return operations

    # --- following ------------------------------------------------------------------------------------

    def _catch_up(self, connection: psycopg.Connection, replica: Replica) -> int:
        """Apply every change after the replica's revision, in order. Returns how many."""
        applied = 0
        while True:
            rows = connection.execute(
                "SELECT seq, change FROM llmrec_catalogue_changes WHERE bundle_version = %s AND seq > %s "
                "ORDER BY seq LIMIT %s", (self.bundle_version, replica.revision, FETCH_ROWS)).fetchall()
            for sequence, change in rows:
                if sequence != replica.revision + 1:  # commits hold the head row's lock: this cannot happen
                    raise psycopg.DataError(f"change {replica.revision + 1} is missing (found {sequence} next)")
                replica.apply_change(sequence, operation_from_record(change, self.index_dimension))
                with self._applied:
                    self._applied.notify_all()
            applied += len(rows)
            if len(rows) < FETCH_ROWS:
                return applied

    def _follow(self, connection: psycopg.Connection | None) -> None:
        """The follower thread: apply changes as they are committed; reconnect and catch up after a failure."""
        replica = self._replica
        assert replica is not None
        while not self._stop.is_set():
            try:
                if connection is None:
                    connection = self._connect()
                    connection.execute(f"LISTEN {CHANNEL}")
                    self._catch_up(connection, replica)
                    self._caught_up = True
                    logger.info("shared catalogue: reconnected, caught up to change %d", replica.revision)
                    self._on_serving(True)
                self._catch_up(connection, replica)
                for _ in connection.notifies(timeout=POLL_S, stop_after=1):
                    pass  # any notification: look for changes (the payload is only a hint)
            except Exception as error:  # noqa: BLE001 - whatever stops applying: NOT_SERVING, then start over
                if self._stop.is_set():
                    break
                if self._caught_up:
                    self._caught_up = False
                    logger.error("shared catalogue: lost at change %d (%s); NOT_SERVING until caught up again",
                                 replica.revision, _first_line(error),
                                 exc_info=not isinstance(error, psycopg.OperationalError))
                    self._on_serving(False)
                if connection is not None:
                    connection.close()
                    connection = None
                self._stop.wait(RETRY_S)
        if connection is not None:
            connection.close()

    # --- writes ---------------------------------------------------------------------------------------

    def commit(self, operation: Operation) -> int:
        assert self._replica is not None, "open() first"
        sequence = self._insert(change_record(operation), isinstance(operation, Upsert))
        self._wait_applied(sequence)
        return sequence

    def _insert(self, record: dict[str, Any], upsert: bool) -> int:
        """Commit one change record; its sequence number. A connection found broken before anything could commit
        (the database restarted since the last write) is replaced once."""
        for attempt in (1, 2):
            reused = self._writer is not None and not self._writer.closed
            committing = False
            try:
                if not reused:
                    self._writer = self._connect()
                connection = self._writer
                assert connection is not None
                with connection.transaction():
                    sequence = _write_change(connection, self.bundle_version, record, upsert)
                    committing = True  # leaving the block sends COMMIT
                return sequence
            except psycopg.Error as error:
                if self._writer is not None:
                    self._writer.close()
                    self._writer = None
                if not committing and reused and attempt == 1 and isinstance(error, psycopg.OperationalError):
                    continue  # a stale connection: nothing was committed, try once on a new one
                outcome = ("if the connection broke during the commit the change may still be committed, and is "
                           "then applied on every replica (retrying an upsert is safe)") if committing else \
                    "nothing was committed"
                raise StoreUnavailable(f"the shared catalogue database did not confirm the commit "
                                       f"({_first_line(error)}); {outcome}") from None
        raise AssertionError("unreachable")

    def _wait_applied(self, sequence: int) -> None:
        """Until this replica has applied change `sequence`. Raises StoreUnavailable after apply_timeout_s."""
        replica = self._replica
        assert replica is not None, "open() first"
        deadline = time.monotonic() + self._apply_timeout_s
        with self._applied:
            while replica.revision < sequence:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StoreUnavailable(
                        f"change {sequence} is committed, but this replica did not apply it within "
                        f"{self._apply_timeout_s:g} s (it is behind the shared catalogue); it will appear once this "
                        "replica catches up")
                self._applied.wait(remaining)

    # --- migrating changes between bundle versions ----------------------------------------------------

    @contextlib.asynccontextmanager
    async def migration(self, encode: Callable[[Sequence[CatalogueItem]], Awaitable[np.ndarray]],
                        check: Callable[[], None] = lambda: None) -> AsyncIterator[Migration]:
        """Hold the fleet-wide migration lock and bring this version's catalogue up to the version it takes over
        from (Migration); `finish()` inside the block completes it. open() first.

        Args:
            encode: the index rows of items as this version's model encodes them (Recommender.item_rows).
            check: called between steps (from a worker thread); may raise to stop.
        Raises:
            StateError: the database failed; what was committed stays, and the next replica resumes from there.
        """
        migration = Migration(self, encode, check, asyncio.get_running_loop())
        try:
            await asyncio.to_thread(migration.start)
            yield migration
        finally:
            await asyncio.to_thread(migration.close)

    def refusal(self) -> str | None:
        if not self._caught_up:
            return ("this replica has lost the shared catalogue database and is catching up; changes are refused "
                    "until it has (retry, possibly on another replica)")
        return None

    def close(self) -> None:
        self._stop.set()
        if self._follower is not None:
            self._follower.join(timeout=10 * POLL_S)
            self._follower = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _write_change(connection: psycopg.Connection, bundle_version: str, record: dict[str, Any], upsert: bool) -> int:
    """Inside the caller's transaction: take the version's next sequence number (its head row stays locked until
    COMMIT), insert the change, update the items it touches, NOTIFY. Returns the sequence number.

    Raises:
        VersionSuperseded: the version was migrated to a newer one and is read-only.
    """
    # each touched item's new state (None: deleted), for the items table
    states = [(item_id_from_record(item), Jsonb(item)) for item in record["items"]] if upsert \
        else [(item_id, None) for item_id in record["ids"]]
    head = connection.execute(
        "UPDATE llmrec_catalogue_head SET last_seq = last_seq + 1 WHERE bundle_version = %s AND superseded_by IS NULL "
        "RETURNING last_seq", (bundle_version,)).fetchone()
    if head is None:
        (successor,) = connection.execute("SELECT superseded_by FROM llmrec_catalogue_head WHERE bundle_version = %s",
                                          (bundle_version,)).fetchone()
        raise VersionSuperseded(bundle_version, successor)
    (sequence,) = head
    connection.execute("INSERT INTO llmrec_catalogue_changes (bundle_version, seq, change) VALUES (%s, %s, %s)",
                       (bundle_version, sequence, Jsonb(record)))
    with connection.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO llmrec_catalogue_items (bundle_version, item_id, seq, item) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (bundle_version, item_id) DO UPDATE SET seq = EXCLUDED.seq, item = EXCLUDED.item",
            [(bundle_version, item_id, sequence, item) for item_id, item in states])
    connection.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{bundle_version} {sequence}"))
    return sequence


def _lock(connection: psycopg.Connection, key: int, check: Callable[[], None], waiting: str) -> None:
    """Take a session advisory lock, trying every LOCK_POLL_S (check() in between may raise to stop); blocking.
    It is held until the connection closes, so a replica that dies lets the next one in."""
    logged = False
    while not connection.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
        check()
        if not logged:
            logger.info(waiting)
            logged = True
        time.sleep(LOCK_POLL_S)


@contextlib.asynccontextmanager
async def rollout_lock(dsn: str, check: Callable[[], None] = lambda: None) -> AsyncIterator[None]:
    """Held by a replica while it hot-swaps: the replicas sharing a database swap one at a time (each waits for
    the previous one to finish loading, migrating and swapping), so the fleet keeps all but one replica serving.

    Raises:
        StateError: the database cannot be reached.
    """
    try:
        connection = await asyncio.to_thread(psycopg.connect, dsn, autocommit=True, **_CONNECTION)
    except psycopg.Error as error:
        raise StateError(f"cannot reach the shared catalogue database for the rollout lock: {_first_line(error)}") \
            from None
    try:
        try:
            await asyncio.to_thread(_lock, connection, _ROLLOUT_LOCK, check,
                                    "hot swap: waiting for another replica's swap to finish (one replica at a time)")
        except psycopg.Error as error:
            raise StateError(f"the rollout lock failed: {_first_line(error)}") from None
        yield
    finally:
        await asyncio.to_thread(connection.close)  # releases the lock


class Migration:
    """One bundle version's catalogue taking over the changes of the version it replaces, once, in the database.

    The *source* is the version recorded in the target's head row (a migration resumed), else the newest
    (created_at) version other than the target that is neither superseded nor still migrating itself; none: the
    target starts empty. Under the fleet-wide migration lock:
    1. start(): the source's items table (each item's latest state, the text fields included) read in sequence
       order from the target's marker (head.migrated_seq), MIGRATION_BATCH items at a time, re-encoded by the
       target's model and committed to the target as ordinary changes, each with the marker advanced in the same
       transaction: a crash half-way is resumed by the next replica from there. The source takes writes meanwhile.
    2. finish(): one transaction locks the source's head row (its writers wait), carries what committed since
       the marker, supersedes the source (read-only from then on: commits there get VersionSuperseded) and marks
       the target complete. So every change acknowledged on the source is in the target, and no later source
       state can overwrite the target's own writes.
    A complete target, or a superseded one (read-only), is left as it is.
    """

    def __init__(self, store: PostgresStore, encode: Callable[[Sequence[CatalogueItem]], Awaitable[np.ndarray]],
                 check: Callable[[], None], loop: asyncio.AbstractEventLoop) -> None:
        self.target = store.bundle_version
        self.source: str | None = None
        self.superseded_by: str | None = None  # the target itself is read-only
        self.complete = False
        self.carried = 0  # items this replica carried (upserts and deletes)
        self._store, self._encode, self._check, self._loop = store, encode, check, loop
        self._marker = 0  # the source's changes up to this sequence number are in the target
        self._last_seq = 0  # the target's last change committed here
        self._connection: psycopg.Connection | None = None

    def start(self) -> None:
        """Blocking: take the lock, read the target's head, carry the source's state in batches."""
        try:
            self._connection = connection = self._store._connect()
            _lock(connection, _MIGRATION_LOCK, self._check,
                  f"catalogue migration to {self.target}: waiting for another replica's migration to finish")
            self._plan(connection)
            while self.source is not None and not self.complete:
                self._check()
                rows, upto, last = self._delta(connection, MIGRATION_BATCH, lock=False)
                with connection.transaction():
                    self._carry(connection, rows, upto)
                if upto == last:
                    break
        except psycopg.Error as error:
            raise StateError(f"catalogue migration {self.source} -> {self.target} failed ({_first_line(error)}); "
                             "what was committed stays, and the next replica that loads this bundle resumes it") \
                from None

    def _plan(self, connection: psycopg.Connection) -> None:
        superseded_by, migrated_from, marker, complete = connection.execute(
            "SELECT superseded_by, migrated_from, migrated_seq, migration_complete FROM llmrec_catalogue_head "
            "WHERE bundle_version = %s", (self.target,)).fetchone()
        self.superseded_by, self.complete = superseded_by, complete
        if complete or superseded_by is not None:
            self.source = migrated_from
            return
        row = connection.execute(
            "SELECT bundle_version FROM llmrec_catalogue_head WHERE bundle_version <> %s AND superseded_by IS NULL "
            "AND migration_complete ORDER BY created_at DESC, bundle_version DESC LIMIT 1", (self.target,)).fetchone()
        self.source = row[0] if row is not None else None
        self._marker = marker if migrated_from == self.source else 0  # another source: its sequence numbers
        if self.source is None:
            logger.info("catalogue migration: no earlier bundle version in the database, %s starts empty",
                        self.target)
        else:
            logger.info("catalogue migration %s -> %s: %s", self.source, self.target,
                        f"resuming after change {self._marker}" if self._marker else "starting")

    def _delta(self, connection: psycopg.Connection, limit: int | None,
               lock: bool) -> tuple[list[tuple[str, Any]], int, int]:
        """The source's items changed after the marker: (item_id, record or None), in sequence order up to
        `upto`, the sequence number they reach (at least `limit` items: whole changes), and the source's last."""
        (last,) = connection.execute(
            "SELECT last_seq FROM llmrec_catalogue_head WHERE bundle_version = %s" + (" FOR UPDATE" if lock else ""),
            (self.source,)).fetchone()
        upto = last
        if limit is not None:
            sequences = connection.execute(
                "SELECT seq FROM llmrec_catalogue_items WHERE bundle_version = %s AND seq > %s AND seq <= %s "
                "ORDER BY seq LIMIT %s", (self.source, self._marker, last, limit)).fetchall()
            if len(sequences) == limit:
                upto = sequences[-1][0]
        rows = connection.execute(
            "SELECT item_id, item FROM llmrec_catalogue_items WHERE bundle_version = %s AND seq > %s AND seq <= %s "
            "ORDER BY seq, item_id", (self.source, self._marker, upto)).fetchall()
        return rows, upto, last

    def _carry(self, connection: psycopg.Connection, rows: list[tuple[str, Any]], upto: int) -> None:
        """Inside a transaction: commit the rows to the target, re-encoded by its model; the marker to `upto`."""
        items = [CatalogueItem(item_id, item_from_record(record), attributes_from_record(record), upserted=True)
                 for item_id, record in rows if record is not None]
        deletes = [item_id for item_id, record in rows if record is None]
        for start in range(0, len(items), MIGRATION_BATCH):
            batch = items[start : start + MIGRATION_BATCH]
            encoded = asyncio.run_coroutine_threadsafe(self._encode(batch), self._loop).result()
            self._last_seq = _write_change(connection, self.target, change_record(Upsert(batch, encoded)), True)
        for start in range(0, len(deletes), MIGRATION_BATCH):
            self._last_seq = _write_change(
                connection, self.target, {"op": "delete", "ids": deletes[start : start + MIGRATION_BATCH]}, False)
        connection.execute("UPDATE llmrec_catalogue_head SET migrated_from = %s, migrated_seq = %s "
                           "WHERE bundle_version = %s", (self.source, upto, self.target))
        self._marker = upto
        self.carried += len(items) + len(deletes)

    async def finish(self) -> int:
        """Complete the migration (nothing to do if it is complete, or the target superseded) and wait until this
        replica has applied it; the items this replica carried."""
        await asyncio.to_thread(self._finish)
        return self.carried

    def _finish(self) -> None:
        if self.complete or self.superseded_by is not None:
            return
        connection = self._connection
        assert connection is not None, "start() first"
        self._check()
        try:
            with connection.transaction():
                if self.source is not None:
                    rows, upto, _ = self._delta(connection, None, lock=True)  # the source's writers wait from here
                    # Upserts in the target that the source does not hold live: left by an earlier, overtaken
                    # source (no replica writes to a target before it is complete).
                    stale = connection.execute(
                        "SELECT t.item_id, NULL FROM llmrec_catalogue_items t WHERE t.bundle_version = %s AND "
                        "t.item IS NOT NULL AND NOT EXISTS (SELECT 1 FROM llmrec_catalogue_items s WHERE "
                        "s.bundle_version = %s AND s.item_id = t.item_id AND s.item IS NOT NULL)",
                        (self.target, self.source)).fetchall()
                    self._carry(connection, rows + stale, upto)
                    connection.execute("UPDATE llmrec_catalogue_head SET superseded_by = %s WHERE bundle_version = %s",
                                       (self.target, self.source))
                connection.execute("UPDATE llmrec_catalogue_head SET migration_complete = true WHERE bundle_version "
                                   "= %s", (self.target,))
        except psycopg.Error as error:
            raise StateError(f"catalogue migration {self.source} -> {self.target} failed ({_first_line(error)}); "
                             "what was committed stays, and the next replica that loads this bundle resumes it") \
                from None
        self.complete = True
        if self.source is not None:
            logger.info("catalogue migration %s -> %s complete: %d items carried by this replica; %s is read-only "
                        "now", self.source, self.target, self.carried, self.source)
        try:
            self._store._wait_applied(self._last_seq)
        except StoreUnavailable as error:
            raise StateError(str(error)) from None

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()  # releases the lock
            self._connection = None


def _apply_batch(replica: Replica, sequence: int, upserts: list, deletes: list[str]) -> int:
    """Apply (and empty) a batch of snapshot items; the number of operations applied."""
    applied = 0
    if upserts:
        replica.apply_change(sequence, Upsert([item for item, _ in upserts], np.stack([row for _, row in upserts])))
        upserts.clear()
        applied += 1
    if deletes:
        replica.apply_change(sequence, Delete(list(deletes)))
        deletes.clear()
        applied += 1
    return applied


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
