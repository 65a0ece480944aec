"""Where catalogue changes (UpsertItems/DeleteItems) are made durable, and from where every replica applies them.

Two stores, chosen by the `catalogue_store` setting:
* `local` (server.store.local, the default): the journal and snapshots of server.state in one state directory,
  owned by one server. Changes are sequenced, fsynced and applied by that server alone.
* `postgres` (server.store.postgres): one PostgreSQL database shared by many replicas. A change is
  acknowledged only after it is committed there with the next sequence number; every replica applies every
  change in sequence order (LISTEN/NOTIFY wakes it, a catch-up by sequence fills any gap), and a replica that
  starts or reconnects is NOT_SERVING until it has caught up.

Both apply a change through the same path (Replica.apply_change), so a catalogue replays, follows and writes alike.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Protocol

from llmrec.server.state import Delete, StateError, Upsert

if TYPE_CHECKING:
    from llmrec.manifest import Manifest
    from llmrec.server.settings import ServerSettings

Operation = Upsert | Delete


class Replica(Protocol):
    """What a store keeps up to date: the live catalogue (server.catalogue.Catalogue)."""

    revision: int  # the sequence number of the last change applied

    def apply_change(self, sequence: int, operation: Operation) -> None:
        """Apply one change; called in sequence order, by one thread at a time."""

    def change_records(self) -> list[Operation]:
        """The whole difference from the bundle, for a snapshot."""


class StoreUnavailable(OSError):
    """A change could not be made durable (or its outcome is unknown): it must not be acknowledged."""


class VersionSuperseded(StoreUnavailable):
    """The bundle version's changes were migrated to a newer version (a rollout): this one is read-only. Nothing
    was committed; the caller retries and reaches a replica that serves the newer version."""

    def __init__(self, bundle_version: str, successor: str) -> None:
        super().__init__(f"bundle version {bundle_version} is read-only in the shared catalogue: its changes were "
                         f"migrated to version {successor}, which other replicas serve (a rollout is under way and "
                         "this replica has not swapped yet); nothing was committed, retry")
        self.successor = successor


class ChangeStore(abc.ABC):
    """The durable, ordered record of one bundle version's catalogue changes."""

    shared = False  # True: many replicas share it, and bundle versions take over each other's changes in it

    @abc.abstractmethod
    def open(self, replica: Replica) -> int:
        """Bring `replica` up to date with every stored change and keep it so. Blocking; returns the number of
        changes replayed. Raises StateError when the stored changes cannot be used."""

    @abc.abstractmethod
    def commit(self, operation: Operation) -> int:
        """Make one change durable, wait until `replica` has applied it, return its sequence number.
        Raises StoreUnavailable: the change must not be acknowledged."""

    @abc.abstractmethod
    def refusal(self) -> str | None:
        """Why changes are refused right now (an UNAVAILABLE message), or None when they are taken."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop following; release what the store holds (the local store writes a last snapshot)."""


def store_for(settings: ServerSettings, manifest: Manifest,
              on_serving: Callable[[bool], None] = lambda serving: None,
              warn_other_versions: bool = True) -> ChangeStore | None:
    """The store the settings choose for a bundle, or None (no state: the catalogue is read-only).

    on_serving(False) is called from a store thread when the replica may have fallen behind (the shared store
    is unreachable), on_serving(True) once it has caught up again. warn_other_versions: the local store warns that
    other bundle versions' changes are not applied (not for a hot swap, which carries them over).
    """
    if settings.catalogue_store == "postgres":
        from llmrec.server.store.postgres import PostgresStore  # psycopg is needed only here

        return PostgresStore(settings.read_postgres_dsn(), manifest.bundle_version, manifest.index_dimension,
                             on_serving=on_serving, connect_timeout_s=settings.postgres_connect_timeout_s,
                             apply_timeout_s=settings.postgres_apply_timeout_s)
    if settings.state_dir is None:
        return None
    from llmrec.server.store.local import LocalStore
    from llmrec.server.state import CatalogueStore

    return LocalStore(CatalogueStore(settings.state_dir, manifest.bundle_version, manifest.index_dimension,
                                     settings.snapshot_every, warn_other_versions))


def rollout_lock(settings: ServerSettings, check: Callable[[], None]) -> AbstractAsyncContextManager[None]:
    """What a hot swap holds from loading to swapping: with the shared store, a fleet-wide lock, so the replicas
    sharing the database swap one at a time (server.store.postgres.rollout_lock); otherwise nothing."""
    if settings.catalogue_store == "postgres":
        from llmrec.server.store.postgres import rollout_lock as shared_rollout_lock

        return shared_rollout_lock(settings.read_postgres_dsn(), check)
    return contextlib.nullcontext()


__all__ = ["ChangeStore", "Operation", "Replica", "StateError", "StoreUnavailable", "VersionSuperseded", "rollout_lock",
           "store_for"]
