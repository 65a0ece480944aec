"""The catalogue journal and snapshots: replay, torn tails, corruption, missing files, tags and the lock."""

from __future__ import annotations

import json
import os
import zlib

import numpy as np
import pytest

from llmrec.template import ItemFields
from llmrec.server.domain import CatalogueItem
from llmrec.server.state import (JOURNAL_FILE, SNAPSHOT_FILE, STATE_FILE, TORN_SUFFIX, CatalogueStore, Delete,
                                 StateError, Upsert, item_to_json)

VERSION = "20250101T000000Z-abc"
DIM = 5


def item(item_id: str, title: str = "", **attributes: str) -> CatalogueItem:
    return CatalogueItem(item_id, ItemFields(title or f"Film {item_id}", ("Drama",)),
                         tuple(sorted(attributes.items())), upserted=True)


def upsert(*ids: str) -> Upsert:
    rows = np.arange(len(ids) * DIM, dtype=np.float32).reshape(len(ids), DIM) / 7
    return Upsert([item(i) for i in ids], rows)


def store(root, snapshot_every: int = 100) -> CatalogueStore:
    return CatalogueStore(root, VERSION, DIM, snapshot_every)


def flatten(operations) -> list[tuple[str, tuple]]:
    out = []
    for operation in operations:
        if isinstance(operation, Upsert):
            out += [("upsert", (i.item_id, i.fields, i.attributes, tuple(r.tolist())))
                    for i, r in zip(operation.items, operation.rows)]
        else:
            out += [("delete", (i,)) for i in operation.item_ids]
    return out


def test_changes_survive_a_reopen_exactly(tmp_path):
    first = store(tmp_path)
    assert first.open() == ([], 0)
    operations = [upsert("a", "b"), Delete(["x"]),
                  Upsert([item("c", "Ünïcode – title", studio="A24")], np.full((1, DIM), 0.5, np.float32))]
    for sequence, operation in enumerate(operations, 1):
        first.append(sequence, operation)
    first.close()
    replayed, sequence = store(tmp_path).open()
    assert sequence == 3 and flatten(replayed) == flatten(operations)
    assert json.loads((tmp_path / VERSION / STATE_FILE).read_text())["bundle_version"] == VERSION


def test_snapshot_then_journal_tail(tmp_path):
    first = store(tmp_path)
    first.open()
    first.append(1, upsert("a"))
    first.append(2, upsert("b"))
    first.snapshot([upsert("a", "b"), Delete(["x"])], 2)
    journal = (tmp_path / VERSION / JOURNAL_FILE).read_bytes()
    assert journal.endswith(b' {"seq":2,"op":"base"}\n') and first.records_since_snapshot == 0  # only its base
    first.append(3, Delete(["a"]))
    first.close()
    reopened = store(tmp_path)
    replayed, sequence = reopened.open()
    assert sequence == 3 and reopened.records_since_snapshot == 1
    assert flatten(replayed) == flatten([upsert("a", "b"), Delete(["x"]), Delete(["a"])])


def test_journal_lines_already_in_the_snapshot_are_skipped(tmp_path):
    """A crash between the snapshot's rename and the journal's truncation leaves old lines behind."""
    first = store(tmp_path)
    first.open()
    first.append(1, upsert("a"))
    first.append(2, upsert("b"))
    journal = (tmp_path / VERSION / JOURNAL_FILE).read_bytes()
    first.snapshot([upsert("a", "b")], 2)
    first.close()
    (tmp_path / VERSION / JOURNAL_FILE).write_bytes(journal)  # as if the truncation never happened
    replayed, sequence = store(tmp_path).open()
    assert sequence == 2 and flatten(replayed) == flatten([upsert("a", "b")])


@pytest.mark.parametrize("tail", [b'0badc0de {"seq": 3, "op": "del', b"\x00" * 40, b"deadbeef {}\n",
                                  b"0000000", b'12345678 {"seq":3,"op":"upsert","items":[{"id":"b","ti'])
