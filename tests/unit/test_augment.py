import numpy as np

from llmrec.template import ItemFields, UserText, render_user
from llmrec.training.augment import synthetic_query, with_history_dropout, with_synthetic_query

FILM = ItemFields("Toy Story (1995)", ("Animation", "Comedy"))
TOOL = ItemFields("Porter-Cable 80 Grit Adhesive-Backed Sanding Roll")


def test_query_is_a_category_or_a_span_of_the_title():
    rng = np.random.default_rng(0)
    assert {synthetic_query(FILM, rng) for _ in range(50)} == {"animation", "comedy"}
    for _ in range(50):
        span = synthetic_query(TOOL, rng)
        assert 2 <= len(span.split()) <= 4 and span in TOOL.title.lower()


def test_share_of_examples_with_queries_and_without_history_follows_the_probabilities():
    rng = np.random.default_rng(1)
    user = UserText([TOOL])
    results = [with_synthetic_query(user, FILM, rng, 0.5, 0.5) for _ in range(2000)]
    with_query = [u for u in results if u.context.query]
    assert 0.45 < len(with_query) / 2000 < 0.55
    assert 0.4 < sum(not u.history for u in with_query) / len(with_query) < 0.6
    assert all(u is user for u in results if not u.context.query)  # untouched otherwise
    assert render_user(with_query[0]).startswith("looking for: ")


def test_history_dropout_keeps_the_most_recent_item_and_drops_older_ones_at_the_given_rate():
    rng = np.random.default_rng(2)
    history = [ItemFields(f"item {i}") for i in range(11)]
    user = UserText(history)
    results = [with_history_dropout(user, rng, 0.3) for _ in range(2000)]
    assert all(u.history[-1] is history[-1] for u in results)
    for u in results[:50]:  # what remains keeps its order
        assert [history.index(item) for item in u.history] == sorted(history.index(item) for item in u.history)
    dropped_share = 1 - np.mean([len(u.history) - 1 for u in results]) / 10
    assert 0.27 < dropped_share < 0.33
    assert with_history_dropout(user, rng, 0.0) is user
    assert with_history_dropout(UserText([TOOL]), rng, 0.9).history == [TOOL]
