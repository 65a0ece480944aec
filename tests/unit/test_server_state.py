"""The catalogue journal and snapshots: replay, torn tails, corruption, tags and the directory lock."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmrec.template import ItemFields
from llmrec.server.domain import CatalogueItem
from llmrec.server.state import JOURNAL_FILE, SNAPSHOT_FILE, STATE_FILE, CatalogueStore, Delete, StateError, Upsert

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
    assert (tmp_path / VERSION / JOURNAL_FILE).stat().st_size == 0 and first.records_since_snapshot == 0
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
                                  b"0000000"])
def test_a_torn_last_record_is_dropped_and_truncated(tmp_path, tail, caplog):
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
    assert path.read_bytes() == good and "torn last record" in caplog.text
    reopened.append(3, upsert("b"))  # appends go after the last good line
    reopened.close()
    assert store(tmp_path).open()[1] == 3


def test_damage_before_intact_lines_refuses_to_start(tmp_path):
    first = store(tmp_path)
    first.open()
    for sequence in (1, 2, 3):
        first.append(sequence, upsert(str(sequence)))
    first.close()
    path = tmp_path / VERSION / JOURNAL_FILE
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b'"seq":2', b'"seq":9')  # CRC no longer matches
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(StateError, match="line 2 is damaged"):
        store(tmp_path).open()


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
    with pytest.raises(StateError, match="holds 0 changes"):
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