def test_a_torn_last_record_is_set_aside_and_truncated(tmp_path, tail, caplog):
    first = store(tmp_path)
    first.open()
    first.append(1, upsert("a"))
    first.append(2, Delete(["a"]))
    first.close()
    path = tmp_path / VERSION / JOURNAL_FILE
    good = path.read_bytes()
    path.write_bytes(good + tail)
    reopened = store(tmp_path)
    replayed, sequence = reopened.open()
    assert sequence == 2 and flatten(replayed) == flatten([upsert("a"), Delete(["a"])])
    assert path.read_bytes() == good
    aside = list(path.parent.glob(JOURNAL_FILE + TORN_SUFFIX + "*"))
    assert len(aside) == 1 and aside[0].read_bytes() == tail  # kept for the operator, never just deleted
    # The warning says what the write protocol guarantees, and no more.
    assert "torn record" in caplog.text and f"at byte {len(good)} after change 2" in caplog.text
    assert "only after its whole record is written and fsynced" in caplog.text
    assert "if the server stopped" in caplog.text and "an acknowledged change may be lost" in caplog.text
    reopened.append(3, upsert("b"))  # appends go after the last good line
    reopened.close()
    assert store(tmp_path).open()[1] == 3


def test_cutting_the_last_record_short_is_not_called_unacknowledged_silently(tmp_path, caplog):
    """The fault probe's case: 40 bytes cut off the last (acknowledged) record."""
    first = store(tmp_path)
    first.open()
    for sequence in (1, 2, 3):
        first.append(sequence, upsert(f"i{sequence}"))
    first.close()
    path = tmp_path / VERSION / JOURNAL_FILE
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    replayed, sequence = store(tmp_path).open()
    assert sequence == 2 and flatten(replayed) == flatten([upsert("i1"), upsert("i2")])
    assert "it was never acknowledged" not in caplog.text  # the old, unconditional claim
    aside = list(path.parent.glob(JOURNAL_FILE + TORN_SUFFIX + "*"))
    assert aside and data.endswith(aside[0].read_bytes() + data[-40:])  # the cut record's bytes are kept


def test_a_torn_tail_that_is_not_the_next_change_refuses_to_start(tmp_path):
    first = store(tmp_path)
    first.open()
    first.append(1, upsert("a"))
    first.close()
    path = tmp_path / VERSION / JOURNAL_FILE
    path.write_bytes(path.read_bytes() + b'12345678 {"seq":7,"op":"del')  # a crash can only tear change 2
    with pytest.raises(StateError, match=r"torn bytes at its end \(byte \d+\) are change 7, not 2"):
        store(tmp_path).open()


def test_a_complete_last_record_with_a_bad_crc_is_corruption_not_a_tear(tmp_path):
    first = store(tmp_path)
    first.open()
    first.append(1, upsert("a"))
    first.append(2, upsert("b"))
    first.close()
    path = tmp_path / VERSION / JOURNAL_FILE
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"id":"b"', b'"id":"c"'))
    with pytest.raises(StateError, match=r"line 3 \(byte \d+\) is a complete record whose CRC32 does not match"):
        store(tmp_path).open()
    assert path.read_bytes() == data.replace(b'"id":"b"', b'"id":"c"')  # a refusal changes nothing


def test_damage_before_intact_lines_refuses_to_start(tmp_path):
    first = store(tmp_path)
    first.open()
    for sequence in (1, 2, 3):
        first.append(sequence, upsert(str(sequence)))
    first.close()
    path = tmp_path / VERSION / JOURNAL_FILE
    lines = path.read_bytes().split(b"\n")
    offset = len(lines[0]) + len(lines[1]) + 2
    lines[2] = lines[2].replace(b'"seq":2', b'"seq":9')  # CRC no longer matches (line 1 is the base record)
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(StateError) as refused:
        store(tmp_path).open()
    message = str(refused.value)
    assert str(path) in message and f"line 3 (byte {offset}) is damaged" in message
    assert "Restore" in message and "from a backup" in message and "\n" not in message


def test_a_missing_snapshot_is_detected_not_served_as_an_empty_catalogue(tmp_path):
    """The fault probe's case: snapshot.jsonl deleted; the journal holds only the changes after it."""
    first = store(tmp_path, snapshot_every=2)
    first.open()
    first.append(1, upsert("a"))
    first.append(2, upsert("b"))
    first.snapshot([upsert("a", "b")], 2)
    first.append(3, upsert("c"))
    first.close()
    (tmp_path / VERSION / SNAPSHOT_FILE).unlink()
    with pytest.raises(StateError, match=r"continues from revision 2 .* snapshot.jsonl is missing: changes 1..2 "
                                         r"would be lost"):
        store(tmp_path).open()


