import dataclasses
from pathlib import Path

import numpy as np
import pytest

from llmrec.training.data import (
    item_popularity, load_interactions, sequences_before, split_examples, train_sequences, user_text,
)

TINY = Path(__file__).parents[1] / "fixtures" / "tiny"


def test_simple_format_orders_each_user_by_timestamp(tmp_path):
    (tmp_path / "items.jsonl").write_text('{"id": "a", "title": "A"}\n{"id": "b", "title": "B"}\n{"id": "c", "title": "C"}\n')
    (tmp_path / "interactions.csv").write_text("user_id,item_id,timestamp\nu,c,30\nu,a,10\nu,b,20\nv,a,5\nu,zzz,40\n")
    data = load_interactions(tmp_path)
    assert data.item_ids == ["a", "b", "c"]
    assert data.sequences[data.user_ids.index("u")] == [0, 1, 2]  # unknown item dropped
    assert data.timestamps[data.user_ids.index("u")] == [10.0, 20.0, 30.0]


def test_recbole_atomic_ties_keep_file_order_and_year_joins_title(tmp_path):
    (tmp_path / "toy.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n1\tHeat\t1995\tAction Crime\n2\tFargo\t1996\tCrime\n"
    )
    (tmp_path / "toy.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n7\t2\t5\t100\n7\t1\t4\t100\n7\t2\t3\t50\n"
    )
    data = load_interactions(tmp_path)
    assert data.items[0].title == "Heat (1995)" and data.items[0].categories == ("Action", "Crime")
    assert data.sequences == [[1, 1, 0]]  # t=50 first, then the two t=100 events in file order


def test_recbole_benchmark_rebuilds_full_sequences(tmp_path):
    (tmp_path / "S.text").write_text("item_id:token\ttext:token_seq\nX\tx text\nY\ty text\nZ\tz text\n")
    (tmp_path / "S.item2index").write_text("X\t0\nY\t1\nZ\t2\n")
    (tmp_path / "S.test.inter").write_text("user_id:token\titem_id_list:token_seq\titem_id:token\n0\t0 1\t2\n")
    data = load_interactions(tmp_path)
    assert data.sequences == [[0, 1, 2]] and data.items[2].title == "z text" and not data.timestamps


def test_leave_one_out_split_never_trains_on_held_out_items():
    data = load_interactions(TINY)
    test, valid = split_examples(data, "test"), split_examples(data, "valid")
    assert len(test) == len(valid) == len(data.user_ids)
    for example, train in zip(test, train_sequences(data)):
        sequence = data.sequences[example.user]
        assert example.target_position == len(sequence) - 1 and train == sequence[:-2]
    assert item_popularity(data).sum() == sum(len(s) for s in train_sequences(data))


def test_user_text_uses_history_before_target_and_target_time():
    data = load_interactions(TINY)
    example = split_examples(data, "test")[0]
    user = user_text(data, example)
    assert len(user.history) == example.target_position
    assert user.context.timestamp == data.timestamps[example.user][-1]
    assert user_text(data, example, use_context=False).context.timestamp is None
    assert np.isfinite(user.context.timestamp)


@pytest.mark.parametrize("split", ["valid", "test"])
def test_sequences_before_a_split_end_where_its_targets_start(split):
    tiny = load_interactions(TINY)
    data = dataclasses.replace(tiny, user_ids=tiny.user_ids + ["new"], sequences=tiny.sequences + [[0, 1]],
                               timestamps=[])  # the new user's 2 events are too few to evaluate
    before = sequences_before(data, split)
    examples = split_examples(data, split)
    assert examples
    for example in examples:
        assert before[example.user] == data.sequences[example.user][: example.target_position]
    assert len(examples) == len(data.sequences) - 1 and before[-1] == [0, 1]  # too short: kept whole
    with pytest.raises(ValueError, match="split must be"):
        sequences_before(data, "train")
