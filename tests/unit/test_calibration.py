"""Post-training adjustments: the history item score (once per distinct history item) and the co-occurrence
weight, the history vector weight and the sequence model weight, chosen by validation CALIBRATION_METRIC."""

import dataclasses

import numpy as np
import pytest

from llmrec.template import ItemFields
from llmrec.training.data import Example, Interactions
from llmrec.cooccurrence import CooccurrenceTable
from llmrec.history_vector import RECENCY_DECAY
from llmrec.scoring import Adjustments, Recency, ScoreTerms, ScoringRule, item_rows
from llmrec.training.calibration import (
    COOCCURRENCE_WEIGHT_GRID, HISTORY_SCORE_GRID, MODEL_WEIGHT_GRID, POLICIES, SERVED_SCORE_SPAN, calibrate_row,
    choose_adjustments, choose_fast_adjustments, choose_fast_path, cooccurrence_before, cooccurrence_only_scores, evaluate_policies, histories, span_scale,
)

ITEMS = 12
# Unrelated unit item vectors (one axis each): the history vector knows nothing unless a test sets it.
AXES = np.eye(ITEMS, dtype=np.float32)


def interactions(sequences):
    return Interactions("tiny", [str(i) for i in range(ITEMS)], [ItemFields(f"t{i}") for i in range(ITEMS)],
                        [str(u) for u in range(len(sequences))], sequences)


def terms(scores, data, examples, table, vectors, sequence=None, rule=ScoringRule()):
    return ScoreTerms.of(rule, scores, vectors, histories(data, examples), table, sequence)


def choose_adjustments_of(scores, data, examples, table, vectors, sequence=None):
    """choose_adjustments over model scores, in chunks of 7 users (the chunks must not change the choice)."""
    return choose_adjustments(
        lambda chunk: terms(scores[chunk], data, examples[chunk], table, vectors,
                            None if sequence is None else sequence[chunk]),
        data, examples, with_sequence=sequence is not None, chunk_users=7)


def test_adds_the_value_once_to_each_distinct_earlier_item():
    data = interactions([[1, 2, 1, 5, 7]])
    combined = terms(np.zeros((1, ITEMS)), data, [Example(0, 3)], None, AXES).combine(Adjustments(-0.5))
    assert combined[0].tolist() == [0, -0.5, -0.5] + [0] * (ITEMS - 3)  # 5 (the target) and 7 (later) untouched


def test_never_repeating_users_get_their_history_pushed_down():
    # Text-like scores: the user's own history first, the target next.
    data = interactions([[u % ITEMS, (u + 1) % ITEMS, (u + 2) % ITEMS, (u + 3) % ITEMS] for u in range(20)])
    examples = [Example(u, 3) for u in range(20)]
    scores = np.zeros((20, ITEMS))
    for row, e in enumerate(examples):
        seq = data.sequences[e.user]
        scores[row, seq[:3]] = 0.9
        scores[row, seq[3]] = 0.8
    best, table = choose_adjustments_of(scores, data, examples, CooccurrenceTable.empty(ITEMS), AXES)
    assert best.history_item_score < -0.1  # the history must fall below the target
    assert best.cooccurrence_weight == 0.0 and best.history_vector_weight == 0.0  # no help: the milder choice
    assert table[f"{best.history_item_score},0.0,0.0,0.0"]["ndcg@10"] == 1.0 and table["0.0,0.0,0.0,0.0"]["ndcg@10"] < 0.6


def test_users_who_repeat_keep_their_history():
    data = interactions([[u % ITEMS, (u + 1) % ITEMS, u % ITEMS] for u in range(20)])  # the target repeats item 0
    examples = [Example(u, 2) for u in range(20)]
    scores = np.zeros((20, ITEMS))
    for row, e in enumerate(examples):
        scores[row, data.sequences[e.user][0]] = 0.9
    best, table = choose_adjustments_of(scores, data, examples, CooccurrenceTable.empty(ITEMS), AXES)
    assert best.history_item_score == 0.0 and table["0.0,0.0,0.0,0.0"]["ndcg@10"] == 1.0
    assert table[f"{min(HISTORY_SCORE_GRID)},0.0,0.0,0.0"]["ndcg@10"] < 1.0


