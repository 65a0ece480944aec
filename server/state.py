"""Durable catalogue changes: an append-only journal plus periodic snapshots, per bundle version.

Layout, under the configured state directory (the bundle directory itself is never written):

    <state_dir>/<bundle_version>/state.json       {"format", "bundle_version", "index_dimension"}: the tag
    <state_dir>/<bundle_version>/snapshot.jsonl   header line, then one line per item that differs from the bundle
    <state_dir>/<bundle_version>/journal.jsonl    "<crc32> <json>\\n" lines: a base record, then one per change
    <state_dir>/<bundle_version>/LOCK             flock'ed by the one server that owns the directory

Write protocol (what start-up relies on):
* Every change gets the next sequence number (the catalogue revision) and is one journal line, carrying its seq
  and a CRC32 of its JSON. The line is written with one append and fsynced before the change is applied, and
  the change is acknowledged only after that fsync returned. A failed write or fsync is never acknowledged:
  the bytes are cut back off (best effort) and the store refuses further changes until a restart.
* The journal's first line is its base record {"seq": B, "op": "base"}: every change up to revision B is in the
  snapshot (B = 0: there is none), the lines after it are B+1, B+2, ... with no gap.
* Every `snapshot_every` changes (and at a clean shutdown) the full difference from the bundle as of revision S
  is written to a temporary file (its header holds S and the sha256 of the lines after it), fsynced and renamed
  over the snapshot; only then is the journal replaced, the same way, by one holding just base S.
* A new directory gets its journal (base 0) before its tag, so a tagged directory always has a journal.

Start-up, which refuses (StateError, one line naming the file, the line and byte offset, and what to do)
rather than drop or invent an acknowledged change:
* the snapshot must match its sha256 and count; the journal's base B must not be past the snapshot's revision
  S (a missing snapshot is revision 0: a journal based on revision 40 without it would silently lose 1..40);
* journal lines must be intact and consecutive; a damaged line anywhere but at the very end refuses start-up;
* only the last line may be torn: bytes after the last intact line that hold at most one record and, where its
  seq can still be read, the next one. Since nothing is acknowledged before its whole line is fsynced, a record
  torn by a crash during its own write was never acknowledged. The server cannot tell such a tear from damage
  done to the file later, so it never just deletes the bytes: it moves them to journal.jsonl.torn-<time>,
  truncates the journal to its last intact line and logs a warning saying exactly that.
* lines at or below S (left by a crash between the snapshot's rename and the journal's replacement) are
  already in the snapshot and skipped; the revision is the larger of S and the last line's seq.

Format 1 directories (no base record, no snapshot digest) are read with the checks that do not need them and
upgraded to format 2 on open.

State is keyed by bundle version: a server serving another bundle starts from that bundle's own state and
logs which other versions hold changes it does not apply (their text is in their snapshot and journal).
Vectors are stored with the items, so replay needs no inference and reproduces the served rows exactly.
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmrec.item_record import attributes_from_record, item_from_record, item_id_from_record, item_to_record
from llmrec.manifest import BUNDLE_VERSION_PATTERN

from llmrec.server.domain import CatalogueItem

logger = logging.getLogger(__name__)

STATE_FORMAT = 2
LEGACY_STATE_FORMAT = 1  # no journal base record, no snapshot digest: read, then upgraded on open
STATE_FILE = "state.json"
SNAPSHOT_FILE = "snapshot.jsonl"
JOURNAL_FILE = "journal.jsonl"
LOCK_FILE = "LOCK"
TORN_SUFFIX = ".torn-"  # journal.jsonl.torn-<UTC time>: the bytes of a torn last record, kept for the operator
_SEQ_PREFIX = re.compile(rb'^[0-9a-f]{8} \{"seq":(\d+)[,}]')


class StateError(Exception):
    """The state directory cannot be used: locked by another server, corrupt, or tagged for another bundle."""


@dataclasses.dataclass(frozen=True, eq=False)
class Upsert:
    items: list[CatalogueItem]
    rows: np.ndarray  # (len(items), index_dimension) float32 index rows


@dataclasses.dataclass(frozen=True)
class Delete:
    item_ids: list[str]


@dataclasses.dataclass
class _Line:
    number: int  # 1-based
    offset: int  # byte offset of the line in the file
    raw: bytes  # without the newline
    record: dict[str, Any] | None  # None: damaged (CRC or JSON)


class CatalogueStore:
    """The journal and snapshot of one bundle version's catalogue changes.

    Args:
        root: the state directory (created if missing).
        bundle_version: the served bundle; its changes live in root/<bundle_version>/.
        index_dimension: values per index row, checked on every stored row.
        snapshot_every: write a snapshot (and empty the journal) after this many journaled changes.
        warn_other_versions: warn at open() that other versions' changes are not applied (not when a hot swap
            opens the store: it carries the served version's changes over itself, server.models).
    """

    def __init__(self, root: Path, bundle_version: str, index_dimension: int, snapshot_every: int = 1000,
                 warn_other_versions: bool = True) -> None:
        if snapshot_every < 1:
            raise ValueError("snapshot_every must be at least 1")
        if not re.fullmatch(BUNDLE_VERSION_PATTERN, bundle_version):  # it names a directory under root
            raise StateError(f"bundle version {bundle_version!r} cannot name a state directory (want a plain name)")
        self.root = Path(root)
        self.bundle_version = bundle_version
        self.directory = self.root / bundle_version
        self.index_dimension = index_dimension
        self.snapshot_every = snapshot_every
        self.warn_other_versions = warn_other_versions
        self.records_since_snapshot = 0
        self.broken = False  # set after a failed journal write: the file's state is unknown
        self._journal_fd: int | None = None
        self._journal_size = 0
        self._lock_fd: int | None = None

    @property
    def _journal_path(self) -> Path:
        return self.directory / JOURNAL_FILE

    @property
    def _tag(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "bundle_version": self.bundle_version, "index_dimension": self.index_dimension}

    # --- start-up -------------------------------------------------------------------------------------

    def open(self) -> tuple[list[Upsert | Delete], int]:
        """Lock the directory and read it back: (operations to replay in order, last sequence number).

        Raises:
            StateError: another process holds the directory, it is tagged for another bundle, or it is corrupt
                or incomplete in a way that could lose an acknowledged change (the message says what to do).
        """
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            _fsync_directory(self.root)
        except OSError as error:
            raise StateError(f"cannot create the state directory {self.directory}: {error}") from error
        self._lock()
        try:
            state_format = self._check_tag()
            operations, snapshot_revision = self._read_snapshot()
            journal = self._read_journal(snapshot_revision, legacy=state_format == LEGACY_STATE_FORMAT)
            operations += journal.operations
            sequence = journal.revision
            # Every check passed: only now is anything on disk changed.
            if journal.torn is not None:
                self._set_torn_tail_aside(*journal.torn, last_seq=journal.last_seq)
            if state_format == LEGACY_STATE_FORMAT:
                self._replace_journal(snapshot_revision, [line.raw for line in journal.lines
                                                          if int(line.record["seq"]) > snapshot_revision])
                _write_atomically(self.directory / STATE_FILE, _tag_bytes(self._tag))
                logger.info("state directory %s upgraded to format %d", self.directory, STATE_FORMAT)
            self.records_since_snapshot = len(journal.operations)
            if self._journal_fd is None:
                self._journal_fd = os.open(self._journal_path, os.O_WRONLY | os.O_APPEND)
                self._journal_size = os.fstat(self._journal_fd).st_size
        except OSError as error:
            self.close()
            raise StateError(f"cannot use the state directory {self.directory}: {error}") from error
        except BaseException:
            self.close()
            raise
        if self.warn_other_versions:
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

    def _check_tag(self) -> int:
        """The directory's state format; a new directory gets its journal (base 0), then its tag."""
        path = self.directory / STATE_FILE
        if not path.exists():
            snapshot, journal = self.directory / SNAPSHOT_FILE, self._journal_path
            fresh_journal = _record_line({"seq": 0, "op": "base"})
            if snapshot.exists() or (journal.exists() and journal.read_bytes() not in (b"", fresh_journal)):
                raise StateError(
                    f"{path} is missing but {self.directory} holds catalogue changes ({SNAPSHOT_FILE} or "
                    f"{JOURNAL_FILE}); refusing to start without knowing what they belong to. Restore {STATE_FILE} "
                    f"from a backup, or write it as {json.dumps(self._tag)} if this is the state of bundle "
                    f"{self.bundle_version}")
            self._replace_journal(0, [])  # before the tag: a tagged directory always has a journal
            _write_atomically(path, _tag_bytes(self._tag))
            return STATE_FORMAT
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise StateError(f"{path} is unreadable ({error})") from error
        legacy = {**self._tag, "format": LEGACY_STATE_FORMAT}
        if found not in (self._tag, legacy):
            raise StateError(f"{path} is tagged {found}, but this server needs {self._tag}: it holds state for "
                             "another bundle or format")
        return int(found["format"])

    def _read_snapshot(self) -> tuple[list[Upsert | Delete], int]:
        """The snapshot's operations and revision ([], 0 when there is none)."""
        path = self.directory / SNAPSHOT_FILE
        if not path.exists():
            return [], 0
        restore = (f"snapshots are renamed into place only once complete and fsynced, so this is not a crash "
                   f"artefact: restore {path} from a backup (the journal holds only the changes after it), or move "
                   f"{self.directory} aside to serve the bundle without its catalogue changes")
        data = path.read_bytes()
        header_line, _, body = data.partition(b"\n")
        try:
            header = json.loads(header_line)
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            if header.get("bundle_version") != self.bundle_version or \
                    header.get("format") not in (STATE_FORMAT, LEGACY_STATE_FORMAT):
                raise StateError(f"{path} belongs to bundle {header.get('bundle_version')!r} (format "
                                 f"{header.get('format')!r}), not {self.bundle_version!r}; {restore}")
            if header["format"] == STATE_FORMAT and hashlib.sha256(body).hexdigest() != header["sha256"]:
                raise StateError(f"{path} is damaged: the {len(body)} bytes after its header do not match the "
                                 f"sha256 in it; {restore}")
            lines = [line for line in body.split(b"\n") if line]
            records = [json.loads(line) for line in lines]
            if len(records) != header["changes"]:
                raise StateError(f"{path} holds {len(records)} changes, its header says {header['changes']}; "
                                 f"{restore}")
            items = [item_from_json(r["item"], self.index_dimension) for r in records if r["op"] == "upsert"]
            deleted = [str(r["id"]) for r in records if r["op"] == "delete"]
            sequence = header["last_seq"]
            if not isinstance(sequence, int) or sequence < 0:
                raise ValueError(f"last_seq {sequence!r} is not a revision")
        except StateError:
            raise
        except (IndexError, KeyError, TypeError, ValueError) as error:
            raise StateError(f"{path} is corrupt ({error!r}); {restore}") from error
        operations: list[Upsert | Delete] = []
        if items:
            operations.append(Upsert([i for i, _ in items], np.stack([row for _, row in items])))
        if deleted:
            operations.append(Delete(deleted))
        return operations, sequence

    def _read_journal(self, snapshot_revision: int, legacy: bool) -> _Journal:
        """Check the journal against the snapshot and itself; decode the changes after the snapshot. Changes
        nothing on disk (open() sets a torn tail aside once every check has passed)."""
        path = self._journal_path
        restore = (f"Restore {path} from a backup, or move {self.directory} aside to serve the bundle without its "
                   "catalogue changes")
        if not path.exists():
            raise StateError(f"{path} is missing, but a state directory always has its journal: the changes after "
                             f"the snapshot (revision {snapshot_revision}) may be lost; refusing to start. {restore}")
        data = path.read_bytes()
        lines: list[_Line] = []
        offset = 0
        for number, raw in enumerate(data.split(b"\n")[:-1], 1):  # the last piece has no newline after it
            lines.append(_Line(number, offset, raw, _parse_line(raw)))
            offset += len(raw) + 1
        torn_bytes = data[offset:]
        # Only the record being written at a crash can be torn: one line at most, the last.
        if not torn_bytes and lines and lines[-1].record is None:
            last = lines.pop()
            offset, torn_bytes = last.offset, last.raw + b"\n"
            if _looks_complete(last.raw):  # whole and valid JSON, yet its CRC fails: changed after it was written
                raise StateError(f"{path}: line {last.number} (byte {last.offset}) is a complete record whose "
                                 f"CRC32 does not match: the file was damaged after the write, not torn by a "
                                 f"crash; refusing to start rather than drop an acknowledged change. {restore}")
        damaged = next((line for line in lines if line.record is None), None)
        if damaged is not None:
            raise StateError(f"{path}: line {damaged.number} (byte {damaged.offset}) is damaged (CRC32 or JSON) and "
                             f"{len(data) - damaged.offset - len(damaged.raw) - 1} bytes follow it; refusing to start "
                             f"rather than drop an acknowledged change. {restore}")
        base = None
        if lines and lines[0].record.get("op") == "base":
            base = lines.pop(0)
        elif not legacy:
            where = f"line 1 (byte 0) is {'torn' if not lines else 'a change'}" if data else "it is empty"
            raise StateError(f"{path} does not start with its base record ({where}): its beginning was cut off or "
                             f"the file replaced; changes may be lost, refusing to start. {restore}")
        journal = _Journal(lines=lines, torn=(offset, torn_bytes) if torn_bytes else None)
        expected: int | None = None
        have = f"the snapshot is at revision {snapshot_revision}" if snapshot_revision else \
            f"{SNAPSHOT_FILE} is missing"
        restore_snapshot = (f"Restore {self.directory / SNAPSHOT_FILE} from a backup, or move {self.directory} aside "
                            "to serve the bundle without its catalogue changes")
        if base is not None:
            expected = _seq(base, path) + 1
            if expected - 1 > snapshot_revision:
                raise StateError(f"{path} continues from revision {expected - 1} (its base record), but {have}: "
                                 f"changes {snapshot_revision + 1}..{expected - 1} would be lost; refusing to start. "
                                 f"{restore_snapshot}")
        elif lines and _seq(lines[0], path) > snapshot_revision + 1:  # format 1: no base record to check
            first = _seq(lines[0], path)
            raise StateError(f"{path}: line {lines[0].number} (byte {lines[0].offset}) is change {first}, but {have}: "
                             f"changes {snapshot_revision + 1}..{first - 1} would be lost; refusing to start. "
                             f"{restore_snapshot}")
        journal.last_seq = expected - 1 if expected is not None else snapshot_revision
        for line in lines:
            record = line.record
            seq = _seq(line, path)
            if expected is not None and seq != expected:
                problem = "repeats" if seq < expected else "skips to"
                raise StateError(f"{path}: line {line.number} (byte {line.offset}) {problem} sequence number {seq} "
                                 f"where {expected} was due: changes are missing or duplicated; refusing to start. "
                                 f"{restore}")
            expected = seq + 1
            journal.last_seq = seq
            if seq <= snapshot_revision:  # already in the snapshot (a crash before the journal was replaced)
                continue
            try:
                journal.operations.append(operation_from_record(record, self.index_dimension))
            except (KeyError, TypeError, ValueError) as error:
                raise StateError(f"{path}: line {line.number} (byte {line.offset}) is not a valid change "
                                 f"({error!r}). {restore}") from error
        torn_seq = _SEQ_PREFIX.match(torn_bytes)
        if torn_seq is not None and int(torn_seq.group(1)) != journal.last_seq + 1:
            raise StateError(f"{path}: the torn bytes at its end (byte {offset}) are change {int(torn_seq.group(1))}, "
                             f"not {journal.last_seq + 1}, the only one a crash can tear: the file was damaged; "
                             f"refusing to start. {restore}")
        journal.revision = max(snapshot_revision, journal.last_seq)
        return journal

    def _set_torn_tail_aside(self, offset: int, torn: bytes, last_seq: int) -> None:
        """Keep a torn last record's bytes beside the journal, then cut them off it."""
        path = self._journal_path
        aside = path.with_name(f"{JOURNAL_FILE}{TORN_SUFFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        while aside.exists():
            aside = aside.with_name(aside.name + "_")
        _write_atomically(aside, torn)
        with path.open("r+b") as handle:
            handle.truncate(offset)
            handle.flush()
            os.fsync(handle.fileno())
        logger.warning(
            "journal %s ends in a torn record: %d bytes at byte %d after change %d, moved to %s and cut off. The "
            "server acknowledges a change only after its whole record is written and fsynced, so if the server "
            "stopped (crash, kill -9, power loss) while writing change %d, that change was never acknowledged and "
            "nothing is lost. If the file was cut or damaged some other way, an acknowledged change may be lost: "
            "restore the journal from a backup", path, len(torn), offset, last_seq, aside, last_seq + 1)

    def _warn_about_other_versions(self) -> None:
        others = sorted(p.parent.name for p in self.root.glob(f"*/{STATE_FILE}") if p.parent != self.directory)
        if others:
            logger.warning("state directory %s also holds catalogue changes for bundle versions %s; they are not "
                           "applied to bundle %s (re-upsert items to carry them over)", self.root,
                           ", ".join(others), self.bundle_version)

    # --- writes ---------------------------------------------------------------------------------------

    def append(self, sequence: int, operation: Upsert | Delete) -> None:
        """Write one change and fsync it; return only once it is durable. Raises OSError (and marks the store
        broken) if that fails: the change must then not be acknowledged, and its bytes are cut back off."""
        if self._journal_fd is None:
            raise OSError("the catalogue store is not open")
        if self.broken:
            raise OSError("the catalogue store is broken by an earlier storage error")
        line = _record_line({"seq": sequence, **change_record(operation)})
        start = self._journal_size
        try:
            _write_all(self._journal_fd, line)
            os.fsync(self._journal_fd)
        except OSError:
            self.broken = True
            try:  # an unacknowledged change must not come back at the next start
                os.ftruncate(self._journal_fd, start)
                os.fsync(self._journal_fd)
            except OSError as error:
                logger.error("cannot cut the failed record off %s (%s): if it reached the disk whole, it will "
                             "be replayed at the next start although it was not acknowledged", self._journal_path,
                             error)
            raise
        self._journal_size = start + len(line)
        self.records_since_snapshot += 1

    def snapshot(self, operations: Sequence[Upsert | Delete], sequence: int) -> None:
        """Atomically replace the snapshot with `operations` (the whole difference from the bundle) as of
        `sequence`, then replace the journal by one that continues from `sequence`."""
        lines = []
        for operation in operations:
            if isinstance(operation, Upsert):
                lines += [{"op": "upsert", "item": item_to_json(i, r)}
                          for i, r in zip(operation.items, operation.rows)]
            else:
                lines += [{"op": "delete", "id": item_id} for item_id in operation.item_ids]
        body = b"".join(json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
                        for line in lines)
        header = {"format": STATE_FORMAT, "bundle_version": self.bundle_version, "last_seq": sequence,
                  "changes": len(lines), "sha256": hashlib.sha256(body).hexdigest()}
        _write_atomically(self.directory / SNAPSHOT_FILE,
                          json.dumps(header, separators=(",", ":")).encode() + b"\n" + body)
        if self._journal_fd is not None:  # only now: until the rename, the journal is the only durable copy
            self._replace_journal(sequence, [])
        self.records_since_snapshot = 0
        logger.info("catalogue snapshot at revision %d (%d changes from the bundle)", sequence, len(lines))

    def _replace_journal(self, base: int, records: Sequence[bytes]) -> None:
        """Atomically replace the journal by its base record and `records` (lines without their newline); later
        appends go to the new file."""
        temporary = self._journal_path.with_name(JOURNAL_FILE + ".tmp")
        data = _record_line({"seq": base, "op": "base"}) + b"".join(line + b"\n" for line in records)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
            os.replace(temporary, self._journal_path)
        except BaseException:
            os.close(fd)
            raise
        try:
            _fsync_directory(self.directory)
        except OSError:
            # The rename may not be durable: appends to the new file could vanish with it after a power loss.
            self.broken = True
            os.close(fd)
            raise
        if self._journal_fd is not None:
            os.close(self._journal_fd)
        self._journal_fd, self._journal_size = fd, len(data)

    def close(self) -> None:
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

@dataclasses.dataclass
class _Journal:
    """What start-up read from the journal."""

    lines: list[_Line]  # intact change lines, in order (the base record left out)
    torn: tuple[int, bytes] | None  # (byte offset, bytes) of a torn last record
    operations: list[Upsert | Delete] = dataclasses.field(default_factory=list)  # the changes after the snapshot
    last_seq: int = 0  # the last intact line's seq (or the base's)
    revision: int = 0  # the catalogue revision after replay: max(snapshot revision, last_seq)


def _record_line(record: dict[str, Any]) -> bytes:
    payload = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def _parse_line(line: bytes) -> dict[str, Any] | None:
    """A journal line's record, or None when the line is torn or damaged."""
    checksum, _, payload = line.partition(b" ")
    try:
        if len(checksum) != 8 or int(checksum, 16) != zlib.crc32(payload):
            return None
        record = json.loads(payload)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("seq"), int) else None