def test_a_missing_snapshot_with_an_emptied_journal_is_detected(tmp_path):
    first = store(tmp_path)
    first.open()
    first.append(1, upsert("a"))
    first.snapshot([upsert("a")], 1)  # the journal now holds only its base record
    first.close()
    (tmp_path / VERSION / SNAPSHOT_FILE).unlink()
    with pytest.raises(StateError, match="continues from revision 1"):
        store(tmp_path).open()


def test_an_older_snapshot_than_the_journal_needs_is_refused(tmp_path):
    first = store(tmp_path)
    first.open()
    first.append(1, upsert("a"))
    first.snapshot([upsert("a")], 1)
    old_snapshot = (tmp_path / VERSION / SNAPSHOT_FILE).read_bytes()
    first.append(2, upsert("b"))
    first.snapshot([upsert("a", "b")], 2)
    first.close()
    (tmp_path / VERSION / SNAPSHOT_FILE).write_bytes(old_snapshot)  # restored from a stale backup
    with pytest.raises(StateError, match="continues from revision 2 .* the snapshot is at revision 1"):
        store(tmp_path).open()


@pytest.mark.parametrize("damage", ["missing", "empty", "head cut"])
def test_a_missing_or_cut_journal_is_refused(tmp_path, damage):
    first = store(tmp_path)
    first.open()
    first.append(1, upsert("a"))
    first.append(2, upsert("b"))
    first.close()
    path = tmp_path / VERSION / JOURNAL_FILE
    if damage == "missing":
        path.unlink()
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(path.read_bytes().split(b"\n", 1)[1])  # the base record is gone
    with pytest.raises(StateError, match="is missing|does not start with its base record"):
        store(tmp_path).open()


def test_a_missing_line_in_the_middle_is_a_gap(tmp_path):
    first = store(tmp_path)
    first.open()
    for sequence in (1, 2, 3):
        first.append(sequence, upsert(str(sequence)))
    first.close()
    path = tmp_path / VERSION / JOURNAL_FILE
    lines = path.read_bytes().split(b"\n")
    del lines[2]  # change 2, whole and with a good CRC: only the sequence numbers show it is gone
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(StateError, match="line 3 .* skips to sequence number 3 where 2 was due"):
        store(tmp_path).open()


def test_a_damaged_snapshot_is_refused(tmp_path):
    first = store(tmp_path)
    first.open()
    first.snapshot([upsert("a", "b")], 2)
    first.close()
    path = tmp_path / VERSION / SNAPSHOT_FILE
    path.write_bytes(path.read_bytes().replace(b"Film a", b"Film z"))  # still valid JSON, same count
    with pytest.raises(StateError, match="is damaged: .* do not match the sha256"):
        store(tmp_path).open()


def test_a_failed_write_is_cut_back_off_and_never_replayed(tmp_path, monkeypatch):
    first = store(tmp_path)
    first.open()
    first.append(1, upsert("a"))
    path = tmp_path / VERSION / JOURNAL_FILE
    size = path.stat().st_size
    real_fsync = os.fsync
    calls = []

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        first.append(2, upsert("b"))
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert first.broken and path.stat().st_size == size
    with pytest.raises(OSError):
        first.append(2, upsert("b"))  # a broken store takes nothing more
    first.close()
    assert store(tmp_path).open()[1] == 1