def test_cooccurrence_is_chosen_when_the_next_item_follows_the_last_one():
    # Every user goes a -> a+1 -> a+2; the text-like scores know nothing of it (all zero but noise).
    sequences = [[u % ITEMS, (u + 1) % ITEMS, (u + 2) % ITEMS] for u in range(40)]
    data = interactions(sequences)
    examples = [Example(u, 2) for u in range(40)]
    table = CooccurrenceTable.from_sequences([s[:2] for s in sequences], ITEMS, window=1)  # pairs (a, a+1) only
    scores = np.random.default_rng(0).normal(scale=1e-3, size=(40, ITEMS))
    best, ndcg = choose_adjustments_of(scores, data, examples, table, AXES)
    assert best.cooccurrence_weight > 0 and ndcg[best.key]["ndcg@10"] > 0.5


def test_the_cooccurrence_baseline_ranks_neighbours_of_the_history_first_and_keeps_the_history():
    data = interactions([[1, 2, 3], [1, 2, 4], [5, 6, 7]])
    table = CooccurrenceTable.from_sequences([[1, 2], [1, 2], [5, 6]], ITEMS, window=1)
    scores = cooccurrence_only_scores(data, table)([Example(0, 1)])[0]  # history [1]: its neighbour is 2
    order = np.argsort(-scores, kind="stable")
    assert order[0] == 2
    # published policy: the history item is ranked by its own scores (popularity here), not pushed last
    assert order[-1] != 1 and scores[1] > scores[0]


def never_repeating(users: int = 20):
    """Users who go a -> a+1 -> a+2 -> a+3 and never repeat an item, with their validation examples."""
    data = interactions([[u % ITEMS, (u + 1) % ITEMS, (u + 2) % ITEMS, (u + 3) % ITEMS] for u in range(users)])
    return data, [Example(u, 3) for u in range(users)]


def history_first_scores(data, examples, history: float, target: float):
    """Scores in any units that rank each user's history first (`history`), their target next (`target`)."""
    scores = np.zeros((len(examples), ITEMS))
    for row, e in enumerate(examples):
        seq = data.sequences[e.user]
        scores[row, seq[: e.target_position]] = history
        scores[row, seq[e.target_position]] = target
    return scores


def row(scores, examples):
    """A row's own ScoreFn over fixed scores of these examples."""
    position = {e: n for n, e in enumerate(examples)}
    return lambda batch: scores[[position[e] for e in batch]]


def test_any_row_gets_a_history_score_in_its_own_units():
    # Popularity-like counts in the hundreds: the grid's -4 would not move them, so the row is scaled first.
    data, examples = never_repeating()
    own = row(history_first_scores(data, examples, 900.0, 800.0), examples)
    chosen = calibrate_row(own, data, examples, chunk_users=7)
    assert chosen.scale == SERVED_SCORE_SPAN / 900.0 and chosen.adjustments.history_item_score in HISTORY_SCORE_GRID
    assert chosen.adjustments.cooccurrence_weight == 0.0  # no table: the history item score alone
    assert chosen.validation[chosen.adjustments.key]["ndcg@10"] == 1.0
    assert chosen.validation[Adjustments().key]["ndcg@10"] < 0.5  # the target behind the 3 history items
    deployed = chosen.scores(own, data)(examples)
    assert np.all(np.argmax(deployed, 1) == [data.sequences[e.user][3] for e in examples])
    published = chosen.scores(own, data, history_item_score=0.0)(examples)
    np.testing.assert_allclose(published, chosen.scale * own(examples))  # the same ranking as the row's own


def test_the_policies_of_a_row_differ_only_in_the_history_item_score():
    data, examples = never_repeating()
    own = row(history_first_scores(data, examples, 0.9, 0.8), examples)
    rows, ranks, chosen = evaluate_policies(own, own, data, examples, examples, (10,))
    assert list(rows) == list(POLICIES) == ["published", "deployed"]
    assert chosen.adjustments.history_item_score < 0 and rows["deployed"]["ndcg@10"] == 1.0
    assert np.all(ranks["deployed"] == 0) and np.all(ranks["published"] == 3)  # behind the 3 history items


