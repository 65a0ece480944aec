"""Attribution arithmetic, query terms and summaries."""

from __future__ import annotations

import numpy as np
import pytest

from llmrec.server.explain import HISTORY, QUERY_TERM, explain, query_terms, summary


@pytest.mark.parametrize("query, terms", [
    ("animated films for kids", ["animated", "films", "kids"]),
    ("Space  ADVENTURE, space!", ["space", "adventure"]),
    ("something for the weekend?", ["weekend"]),
    ("the of and", ["the of and"]),  # only stop words: the query itself
    ("", []),
])
def test_query_terms(query, terms):
    assert query_terms(query) == terms


def basis(*weights: float) -> np.ndarray:
    vector = np.zeros(4, np.float32)
    vector[: len(weights)] = weights
    return vector


def test_weights_follow_similarity_and_sum_to_one():
    items = np.stack([basis(1, 0.2), basis(0, 1)])
    history = [("a", "Alpha"), ("b", "Beta"), ("c", "Gamma")]
    history_vectors = np.stack([basis(1), basis(0, 1), basis(0, 0, 1)])
    first, second = explain(items, history, history_vectors)
    assert [r.item_id for r in first.reasons] == ["a", "b"]  # "c" is orthogonal: weight 0
    assert sum(r.weight for r in first.reasons) == pytest.approx(1.0)
    assert first.reasons[0].similarity == pytest.approx(1 / np.sqrt(1.04), rel=1e-5)
    assert second.reasons[0].item_id == "b" and second.reasons[0].weight == pytest.approx(1.0)
    assert first.summary == "Because you liked Alpha"


def test_the_query_share_is_split_among_its_terms():
    items = np.stack([basis(1, 1)])
    history = [("a", "Alpha")]
    explanation, = explain(items, history, np.stack([basis(1)]), query="red blue", query_vector=basis(0, 1),
                           terms=["red", "blue"], term_vectors=np.stack([basis(0, 1), basis(0, 0, 1)]))
    by_text = {r.text: r for r in explanation.reasons}
    assert by_text["Alpha"].kind == HISTORY and by_text["red"].kind == QUERY_TERM
    assert by_text["Alpha"].weight == pytest.approx(0.5) and by_text["red"].weight == pytest.approx(0.5)
    assert "blue" not in by_text or by_text["blue"].weight == 0.0
    assert sum(r.weight for r in explanation.reasons) == pytest.approx(1.0)
    assert explanation.summary == 'Because you liked Alpha and asked for "red blue"'


def test_at_most_three_history_items_and_three_terms_are_shown():
    items = np.stack([basis(1, 1, 1, 1)])
    history = [(str(n), f"T{n}") for n in range(5)]
    terms = ["t1", "t2", "t3", "t4"]
    explanation, = explain(items, history, np.ones((5, 4), np.float32), "t1 t2 t3 t4", basis(1, 1, 1, 1), terms,
                           np.ones((4, 4), np.float32))
    kinds = [r.kind for r in explanation.reasons]
    assert kinds.count(HISTORY) == 3 and kinds.count(QUERY_TERM) == 3
    weights = [r.weight for r in explanation.reasons]
    assert weights == sorted(weights, reverse=True)


def test_summaries():
    from llmrec.server.domain import Reason
    star, alien = Reason(HISTORY, "1", "Star Wars (1977)", 0.5, 0.9), Reason(HISTORY, "2", "Alien (1979)", 0.46, 0.8)
    assert summary([star, alien], "", 0.0) == "Because you liked Star Wars (1977) and Alien (1979)"
    assert summary([star], "space adventure", 0.3) == \
        'Because you liked Star Wars (1977) and asked for "space adventure"'
    assert summary([star], "space", 0.6) == 'Because you asked for "space" and liked Star Wars (1977)'
    assert summary([star], "space", 0.1) == "Because you liked Star Wars (1977)"
    assert summary([], "x" * 100, 1.0).endswith('…"') and summary([], "", 0.0).startswith("Recommended")