def test_a_legacy_format_1_directory_is_read_and_upgraded(tmp_path, caplog):
    directory = tmp_path / VERSION
    directory.mkdir()
    (directory / STATE_FILE).write_text(json.dumps({"format": 1, "bundle_version": VERSION, "index_dimension": DIM}))
    rows = [item_to_json(i, r) for i, r in zip(upsert("a").items, upsert("a").rows)]
    (directory / SNAPSHOT_FILE).write_text(
        json.dumps({"format": 1, "bundle_version": VERSION, "last_seq": 1, "changes": 1}) + "\n"
        + json.dumps({"op": "upsert", "item": rows[0]}) + "\n")
    payload = json.dumps({"seq": 2, "op": "delete", "ids": ["a"]}, separators=(",", ":")).encode()
    (directory / JOURNAL_FILE).write_bytes(b"%08x %s\n" % (zlib.crc32(payload), payload))
    reopened = store(tmp_path)
    replayed, sequence = reopened.open()
    assert sequence == 2 and flatten(replayed) == flatten([upsert("a"), Delete(["a"])])
    reopened.close()
    assert json.loads((directory / STATE_FILE).read_text())["format"] == 2
    assert (directory / JOURNAL_FILE).read_bytes().split(b"\n")[0].endswith(b'{"seq":1,"op":"base"}')
    again = store(tmp_path)
    assert flatten(again.open()[0]) == flatten([upsert("a"), Delete(["a"])])
    again.close()


def test_a_legacy_journal_that_does_not_follow_a_missing_snapshot_is_refused(tmp_path):
    directory = tmp_path / VERSION
    directory.mkdir()
    (directory / STATE_FILE).write_text(json.dumps({"format": 1, "bundle_version": VERSION, "index_dimension": DIM}))
    payload = json.dumps({"seq": 50, "op": "delete", "ids": ["a"]}, separators=(",", ":")).encode()
    (directory / JOURNAL_FILE).write_bytes(b"%08x %s\n" % (zlib.crc32(payload), payload))
    with pytest.raises(StateError, match=r"is change 50, but snapshot.jsonl is missing: changes 1..49 would be lost"):
        store(tmp_path).open()


def test_a_directory_without_its_tag_but_with_changes_is_refused(tmp_path):
    first = store(tmp_path)
    first.open()
    first.append(1, upsert("a"))
    first.close()
    (tmp_path / VERSION / STATE_FILE).unlink()
    with pytest.raises(StateError, match="state.json is missing"):
        store(tmp_path).open()
    (tmp_path / VERSION / JOURNAL_FILE).write_bytes(b"")  # as a crash during the very first open leaves it
    assert store(tmp_path).open() == ([], 0)


def test_a_bundle_version_that_is_not_a_plain_name_is_refused(tmp_path):
    with pytest.raises(StateError, match="plain name"):
        CatalogueStore(tmp_path / "state", "../../x", DIM)
    assert not (tmp_path / "x").exists()


def test_one_server_per_state_directory(tmp_path):
    owner = store(tmp_path)
    owner.open()
    with pytest.raises(StateError, match="another server"):
        store(tmp_path).open()
    owner.close()
    store(tmp_path).open()


def test_state_is_tagged_with_the_bundle(tmp_path, caplog):
    first = store(tmp_path)
    first.open()
    first.append(1, upsert("a"))
    first.close()
    other = CatalogueStore(tmp_path, "20260101T000000Z-def", DIM)
    assert other.open() == ([], 0)  # another bundle starts from its own (empty) state
    assert VERSION in caplog.text and "not applied" in caplog.text
    other.close()
    (tmp_path / VERSION / STATE_FILE).write_text(json.dumps({"format": 1, "bundle_version": "someone-else",
                                                             "index_dimension": DIM}))
    with pytest.raises(StateError, match="another bundle"):
        store(tmp_path).open()


def test_a_snapshot_for_another_bundle_or_a_damaged_one_is_refused(tmp_path):
    first = store(tmp_path)
    first.open()
    first.snapshot([upsert("a")], 1)
    first.close()
    path = tmp_path / VERSION / SNAPSHOT_FILE
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:1]) + "\n")  # header says 1 change, none follow
    with pytest.raises(StateError, match="is damaged|holds 0 changes"):
        store(tmp_path).open()
    path.write_text(lines[0].replace(VERSION, "other") + "\n" + lines[1] + "\n")
    with pytest.raises(StateError, match="belongs to bundle"):
        store(tmp_path).open()


def test_a_row_of_the_wrong_size_is_corruption(tmp_path):
    first = store(tmp_path)
    first.open()
    first.append(1, Upsert([item("a")], np.zeros((1, DIM + 1), np.float32)))
    first.close()
    with pytest.raises(StateError, match="not a valid change"):
        store(tmp_path).open()