def _looks_complete(line: bytes) -> bool:
    """A damaged line that is nonetheless a whole record (checksum field and a JSON object with a seq): a tear
    leaves a prefix or garbage, never that, so such a line was changed after it was written."""
    checksum, _, payload = line.partition(b" ")
    try:
        int(checksum, 16)
        record = json.loads(payload)
    except ValueError:
        return False
    return len(checksum) == 8 and isinstance(record, dict) and isinstance(record.get("seq"), int)


def _seq(line: _Line, path: Path) -> int:
    seq = line.record["seq"] if line.record is not None else None
    if not isinstance(seq, int) or seq < 0:
        raise StateError(f"{path}: line {line.number} (byte {line.offset}) has no valid sequence number")
    return seq


def _tag_bytes(tag: dict[str, Any]) -> bytes:
    return (json.dumps(tag, indent=2) + "\n").encode()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


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


# --- encoding (shared with the other catalogue stores, server.store) -------------------------------------


def item_to_json(item: CatalogueItem, row: np.ndarray) -> dict[str, Any]:
    """The item record (llmrec.item_record) with its attributes, plus the base64 little-endian index row."""
    return {**item_to_record(item.item_id, item.fields, item.attributes),
            "vector": base64.b64encode(np.asarray(row, dtype="<f4").tobytes()).decode()}


