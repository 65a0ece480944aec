"""The shared catalogue store: one PostgreSQL database, many replicas (docs/serving.md#many-replicas).

Tables (created on first use; one row set per bundle version, as the local store keeps one directory per version):

    llmrec_catalogue_head     (bundle_version, index_dimension, last_seq)   the sequence counter
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
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from llmrec.item_record import item_id_from_record

from llmrec.server.state import Delete, StateError, Upsert, change_record, item_from_json, operation_from_record
from llmrec.server.store import ChangeStore, Operation, Replica, StoreUnavailable

logger = logging.getLogger(__name__)

CHANNEL = "llmrec_catalogue"
POLL_S = 0.5  # the follower looks for changes this often even without a notification (and sees close() by then)
RETRY_S = 0.5  # between reconnection attempts
FETCH_ROWS = 1000  # changes (or snapshot items) read per round trip
SNAPSHOT_CHUNK = 1024  # snapshot items applied per operation
_SCHEMA_LOCK = 7_351_237_117  # pg_advisory_xact_lock key: replicas starting together create the tables once
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
            connection.execute("INSERT INTO llmrec_catalogue_head VALUES (%s, %s, 0) ON CONFLICT DO NOTHING",
                               (self.bundle_version, self.index_dimension))
            (dimension,) = connection.execute(
                "SELECT index_dimension FROM llmrec_catalogue_head WHERE bundle_version = %s",
                (self.bundle_version,)).fetchone()
        if dimension != self.index_dimension:
            raise StateError(f"the shared catalogue database holds bundle {self.bundle_version} with index rows of "
                             f"{dimension} values, but this bundle's have {self.index_dimension}: two different "
                             "bundles share one version name")

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
        replica = self._replica
        assert replica is not None, "open() first"
        sequence = self._insert(change_record(operation), isinstance(operation, Upsert))
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
        return sequence

    def _insert(self, record: dict[str, Any], upsert: bool) -> int:
        """Commit one change record; its sequence number. A connection found broken before anything could commit
        (the database restarted since the last write) is replaced once."""
        # each touched item's new state (None: deleted), for the items table
        states = [(item_id_from_record(item), Jsonb(item)) for item in record["items"]] if upsert \
            else [(item_id, None) for item_id in record["ids"]]
        for attempt in (1, 2):
            reused = self._writer is not None and not self._writer.closed
            committing = False
            try:
                if not reused:
                    self._writer = self._connect()
                connection = self._writer
                assert connection is not None
                with connection.transaction():
                    (sequence,) = connection.execute(
                        "UPDATE llmrec_catalogue_head SET last_seq = last_seq + 1 WHERE bundle_version = %s "
                        "RETURNING last_seq", (self.bundle_version,)).fetchone()
                    connection.execute("INSERT INTO llmrec_catalogue_changes (bundle_version, seq, change) "
                                       "VALUES (%s, %s, %s)", (self.bundle_version, sequence, Jsonb(record)))
                    with connection.cursor() as cursor:
                        cursor.executemany(
                            "INSERT INTO llmrec_catalogue_items (bundle_version, item_id, seq, item) "
                            "VALUES (%s, %s, %s, %s) ON CONFLICT (bundle_version, item_id) "
                            "DO UPDATE SET seq = EXCLUDED.seq, item = EXCLUDED.item",
                            [(self.bundle_version, item_id, sequence, item) for item_id, item in states])
                    connection.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{self.bundle_version} {sequence}"))
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
