"""Interaction data sets: RecBole atomic and benchmark files, and our own simple JSONL/CSV format.

Every loader returns `Interactions`: a catalogue (external ids and text fields) and each user's
chronological sequence of internal item numbers. The split is leave-one-out on that sequence:
test target = last item, valid target = second to last, train = everything before.

Our own format (a directory):
    items.jsonl         item records, one a line (llmrec.item_record): {"id", "title", "categories", ...}
    interactions.csv    user_id,item_id[,timestamp]   (timestamp in Unix seconds; rows in any order)
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmrec.item_record import read_items
from llmrec.template import ItemFields, RequestContext, UserText


@dataclass
class Interactions:
    name: str
    item_ids: list[str]  # internal item number -> external id
    items: list[ItemFields]  # internal item number -> text
    user_ids: list[str]
    sequences: list[list[int]]  # per user, chronological
    timestamps: list[list[float | None]] = field(default_factory=list)  # same shape as sequences, or empty

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def timestamp(self, user: int, position: int) -> float | None:
        return self.timestamps[user][position] if self.timestamps else None


@dataclass(frozen=True)
class Example:
    """Predict sequences[user][target_position] from the items before it."""

    user: int
    target_position: int


# Leave-one-out: a split's target is this many events from the end of each sequence of 3 or more.
_TARGET_OFFSET = {"valid": 2, "test": 1}
_MIN_EVALUATED_LENGTH = 3


def _target_offset(split: str) -> int:
    if split not in _TARGET_OFFSET:
        raise ValueError(f"split must be 'valid' or 'test', not {split!r}")
    return _TARGET_OFFSET[split]


def split_examples(data: Interactions, split: str) -> list[Example]:
    """Leave-one-out evaluation examples ('valid' or 'test'); users with fewer than 3 events are skipped."""
    offset = _target_offset(split)
    return [Example(u, len(seq) - offset) for u, seq in enumerate(data.sequences) if len(seq) >= _MIN_EVALUATED_LENGTH]


def sequences_before(data: Interactions, split: str) -> list[list[int]]:
    """Each sequence without the split's target and what follows it: every event known when the split's
    targets are predicted. Sequences too short to be evaluated are kept whole."""
    offset = _target_offset(split)
    return [seq[:-offset] if len(seq) >= _MIN_EVALUATED_LENGTH else seq for seq in data.sequences]


def train_sequences(data: Interactions) -> list[list[int]]:
    """What models learn from: each sequence without its valid and test targets (the last two items)."""
    return sequences_before(data, "valid")


def item_popularity(data: Interactions) -> np.ndarray:
    counts = np.zeros(data.num_items, dtype=np.float64)
    for seq in train_sequences(data):
        np.add.at(counts, seq, 1.0)
    return counts


def load_interactions(path: Path) -> Interactions:
    """Load a data set directory in any supported format (detected from its files)."""
    path = Path(path)
    if (path / "items.jsonl").is_file():
        return _load_simple(path)
    if list(path.glob("*.text")) and list(path.glob("*.test.inter")):
        return _load_recbole_benchmark(path)
    if list(path.glob("*.item")) and list(path.glob("*.inter")):
        return _load_recbole_atomic(path)
    raise FileNotFoundError(
        f"{path}: no supported data set (want items.jsonl + interactions.csv, RecBole atomic "
        "<name>.inter + <name>.item, or RecBole benchmark <name>.text + <name>.test.inter)"
    )


def _read_recbole(path: Path) -> Iterator[dict[str, str]]:
    """Rows of a RecBole TSV whose header cells are 'name:type'."""
    with path.open(encoding="utf-8") as handle:
        header = [cell.split(":")[0] for cell in handle.readline().rstrip("\n").split("\t")]
        for line in handle:
            yield dict(zip(header, line.rstrip("\n").split("\t")))


def _group_by_user(
    rows: list[tuple[str, str, float | None]], item_index: dict[str, int]
) -> tuple[list[str], list[list[int]], list[list[float | None]]]:
    """Rows of (user, item, timestamp) in file order -> per-user sequences sorted by (timestamp, file order)."""
    per_user: dict[str, list[tuple[float, int, int, float | None]]] = {}
    for order, (user, item, timestamp) in enumerate(rows):
        if item not in item_index:
            continue
        key = timestamp if timestamp is not None else float(order)
        per_user.setdefault(user, []).append((key, order, item_index[item], timestamp))
    user_ids = list(per_user)
    events = [sorted(per_user[u]) for u in user_ids]
    sequences = [[e[2] for e in evs] for evs in events]
    has_time = any(e[3] is not None for evs in events for e in evs)
    timestamps = [[e[3] for e in evs] for evs in events] if has_time else []
    return user_ids, sequences, timestamps


def _load_recbole_atomic(path: Path) -> Interactions:
    inter_file = next(path.glob("*.inter"))
    name = inter_file.stem
    item_ids, items = [], []
    for row in _read_recbole(path / f"{name}.item"):
        title = row.get("movie_title") or row.get("title") or row["item_id"]
        year = row.get("release_year", "")
        if year and year not in title:
            title = f"{title} ({year})"
        genres = (row.get("class") or row.get("categories") or row.get("genre") or "").split()
        item_ids.append(row["item_id"])
        items.append(ItemFields(title=title, categories=tuple(genres), brand=row.get("brand", "")))
    index = {item: i for i, item in enumerate(item_ids)}
    rows = [
        (r["user_id"], r["item_id"], float(r["timestamp"]) if r.get("timestamp") else None)
        for r in _read_recbole(inter_file)
    ]
    user_ids, sequences, timestamps = _group_by_user(rows, index)
    return Interactions(name, item_ids, items, user_ids, sequences, timestamps)


def _load_recbole_benchmark(path: Path) -> Interactions:
    """UniSRec-style split: full sequence of a user = test history + test target (already chronological)."""
    name = next(path.glob("*.test.inter")).name.removesuffix(".test.inter")
    texts = {row["item_id"]: row["text"] for row in _read_recbole(path / f"{name}.text")}
    numbered = {}
    with (path / f"{name}.item2index").open(encoding="utf-8") as handle:
        for line in handle:
            asin, number = line.rstrip("\n").split("\t")
            numbered[int(number)] = asin
    item_ids = [numbered[i] for i in range(len(numbered))]
    items = [ItemFields(title=texts.get(asin, asin)) for asin in item_ids]
    user_ids, sequences = [], []
    for row in _read_recbole(path / f"{name}.test.inter"):
        user_ids.append(row["user_id"])
        sequences.append([int(i) for i in row["item_id_list"].split()] + [int(row["item_id"])])
    return Interactions(name, item_ids, items, user_ids, sequences)


def _load_simple(path: Path) -> Interactions:
    catalogue = read_items(path / "items.jsonl")
    item_ids = [item_id for item_id, _ in catalogue]
    items = [fields for _, fields in catalogue]
    index = {item: i for i, item in enumerate(item_ids)}
    with (path / "interactions.csv").open(encoding="utf-8", newline="") as handle:
        rows = [
            (r["user_id"], r["item_id"], float(r["timestamp"]) if r.get("timestamp") else None)
            for r in csv.DictReader(handle)
        ]
    user_ids, sequences, timestamps = _group_by_user(rows, index)
    return Interactions(path.name, item_ids, items, user_ids, sequences, timestamps)


def user_text(data: Interactions, example: Example, use_context: bool = True) -> UserText:
    """The user as the model sees them when asked for sequences[user][target_position]: the items before it,
    and the context of that moment (its timestamp)."""
    history = [data.items[i] for i in data.sequences[example.user][: example.target_position]]
    timestamp = data.timestamp(example.user, example.target_position) if use_context else None
    return UserText(history=history, context=RequestContext(timestamp=timestamp))
