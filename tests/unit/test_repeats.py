"""The history item score: applied once per distinct history item, chosen by validation NDCG@10."""

import numpy as np

from llmrec.template import ItemFields
from training.data import Example, Interactions
from training.repeats import HISTORY_SCORE_GRID, add_history_score, choose_history_item_score

ITEMS = 12


def interactions(sequences):
    return Interactions("tiny", [str(i) for i in range(ITEMS)], [ItemFields(f"t{i}") for i in range(ITEMS)],
                        [str(u) for u in range(len(sequences))], sequences)


def test_adds_the_value_once_to_each_distinct_earlier_item():
    data = interactions([[1, 2, 1, 5, 7]])
    scores = add_history_score(np.zeros((1, ITEMS)), data, [Example(0, 3)], -0.5)
    assert scores[0].tolist() == [0, -0.5, -0.5] + [0] * (ITEMS - 3)  # 5 (the target) and 7 (later) untouched


def test_never_repeating_users_get_their_history_pushed_down():
    # Text-like scores: the user's own history first, the target next.
    data = interactions([[u % ITEMS, (u + 1) % ITEMS, (u + 2) % ITEMS, (u + 3) % ITEMS] for u in range(20)])
    examples = [Example(u, 3) for u in range(20)]
    scores = np.zeros((20, ITEMS))
    for row, e in enumerate(examples):
        seq = data.sequences[e.user]
        scores[row, seq[:3]] = 0.9
        scores[row, seq[3]] = 0.8
    best, table = choose_history_item_score(scores, data, examples)
    assert best < -0.1  # the history must fall below the target
    assert table[str(best)] == 1.0 and table["0.0"] < 0.6


def test_users_who_repeat_keep_their_history():
    data = interactions([[u % ITEMS, (u + 1) % ITEMS, u % ITEMS] for u in range(20)])  # the target repeats item 0
    examples = [Example(u, 2) for u in range(20)]
    scores = np.zeros((20, ITEMS))
    for row, e in enumerate(examples):
        scores[row, data.sequences[e.user][0]] = 0.9
    best, table = choose_history_item_score(scores, data, examples)
    assert best == 0.0 and table["0.0"] == 1.0 and table[str(min(HISTORY_SCORE_GRID))] < 1.0
