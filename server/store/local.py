"""The embedded single-machine store: server.state's journal and snapshots, owned by this one server."""

from __future__ import annotations

import logging

from llmrec.server.state import CatalogueStore
from llmrec.server.store import ChangeStore, Operation, Replica, StoreUnavailable

logger = logging.getLogger(__name__)


class LocalStore(ChangeStore):
    """Sequences, journals (fsync) and applies changes on the catalogue's one writer thread.

    Args:
        journal: the state directory's journal and snapshot (server.state), not yet opened.
    """

    def __init__(self, journal: CatalogueStore) -> None:
        self.journal = journal
        self._replica: Replica | None = None

    def open(self, replica: Replica) -> int:
        operations, revision = self.journal.open()
        for operation in operations:  # before serving: what the revision reads in between is never seen
            replica.apply_change(revision, operation)
        replica.revision = revision
        self._replica = replica
        return len(operations)

    def commit(self, operation: Operation) -> int:
        replica = self._replica
        assert replica is not None, "open() first"
        sequence = replica.revision + 1
        try:
            self.journal.append(sequence, operation)
        except OSError as error:
            raise StoreUnavailable(f"the change could not be made durable and was not applied ({error})") from None
        replica.apply_change(sequence, operation)
        if self.journal.records_since_snapshot >= self.journal.snapshot_every:
            try:
                self.journal.snapshot(replica.change_records(), sequence)
            except OSError as error:  # the journal still holds everything: a failed snapshot loses nothing
                logger.error("catalogue snapshot failed (the journal keeps every change): %s", error)
        return sequence

    def refusal(self) -> str | None:
        if self.journal.broken:
            return ("catalogue changes are disabled after a storage error; the server log has the details (restart "
                    "the server once the state directory is writable)")
        return None

    def close(self) -> None:
        if self._replica is not None and self.journal.records_since_snapshot and not self.journal.broken:
            try:
                self.journal.snapshot(self._replica.change_records(), self._replica.revision)
            except OSError as error:  # the journal keeps every change: the next start replays it
                logger.error("last catalogue snapshot failed (the journal keeps every change): %s", error)
        self.journal.close()
