"""The item record (llmrec.item_record): one parser and one writer for items.jsonl and the server's state."""

from __future__ import annotations

import json

import pytest

from llmrec.item_record import (
    attributes_from_record, item_from_record, item_id_from_record, item_to_record, read_items, write_items,
)
from llmrec.template import ItemFields

FULL = ItemFields("Ünïcode – Film (1999)", ("Drama", "Sci-Fi"), "Acme", "A long description.")


@pytest.mark.parametrize("fields", [FULL, ItemFields("Bare"), ItemFields("", (), "", "")])
def test_round_trip(fields):
    record = item_to_record("m1", fields)
    assert list(record) == ["id", "title", "categories", "brand", "description"]  # the on-disk key order
    assert item_id_from_record(record) == "m1" and item_from_record(record) == fields
    parsed = json.loads(json.dumps(record, ensure_ascii=False))
    assert item_from_record(parsed) == fields and attributes_from_record(parsed) == ()


def test_attributes_are_written_only_when_given_and_read_back_sorted():
    record = item_to_record("m1", FULL, (("studio", "A24"), ("country", "US")))
    assert list(record)[-1] == "attributes" and record["attributes"] == {"studio": "A24", "country": "US"}
    assert attributes_from_record(record) == (("country", "US"), ("studio", "A24"))
    assert item_to_record("m1", FULL, {})["attributes"] == {}


def test_optional_fields_may_be_absent_or_null_and_integer_ids_read_as_text():
    assert item_from_record({"id": 7, "title": "T"}) == ItemFields("T")
    assert item_id_from_record({"id": 7, "title": "T"}) == "7"
    nulls = {"id": "a", "title": "T", "categories": None, "brand": None, "description": None, "attributes": None}
    assert item_from_record(nulls) == ItemFields("T") and attributes_from_record(nulls) == ()
    assert item_from_record({"id": "a", "title": "T", "vector": "AAAA", "extra": 1}) == ItemFields("T")


@pytest.mark.parametrize("record, field", [
    ({"id": "a"}, "'title' is missing"),
    ({"id": "a", "title": None}, "'title' must be a string, got null"),
    ({"id": "a", "title": 3}, "'title' must be a string, got int"),
    ({"id": "a", "title": "T", "categories": "Drama"}, "'categories' must be a list of strings, got str"),
    ({"id": "a", "title": "T", "categories": ["Drama", 2]}, r"'categories' must be a list of strings, got int at \[1\]"),
    ({"id": "a", "title": "T", "brand": ["Acme"]}, "'brand' must be a string, got list"),
    ({"id": "a", "title": "T", "description": {}}, "'description' must be a string, got dict"),
])
def test_bad_text_fields_raise_value_error_naming_the_field(record, field):
    with pytest.raises(ValueError, match=f"item 'a': field {field}"):
        item_from_record(record)


@pytest.mark.parametrize("record, message", [
    ({"title": "T"}, "field 'id' is missing"),
    ({"id": None, "title": "T"}, "field 'id' must be a string, got null"),
    ({"id": True, "title": "T"}, "field 'id' must be a string, got bool"),
    ({"id": ["a"], "title": "T"}, "field 'id' must be a string, got list"),
])
def test_bad_ids_raise_value_error(record, message):
    with pytest.raises(ValueError, match=message):
        item_id_from_record(record)


@pytest.mark.parametrize("attributes, message", [
    (["studio", "A24"], "'attributes' must be an object of strings, got list"),
    ({"year": 1999}, "'attributes' must be an object of strings, got int at 'year'"),
])
def test_bad_attributes_raise_value_error(attributes, message):
    with pytest.raises(ValueError, match=message):
        attributes_from_record({"id": "a", "title": "T", "attributes": attributes})


def test_a_record_must_be_an_object():
    with pytest.raises(ValueError, match="JSON object, got list"):
        item_from_record(["a", "T"])  # type: ignore[arg-type]


def test_items_jsonl_is_written_as_before_and_read_back(tmp_path):
    path = tmp_path / "items.jsonl"
    write_items(path, [("m1", FULL), ("m2", ItemFields("Bare"))])
    assert path.read_text(encoding="utf-8") == (
        '{"id": "m1", "title": "Ünïcode – Film (1999)", "categories": ["Drama", "Sci-Fi"], "brand": "Acme", '
        '"description": "A long description."}\n'
        '{"id": "m2", "title": "Bare", "categories": [], "brand": "", "description": ""}\n')
    assert read_items(path) == [("m1", FULL), ("m2", ItemFields("Bare"))]


def test_reading_skips_blank_lines_and_names_the_bad_line(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text('{"id": "a", "title": "A"}\n\n{"id": "b", "title": "B", "categories": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"items.jsonl:3: .*item 'b': field 'categories'"):
        read_items(path)
    path.write_text('{"id": "a", "title": "A"}\n\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"items.jsonl:3: not a valid item record"):
        read_items(path)