def test_a_hybrid_row_gets_its_cooccurrence_weight_from_the_same_grid():
    # SASRec-like logits that know nothing (noise), a table that knows every next item: the weight is chosen.
    sequences = [[u % ITEMS, (u + 1) % ITEMS, (u + 2) % ITEMS] for u in range(40)]
    data = interactions(sequences)
    examples = [Example(u, 2) for u in range(40)]
    table = CooccurrenceTable.from_sequences([s[:2] for s in sequences], ITEMS, window=1)
    own = row(np.random.default_rng(0).normal(scale=5.0, size=(40, ITEMS)), examples)
    rows, _, chosen = evaluate_policies(own, own, data, examples, examples, (10,), {"valid": table, "test": table})
    assert chosen.adjustments.cooccurrence_weight in COOCCURRENCE_WEIGHT_GRID
    assert chosen.adjustments.cooccurrence_weight > 0 and rows["deployed"]["ndcg@10"] > 0.5
    assert rows["published"]["ndcg@10"] > 0.5  # published keeps the co-occurrence weight, drops the history score
    assert chosen.model_weight in MODEL_WEIGHT_GRID


def test_a_hybrid_row_weighs_its_own_score_down_when_co_occurrence_must_outweigh_it():
    # Heavy-tailed logits that know nothing: at the largest co-occurrence weight, the noise still beats the table's
    # count-1 pairs for some users; weighing the row's own score down lets the table decide for every user.
    sequences = [[u % ITEMS, (u + 1) % ITEMS, (u + 2) % ITEMS] for u in range(ITEMS)]
    data = interactions(sequences)
    examples = [Example(u, 2) for u in range(ITEMS)]
    table = CooccurrenceTable.from_sequences([s[:2] for s in sequences], ITEMS, window=1)
    own = row(np.random.default_rng(0).standard_cauchy(size=(ITEMS, ITEMS)), examples)
    chosen = calibrate_row(own, data, examples, table, chunk_users=7)
    assert chosen.model_weight < 1.0 and chosen.chosen_metric == 1.0
    assert chosen.scale == pytest.approx(chosen.model_weight * span_scale(own, examples))


