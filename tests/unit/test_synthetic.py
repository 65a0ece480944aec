"""experiments/synthetic.py: a seeded synthetic data set in the project's own format, of the requested shape, with
structure that models can learn (co-occurrence beats popularity)."""

import csv
import json

import numpy as np
import pytest

from experiments.synthetic import SyntheticConfig, write_dataset
from llmrec.training.calibration import cooccurrence_before, cooccurrence_only_scores
from llmrec.training.data import load_interactions, split_examples
from llmrec.training.evaluation import evaluate, popularity_scores

SMALL = SyntheticConfig(users=300, items=200, events_per_user=7.0, seed=3)


def files(directory) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in ("items.jsonl", "interactions.csv", "synthetic.json")}


def test_the_same_seed_writes_the_same_bytes_and_another_seed_does_not(tmp_path):
    first = files(write_dataset(tmp_path / "a", SMALL))
    again = files(write_dataset(tmp_path / "b", SMALL))
    other = files(write_dataset(tmp_path / "c", SyntheticConfig(users=300, items=200, seed=4)))
    assert first == again
    assert first["items.jsonl"] != other["items.jsonl"]
    assert first["interactions.csv"] != other["interactions.csv"]


def test_the_data_set_has_the_requested_shape_and_loads(tmp_path):
    data = load_interactions(write_dataset(tmp_path / "synthetic", SMALL))
    assert data.num_items == 200 and len(data.item_ids) == len(set(data.item_ids))
    assert len(data.sequences) == 300
    lengths = np.array([len(s) for s in data.sequences])
    assert lengths.min() >= SMALL.min_events  # every user is evaluated (leave-one-out needs 3)
    assert 6.5 <= lengths.mean() <= 7.5
    assert all(len(set(s)) == len(s) for s in data.sequences)  # nobody buys the same item twice
    assert all(np.all(np.diff(t) > 0) for t in data.timestamps)
    assert len(split_examples(data, "test")) == 300
    record = json.loads((tmp_path / "synthetic" / "items.jsonl").read_text().splitlines()[0])
    assert record["title"] and len(record["categories"]) == 3 and record["brand"]
    assert json.loads((tmp_path / "synthetic" / "synthetic.json").read_text())["events"] == lengths.sum()


def test_without_timestamps_the_csv_has_two_columns(tmp_path):
    directory = write_dataset(tmp_path / "plain", SyntheticConfig(users=50, items=100, timestamps=False))
    with (directory / "interactions.csv").open() as handle:
        assert next(csv.reader(handle)) == ["user_id", "item_id"]
    assert load_interactions(directory).timestamps == []


def test_sequences_have_structure_that_models_can_learn(tmp_path):
    data = load_interactions(write_dataset(tmp_path / "learnable", SyntheticConfig(users=1500, items=300, seed=1)))
    test = split_examples(data, "test")
    popularity = evaluate(popularity_scores(data), data, test, (10,))
    cooccurrence = evaluate(cooccurrence_only_scores(data, cooccurrence_before(data, "test")), data, test, (10,))
    assert popularity["ndcg@10"] > 0.02  # a popularity skew
    assert cooccurrence["ndcg@10"] > 1.5 * popularity["ndcg@10"]  # item-to-item order beyond popularity


@pytest.mark.parametrize("bad", [{"min_events": 2}, {"events_per_user": 3.0, "min_events": 4}, {"items": 10}])
def test_impossible_shapes_are_refused(bad):
    with pytest.raises(ValueError):
        SyntheticConfig(**{"users": 10, "items": 200, **bad})
