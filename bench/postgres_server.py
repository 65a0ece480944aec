"""A real PostgreSQL server for the shared-catalogue tests and bench.capacity: the binaries of the `pgserver` wheel
(dev extra), on a Unix socket in its data directory, stopped and started at will.

As root, pgserver runs PostgreSQL as its own system user `pgserver` (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import subprocess
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL can run here (the reason says why)."""


class Postgres:
    """initdb + start on first use; stop(immediate=True) is a crash, start() brings it back with the same data."""

    def __init__(self, directory: Path) -> None:
        try:
            import pgserver
            from pgserver._commands import POSTGRES_BIN_PATH
        except ImportError as error:
            raise PostgresUnavailable(f"the pgserver wheel (dev extra) is not installed ({error})") from None
        self.data = directory
        try:
            self._server = pgserver.get_server(directory, cleanup_mode="stop")
        except (OSError, subprocess.SubprocessError) as error:
            raise PostgresUnavailable(f"the pgserver wheel's PostgreSQL does not start here ({error})") from None
        self._pg_ctl = str(POSTGRES_BIN_PATH / "pg_ctl")
        self.dsn = self._server.get_uri()

    def _ctl(self, *args: str) -> None:
        command = [self._pg_ctl, "-D", str(self.data), "-l", str(self.data / "log"), "-w", *args]
        # runuser, not subprocess's user=: that forks a child which runs gRPC's fork handlers before exec (and
        # can crash there); a plain command line is spawned without them.
        user = self._server.system_user
        done = subprocess.run(["runuser", "-u", user, "--", *command] if user else command, capture_output=True,
                              text=True, timeout=120)
        if done.returncode:
            raise subprocess.CalledProcessError(done.returncode, done.args, done.stdout, done.stderr)

    def stop(self, immediate: bool = True) -> None:
        """immediate: no checkpoint, connections cut, as if the machine lost power (committed data survives)."""
        self._ctl("-m", "immediate" if immediate else "fast", "stop")

    def start(self) -> None:
        # restart on a stopped server starts it with the options of its last start (postmaster.opts)
        self._ctl("restart")

    def psql(self, sql: str) -> str:
        return self._server.psql(sql)

    def close(self) -> None:
        try:
            self._ctl("-m", "fast", "stop")
        except subprocess.CalledProcessError:
            pass  # already stopped
        self._server.cleanup()


class SequenceOnly:
    """A Replica (server.store) that only follows sequence numbers, with no catalogue: for a process that only
    writes changes (the replicas apply them) or a test of the store alone."""

    revision = 0

    def apply_change(self, sequence: int, operation) -> None:
        self.revision = sequence

    def change_records(self) -> list:
        return []


def seed_items(dsn: str, manifest, count: int, items_per_change: int = 1, prefix: str = "seed-") -> list[str]:
    """Commit `count` new items with random unit vectors straight through the shared store (what UpsertItems
    commits, without the encoding), `items_per_change` per change; their ids."""
    import numpy as np

    from llmrec.server.domain import CatalogueItem
    from llmrec.server.state import Upsert
    from llmrec.server.store.postgres import PostgresStore
    from llmrec.template import ItemFields

    store = PostgresStore(dsn, manifest.bundle_version, manifest.index_dimension)
    store.open(SequenceOnly())
    rng = np.random.default_rng(4)
    ids = [f"{prefix}{n}" for n in range(count)]
    try:
        for start in range(0, count, items_per_change):
            chunk = ids[start:start + items_per_change]
            vectors = rng.normal(size=(len(chunk), manifest.dimension)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            rows = np.hstack([vectors, np.full((len(chunk), 1), manifest.new_item_bias, np.float32)])
            items = [CatalogueItem(item_id, ItemFields(f"Seeded film {item_id}", ("Drama",)), (), upserted=True)
                     for item_id in chunk]
            store.commit(Upsert(items, rows))
    finally:
        store.close()
    return ids