def similar_pairs_vectors(shift: int) -> np.ndarray:
    """Unit vectors where item a is close to item a + shift (mod ITEMS) and far from the rest."""
    vectors = AXES + 0.9 * np.roll(AXES, shift, axis=1)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_the_history_vector_is_chosen_when_targets_resemble_history_items():
    # Items 2m and 2m + 1 share a vector and every user goes 2m -> 2m + 1; the text-like scores (all zero but
    # noise) do not know it.
    pairs = np.eye(ITEMS, dtype=np.float32)[np.arange(ITEMS) // 2]
    sequences = [[2 * (u % (ITEMS // 2)), 2 * (u % (ITEMS // 2)) + 1] for u in range(40)]
    data = interactions(sequences)
    examples = [Example(u, 1) for u in range(40)]
    scores = np.random.default_rng(0).normal(scale=1e-3, size=(40, ITEMS))
    best, ndcg = choose_adjustments_of(scores, data, examples, CooccurrenceTable.empty(ITEMS), pairs)
    assert best.history_vector_weight > 0 and best.history_item_score < 0  # the history itself falls below
    assert ndcg[best.key]["ndcg@10"] == 1.0 and ndcg[Adjustments().key]["ndcg@10"] < 0.5


def test_the_fast_path_weighs_the_bias_down_when_the_vectors_must_outweigh_it():
    # No user vector: the history vector must lift 2m + 1 above item 11, whose bias (5) no grid weight (<= 1.6)
    # passes at model weight 1; at 0.25 it does. The served adjustments are the choice divided by that weight.
    pairs = np.eye(ITEMS, dtype=np.float32)[np.arange(ITEMS) // 2]
    sequences = [[2 * (u % 5), 2 * (u % 5) + 1] for u in range(40)]
    data = interactions(sequences)
    examples = [Example(u, 1) for u in range(40)]
    biases = np.zeros(ITEMS)
    biases[11] = 5.0
    rows = item_rows(pairs, biases, temperature=1.0)
    table = CooccurrenceTable.empty(ITEMS)
    served, found = choose_fast_adjustments(rows, pairs, data, examples, table)
    assert found["model_weight"] < 1 and found["ndcg@50"] == pytest.approx(1.0)
    chosen = dataclasses.astuple(Adjustments(**found["chosen"]))
    assert dataclasses.astuple(served) == pytest.approx([value / found["model_weight"] for value in chosen])
    scores = ScoringRule(served).dense_scores(np.zeros((40, ITEMS), np.float32), rows, histories(data, examples),
                                              table)
    assert (scores.argmax(axis=1) == [sequence[1] for sequence in sequences]).all()


def test_the_fast_path_user_map_reads_what_a_zero_vector_cannot():
    # Every user goes a -> a + 1 and the encoder's user vector points at a + 1: a linear function of the latest
    # item's vector that the history vector (pointing at a itself) and a zero user vector cannot express.
    sequences = [[u % ITEMS, (u + 1) % ITEMS] for u in range(60)]
    data = interactions(sequences)
    examples = [Example(u, 1) for u in range(60)]
    rows = item_rows(AXES, np.zeros(ITEMS), temperature=1.0)
    table = CooccurrenceTable.empty(ITEMS)
    encoder_vectors = AXES[[(u + 1) % ITEMS for u in range(60)]]
    adjustments, fit, record = choose_fast_path(rows, AXES, data, examples, table, None, encoder_vectors)
    assert record["user_map"]["held_out_r2"] > 0.9
    assert record["ndcg@50"] == pytest.approx(1.0)  # chosen over the held-out predictions
    predicted = fit.map.user_vectors([AXES[h] for h in histories(data, examples)])
    scores = ScoringRule(adjustments).dense_scores(predicted, rows, histories(data, examples), table)
    assert (scores.argmax(axis=1) == [sequence[1] for sequence in sequences]).all()
    _, zero = choose_fast_adjustments(rows, AXES, data, examples, table)
    assert zero["ndcg@50"] < 0.5


def test_the_history_vector_term_is_the_decayed_sum_of_recent_item_vectors():
    data = interactions([[1, 2, 3, 4]])
    examples = [Example(0, 3)]
    vectors = similar_pairs_vectors(1)
    split = terms(np.zeros((1, ITEMS)), data, examples, None, vectors)
    # History [1, 2, 3], oldest first: the latest item weighs most.
    expected = (vectors[3] + RECENCY_DECAY * vectors[2] + RECENCY_DECAY**2 * vectors[1]) @ vectors.T
    np.testing.assert_allclose(split.history_vector[0], expected, rtol=1e-5)
    np.testing.assert_allclose(split.combine(Adjustments(0.0, 0.0, 0.5)), 0.5 * split.history_vector, rtol=1e-6)


def test_the_terms_read_the_recency_they_are_given_not_the_training_defaults():
    # A bundle whose manifest says "latest item only" must be evaluated that way, as its server scores.
    data = interactions([[1, 2, 3, 4]])
    examples = [Example(0, 3)]
    vectors = similar_pairs_vectors(1)
    latest_only = Recency(recent_items=1, decay=0.5)
    rule = ScoringRule(cooccurrence_recency=latest_only, history_vector_recency=latest_only)
    table = CooccurrenceTable.from_sequences([[1, 5], [3, 6]], ITEMS)
    split = terms(np.zeros((1, ITEMS)), data, examples, table, vectors, rule=rule)
    np.testing.assert_allclose(split.history_vector[0], vectors[3] @ vectors.T, rtol=1e-6)
    assert split.cooccurrence[0, 6] > 0 and split.cooccurrence[0, 5] == 0  # item 1 is not the latest: 0


def test_the_choice_weighs_the_top_50_not_only_the_top_10():
    # 11 users whose target the model ranks first, but whose history item co-occurs with 12 other items; 9 whose
    # target the model ranks last, but co-occurs with their history item. Co-occurrence drops the first group
    # to rank 12 and lifts the second to rank 1: worse NDCG@10, better NDCG@50.
    items = 100
    distractors = list(range(2, 14))
    sequences = [[0, 1]] * 11 + [[20, 21]] * 9
    data = Interactions("deep", [str(i) for i in range(items)], [ItemFields(f"t{i}") for i in range(items)],
                        [str(u) for u in range(len(sequences))], sequences)
    examples = [Example(u, 1) for u in range(len(sequences))]
    table = CooccurrenceTable.from_sequences([[0, d] for d in distractors] * 5 + [[20, 21]] * 5, items, window=1)
    scores = np.zeros((len(sequences), items))
    scores[:11, 1], scores[11:, 21] = 0.5, -0.5
    best, metrics = choose_adjustments_of(scores, data, examples, table, np.eye(items, dtype=np.float32))
    none = metrics[Adjustments().key]
    assert best.cooccurrence_weight > 0
    assert metrics[best.key]["ndcg@10"] < none["ndcg@10"] and metrics[best.key]["ndcg@50"] > none["ndcg@50"]


def test_the_sequence_weight_is_chosen_when_the_sequence_vectors_know_the_target():
    # Text-like scores know nothing; each user's sequence vector points at their target (one axis per item).
    sequences = [[u % ITEMS, (u + 5) % ITEMS] for u in range(30)]
    data = interactions(sequences)
    examples = [Example(u, 1) for u in range(30)]
    rng = np.random.default_rng(0)
    scores = rng.normal(0, 0.01, (30, ITEMS))
    sequence = AXES[[s[1] for s in sequences]]
    best, metrics = choose_adjustments_of(scores, data, examples, CooccurrenceTable.empty(ITEMS), AXES, sequence)
    assert best.sequence_weight > 0 and metrics[best.key]["ndcg@10"] == 1.0
    without, _ = choose_adjustments_of(scores, data, examples, CooccurrenceTable.empty(ITEMS), AXES)
    assert without.sequence_weight == 0.0  # no sequence model: the weight stays off


def test_useless_sequence_vectors_are_left_out():
    sequences = [[u % ITEMS, (u + 5) % ITEMS] for u in range(30)]
    data = interactions(sequences)
    examples = [Example(u, 1) for u in range(30)]
    scores = np.zeros((30, ITEMS))
    scores[np.arange(30), [s[1] for s in sequences]] = 1.0  # the model alone is perfect
    misleading = AXES[[(s[1] + 1) % ITEMS for s in sequences]]
    best, _ = choose_adjustments_of(scores, data, examples, CooccurrenceTable.empty(ITEMS), AXES, misleading)
    assert best.sequence_weight < 1.0  # never enough to overturn the model
    combined = terms(scores, data, examples, None, AXES, misleading).combine(best)
    assert np.all(np.argmax(combined, 1) == [s[1] for s in sequences])


def test_the_sequence_term_is_weighted_as_chosen():
    data = interactions([[1, 2, 3, 4]])
    examples = [Example(0, 3)]
    vectors = similar_pairs_vectors(1)
    sequence = np.random.default_rng(1).normal(size=(1, vectors.shape[1])).astype(np.float32)
    adjusted = terms(np.zeros((1, ITEMS)), data, examples, None, vectors, sequence).combine(
        Adjustments(sequence_weight=0.3))
    np.testing.assert_allclose(adjusted[0], 0.3 * (vectors @ sequence[0]), rtol=1e-5)


def test_each_split_counts_every_event_before_its_targets_and_never_a_target():
    # one user: 1 2 3 | valid target 4 | test target 5
    data = interactions([[1, 2, 3, 4, 5]])
    neighbours = {split: cooccurrence_before(data, split).scores([3], recent_items=1)[0].tolist()
                  for split in ("valid", "test")}
    assert neighbours == {"valid": [1, 2], "test": [1, 2, 4]}  # the valid event counts for test histories only
    assert 5 not in cooccurrence_before(data, "test").scores([1, 2, 3, 4], recent_items=4)[0]
