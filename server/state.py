"""Durable catalogue changes: an append-only journal plus periodic snapshots, per bundle version.

Layout, under the configured state directory (the bundle directory itself is never written):

    <state_dir>/<bundle_version>/state.json       {"format", "bundle_version", "index_dimension"}: the tag
    <state_dir>/<bundle_version>/snapshot.jsonl   header line, then one line per item that differs from the bundle
    <state_dir>/<bundle_version>/journal.jsonl    one line per change since the snapshot: "<crc32> <json>\\n"
    <state_dir>/<bundle_version>/LOCK             flock'ed by the one server that owns the directory

Every change is a journal line, written and fsynced before the change is applied and acknowledged. Each
line carries a sequence number and a CRC32 of its JSON. Every `snapshot_every` changes (and at a clean
shutdown) the full difference from the bundle is written to a temporary file, fsynced and renamed over the
snapshot (atomic), and only then is the journal emptied. Start-up replays the snapshot, then journal lines
with a larger sequence number. A crash can leave a torn last line (never acknowledged, since it was not
fsynced): it is dropped and truncated away. A damaged line with good lines after it is corruption: the
server refuses to start rather than silently lose an acknowledged change.

State is keyed by bundle version: a server serving another bundle starts from that bundle's own state and
logs which other versions hold changes it does not apply (their text is in their snapshot and journal).
Vectors are stored with the items, so replay needs no inference and reproduces the served rows exactly.
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import json
import logging
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmrec.item_record import attributes_from_record, item_from_record, item_id_from_record, item_to_record

from llmrec.server.domain import CatalogueItem

logger = logging.getLogger(__name__)

STATE_FORMAT = 1
STATE_FILE = "state.json"
SNAPSHOT_FILE = "snapshot.jsonl"
JOURNAL_FILE = "journal.jsonl"
LOCK_FILE = "LOCK"


class StateError(Exception):
    """The state directory cannot be used: locked by another server, corrupt, or tagged for another bundle."""


@dataclasses.dataclass(frozen=True, eq=False)
class Upsert:
    items: list[CatalogueItem]
    rows: np.ndarray  # (len(items), index_dimension) float32 index rows


@dataclasses.dataclass(frozen=True)
class Delete:
    item_ids: list[str]


class CatalogueStore:
    """The journal and snapshot of one bundle version's catalogue changes.

    Args:
        root: the state directory (created if missing).
        bundle_version: the served bundle; its changes live in root/<bundle_version>/.
        index_dimension: values per index row, checked on every stored row.
        snapshot_every: write a snapshot (and empty the journal) after this many journaled changes.
    """

    def __init__(self, root: Path, bundle_version: str, index_dimension: int, snapshot_every: int = 1000) -> None:
        if snapshot_every < 1:
            raise ValueError("snapshot_every must be at least 1")
        self.root = Path(root)
        self.bundle_version = bundle_version
        self.directory = self.root / bundle_version
        self.index_dimension = index_dimension
        self.snapshot_every = snapshot_every
        self.records_since_snapshot = 0
        self.broken = False  # set after a failed journal write: the file's state is unknown
        self._journal = None
        self._lock_fd: int | None = None

    # --- start-up -------------------------------------------------------------------------------------

    def open(self) -> tuple[list[Upsert | Delete], int]:
        """Lock the directory and read it back: (operations to replay in order, last sequence number).

        Raises:
            StateError: another process holds the directory, it is tagged for another bundle, or it is corrupt.
        """
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StateError(f"cannot create the state directory {self.directory}: {error}") from error
        _fsync_directory(self.root)
        self._lock()
        try:
            self._check_tag()
            operations, sequence = self._read_snapshot()
            journal_operations, sequence = self._read_journal(sequence)
            operations += journal_operations
            self.records_since_snapshot = len(journal_operations)
            self._journal = (self.directory / JOURNAL_FILE).open("ab")
            _fsync_directory(self.directory)
        except BaseException:
            self.close()
            raise
        self._warn_about_other_versions()
        logger.info("catalogue state %s: %d changes to replay, revision %d", self.directory, len(operations),
                    sequence)
        return operations, sequence

    def _lock(self) -> None:
        fd = os.open(self.directory / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateError(f"another server is using the state directory {self.directory}") from None
        self._lock_fd = fd

    def _check_tag(self) -> None:
        path = self.directory / STATE_FILE
        tag = {"format": STATE_FORMAT, "bundle_version": self.bundle_version, "index_dimension": self.index_dimension}
        if not path.exists():
            _write_atomically(path, (json.dumps(tag, indent=2) + "\n").encode())
            return
        try:
            found = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise StateError(f"{path} is unreadable ({error})") from error
        if found != tag:
            raise StateError(f"{path} is tagged {found}, but this server needs {tag}: it holds state for "
                             "another bundle or format")

    def _read_snapshot(self) -> tuple[list[Upsert | Delete], int]:
        path = self.directory / SNAPSHOT_FILE
        if not path.exists():
            return [], 0
        try:
            lines = [line for line in path.read_bytes().split(b"\n") if line]
            header = json.loads(lines[0])
            if header.get("bundle_version") != self.bundle_version or header.get("format") != STATE_FORMAT:
                raise StateError(f"{path} belongs to bundle {header.get('bundle_version')!r}, not "
                                 f"{self.bundle_version!r}")
            records = [json.loads(line) for line in lines[1:]]
            if len(records) != header["changes"]:
                raise StateError(f"{path} holds {len(records)} changes, its header says {header['changes']}")
            items = [self._item_from_json(r["item"]) for r in records if r["op"] == "upsert"]
            deleted = [str(r["id"]) for r in records if r["op"] == "delete"]
            sequence = int(header["last_seq"])
        except StateError:
            raise
        except (IndexError, KeyError, TypeError, ValueError) as error:
            # Snapshots are renamed into place only once complete and fsynced: a bad one is not a crash artefact.
            raise StateError(f"{path} is corrupt ({error!r})") from error
        operations: list[Upsert | Delete] = []
        if items:
            operations.append(Upsert([i for i, _ in items], np.stack([row for _, row in items])))
        if deleted:
            operations.append(Delete(deleted))
        return operations, sequence

    def _read_journal(self, after: int) -> tuple[list[Upsert | Delete], int]:
        path = self.directory / JOURNAL_FILE
        if not path.exists():
            return [], after
        data = path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # bytes after the last newline: a torn write when not empty
        parsed: list[dict[str, Any] | None] = [_parse_line(line) for line in lines]
        first_bad = next((n for n, record in enumerate(parsed) if record is None), len(parsed))
        if any(record is not None for record in parsed[first_bad:]):
            raise StateError(f"{path}: line {first_bad + 1} is damaged but later lines are intact; refusing to "
                             "start rather than drop an acknowledged change (restore the file from a backup)")
        good_bytes = sum(len(line) + 1 for line in lines[:first_bad])
        if good_bytes < len(data):
            logger.warning("journal %s: ignoring a torn last record (%d bytes) left by a crash; it was never "
                           "acknowledged", path, len(data) - good_bytes)
            with path.open("r+b") as handle:
                handle.truncate(good_bytes)
                handle.flush()
                os.fsync(handle.fileno())
        del tail
        operations: list[Upsert | Delete] = []
        sequence = after
        for number, record in enumerate(parsed[:first_bad], 1):
            assert record is not None
            try:
                seq = int(record["seq"])
                if seq <= after:  # already in the snapshot (a crash between snapshot and journal truncation)
                    continue
                if seq <= sequence:
                    raise StateError(f"{path}: line {number} repeats sequence number {seq}")
                if record["op"] == "upsert":
                    items = [self._item_from_json(i) for i in record["items"]]
                    operations.append(Upsert([i for i, _ in items], np.stack([row for _, row in items])))
                elif record["op"] == "delete":
                    operations.append(Delete([str(i) for i in record["ids"]]))
                else:
                    raise StateError(f"{path}: line {number} has unknown op {record['op']!r}")
            except StateError:
                raise
            except (KeyError, TypeError, ValueError) as error:
                raise StateError(f"{path}: line {number} is not a valid change ({error!r})") from error
            sequence = seq
        return operations, sequence

    def _warn_about_other_versions(self) -> None:
        others = sorted(p.parent.name for p in self.root.glob(f"*/{STATE_FILE}") if p.parent != self.directory)
        if others:
            logger.warning("state directory %s also holds catalogue changes for bundle versions %s; they are not "
                           "applied to bundle %s (re-upsert items to carry them over)", self.root,
                           ", ".join(others), self.bundle_version)

    # --- writes ---------------------------------------------------------------------------------------

    def append(self, sequence: int, operation: Upsert | Delete) -> None:
        """Write one change and fsync it. Raises OSError (and marks the store broken) if that fails."""
        if self._journal is None:
            raise OSError("the catalogue store is not open")
        record: dict[str, Any] = {"seq": sequence}
        if isinstance(operation, Upsert):
            record["op"] = "upsert"
            record["items"] = [self._item_to_json(i, r) for i, r in zip(operation.items, operation.rows)]
        else:
            record["op"] = "delete"
            record["ids"] = list(operation.item_ids)
        payload = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
        try:
            self._journal.write(b"%08x %s\n" % (zlib.crc32(payload), payload))
            self._journal.flush()
            os.fsync(self._journal.fileno())
        except OSError:
            self.broken = True
            raise
        self.records_since_snapshot += 1

    def snapshot(self, operations: Sequence[Upsert | Delete], sequence: int) -> None:
        """Atomically replace the snapshot with `operations` (the whole difference from the bundle) as of
        `sequence`, then empty the journal."""
        lines = []
        for operation in operations:
            if isinstance(operation, Upsert):
                lines += [{"op": "upsert", "item": self._item_to_json(i, r)}
                          for i, r in zip(operation.items, operation.rows)]
            else:
                lines += [{"op": "delete", "id": item_id} for item_id in operation.item_ids]
        header = {"format": STATE_FORMAT, "bundle_version": self.bundle_version, "last_seq": sequence,
                  "changes": len(lines)}
        body = b"".join(json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
                        for line in [header, *lines])
        _write_atomically(self.directory / SNAPSHOT_FILE, body)
        if self._journal is not None:  # only now: until the rename, the journal is the only durable copy
            self._journal.truncate(0)
            self._journal.flush()
            os.fsync(self._journal.fileno())
        self.records_since_snapshot = 0
        logger.info("catalogue snapshot at revision %d (%d changes from the bundle)", sequence, len(lines))

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # --- encoding -------------------------------------------------------------------------------------

    def _item_to_json(self, item: CatalogueItem, row: np.ndarray) -> dict[str, Any]:
        """The item record (llmrec.item_record) with its attributes, plus the base64 little-endian index row."""
        return {**item_to_record(item.item_id, item.fields, item.attributes),
                "vector": base64.b64encode(np.asarray(row, dtype="<f4").tobytes()).decode()}

    def _item_from_json(self, data: dict[str, Any]) -> tuple[CatalogueItem, np.ndarray]:
        item_id = item_id_from_record(data)
        row = np.frombuffer(base64.b64decode(data["vector"], validate=True), dtype="<f4").astype(np.float32)
        if row.shape != (self.index_dimension,):
            raise ValueError(f"item {item_id!r} has a vector of {row.size} values, want {self.index_dimension}")
        item = CatalogueItem(item_id, item_from_record(data), attributes_from_record(data), upserted=True)
        return item, row


def _parse_line(line: bytes) -> dict[str, Any] | None:
    """A journal line's record, or None when the line is torn or damaged."""
    checksum, _, payload = line.partition(b" ")
    try:
        if len(checksum) != 8 or int(checksum, 16) != zlib.crc32(payload):
            return None
        record = json.loads(payload)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file, fsync it, rename it over `path`, fsync the directory."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_directory(path.parent)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