def item_from_json(data: dict[str, Any], index_dimension: int) -> tuple[CatalogueItem, np.ndarray]:
    item_id = item_id_from_record(data)
    row = np.frombuffer(base64.b64decode(data["vector"], validate=True), dtype="<f4").astype(np.float32)
    if row.shape != (index_dimension,):
        raise ValueError(f"item {item_id!r} has a vector of {row.size} values, want {index_dimension}")
    item = CatalogueItem(item_id, item_from_record(data), attributes_from_record(data), upserted=True)
    return item, row


def change_record(operation: Upsert | Delete) -> dict[str, Any]:
    """One change as JSON: {"op": "upsert", "items": [...]} or {"op": "delete", "ids": [...]}."""
    if isinstance(operation, Upsert):
        return {"op": "upsert", "items": [item_to_json(i, r) for i, r in zip(operation.items, operation.rows)]}
    return {"op": "delete", "ids": list(operation.item_ids)}


def operation_from_record(record: dict[str, Any], index_dimension: int) -> Upsert | Delete:
    """change_record's inverse. Raises KeyError, TypeError or ValueError for a malformed record."""
    if record["op"] == "upsert":
        items = [item_from_json(i, index_dimension) for i in record["items"]]
        return Upsert([i for i, _ in items], np.stack([row for _, row in items]))
    if record["op"] == "delete":
        return Delete([str(i) for i in record["ids"]])
    raise ValueError(f"unknown op {record['op']!r}")
