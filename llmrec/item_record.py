"""The item record: one catalogue item as a JSON object, the form every items.jsonl and the server's state use.

    {"id": "m1", "title": "Star Wars (1977)", "categories": ["Action", "Sci-Fi"], "brand": "", "description": "",
     "attributes": {"studio": "Lucasfilm"}}

"id" and "title" are required strings (an integer id is read as its decimal text). "categories" (a list of
strings), "brand", "description" (strings) and "attributes" (an object with string values) are optional; null
reads as absent. Other keys are left to the caller (the server's state stores "vector" beside them). Writers
emit every text field, in the order above, and "attributes" only where they keep them (the server's catalogue
state; bundles and data sets carry text only).

Read and written by: training data sets (items.jsonl), bundles (llmrec.manifest.ITEMS_FILE), the server's
catalogue journal and snapshot (server/state.py), and bench/. Torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from llmrec.template import ItemFields

Attributes = tuple[tuple[str, str], ...]  # sorted (key, value) pairs


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _where(record: Mapping[str, Any]) -> str:
    item_id = record.get("id")
    return f"item {item_id!r}" if isinstance(item_id, (str, int)) and not isinstance(item_id, bool) else "item record"


def _require_mapping(record: Any) -> None:
    if not isinstance(record, Mapping):
        raise ValueError(f"an item record must be a JSON object, got {_type_name(record)}")


def _text(record: Mapping[str, Any], key: str, required: bool = False) -> str:
    if key not in record and required:
        raise ValueError(f"{_where(record)}: field {key!r} is missing")
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{_where(record)}: field {key!r} must be a string, got {_type_name(value)}")
    return value


def item_id_from_record(record: Mapping[str, Any]) -> str:
    """The record's "id" as text. Raises ValueError if it is missing or neither a string nor an integer."""
    _require_mapping(record)
    if "id" not in record:
        raise ValueError("item record: field 'id' is missing")
    value = record["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"item record: field 'id' must be a string, got {_type_name(value)}")
    return str(value)


def item_from_record(record: Mapping[str, Any]) -> ItemFields:
    """The text fields of an item record. Raises ValueError naming the field that is missing or mistyped."""
    _require_mapping(record)
    categories = record.get("categories")
    if categories is None:
        categories = []
    if not isinstance(categories, list):
        raise ValueError(f"{_where(record)}: field 'categories' must be a list of strings, got "
                         f"{_type_name(categories)}")
    for number, category in enumerate(categories):
        if not isinstance(category, str):
            raise ValueError(f"{_where(record)}: field 'categories' must be a list of strings, got "
                             f"{_type_name(category)} at [{number}]")
    return ItemFields(
        title=_text(record, "title", required=True),
        categories=tuple(categories),
        brand=_text(record, "brand"),
        description=_text(record, "description"),
    )


def attributes_from_record(record: Mapping[str, Any]) -> Attributes:
    """The record's "attributes" as sorted (key, value) pairs; () when absent."""
    _require_mapping(record)
    attributes = record.get("attributes")
    if attributes is None:
        return ()
    if not isinstance(attributes, Mapping):
        raise ValueError(f"{_where(record)}: field 'attributes' must be an object of strings, got "
                         f"{_type_name(attributes)}")
    for key, value in attributes.items():
        if not isinstance(value, str):
            raise ValueError(f"{_where(record)}: field 'attributes' must be an object of strings, got "
                             f"{_type_name(value)} at {key!r}")
    return tuple(sorted((str(key), value) for key, value in attributes.items()))


def item_to_record(item_id: str, fields: ItemFields,
                   attributes: Attributes | Mapping[str, str] | None = None) -> dict[str, Any]:
    """The record of one item: id and text fields, and "attributes" only when given (possibly empty)."""
    record: dict[str, Any] = {"id": item_id, "title": fields.title, "categories": list(fields.categories),
                              "brand": fields.brand, "description": fields.description}
    if attributes is not None:
        record["attributes"] = dict(attributes)
    return record


def read_items(path: Path) -> list[tuple[str, ItemFields]]:
    """(id, fields) of every record in an items.jsonl file, in file order; blank lines are skipped.

    Raises:
        ValueError: "<path>:<line>: ..." for a line that is not JSON or not a valid item record.
    """
    items = []
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                items.append((item_id_from_record(record), item_from_record(record)))
            except ValueError as error:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{path}:{number}: not a valid item record ({error})") from error
    return items


def write_items(path: Path, items: Iterable[tuple[str, ItemFields]]) -> None:
    """Write (id, fields) as items.jsonl, one record a line (UTF-8, not ASCII-escaped)."""
    with Path(path).open("w", encoding="utf-8") as handle:
        for item_id, fields in items:
            handle.write(json.dumps(item_to_record(item_id, fields), ensure_ascii=False) + "\n")
